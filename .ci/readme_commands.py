#!/usr/bin/env python3
"""Prints the README's two newcomer commands, one per line, exactly as written there.

They are the command lines of the first ```bash block under the heading "## The two commands"; .ci/run executes
these very lines, so the README and CI cannot drift apart.
"""

import sys
from pathlib import Path

HEADING = "## The two commands"


def readme_commands(text):
    """The non-empty lines of the first fenced bash block after ``HEADING`` (exactly two are expected)."""
    after = text.split(HEADING, 1)
    if len(after) != 2:
        raise SystemExit(f"README.md has no {HEADING!r} section.")
    block = after[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip()]
    if len(lines) != 2:
        raise SystemExit(f"The {HEADING!r} block must hold exactly two commands, found {len(lines)}.")
    return lines


if __name__ == "__main__":
    readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    print("\n".join(readme_commands(readme.read_text())))
