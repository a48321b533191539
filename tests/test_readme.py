"""The README's Python snippets written as ``>>>`` examples run as doctests, on the backend of the test run."""

import doctest
import re

from conftest import REPO


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    text = "\n".join(block for block in blocks if block.lstrip().startswith(">>>"))  # one namespace, in order
    examples = doctest.DocTestParser().get_doctest(text, {}, "README.md", "README.md", 0)
    assert len(examples.examples) >= 10
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    failures = []
    runner.run(examples, out=failures.append)
    assert runner.failures == 0, "".join(failures)
