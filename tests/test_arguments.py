"""Builder arguments declared once (``keras_vit.arguments``): the signature, the config, the unknown-argument
suggestions, the README table and the checks all come from the dataclass fields; a new option is one line."""

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import keras_vit
from conftest import REPO
from keras_vit import arguments, models
from keras_vit.arguments import ArgumentError, UnknownArgumentsError

SMALL = dict(image_size=16, patch_size=4, hidden_size=12, num_layers=1, num_heads=3, mlp_dim=24, classes=5)


def test_every_declared_argument_is_in_the_signature_the_config_and_the_suggestions():
    fields = models.ARGUMENT_FIELDS
    parameters = inspect.signature(keras_vit.VisionTransformer).parameters
    config = keras_vit.vision_transformer(**SMALL).get_config()
    for field in fields:
        assert parameters[field.name].default == field.default, field.name
        assert field.name in config, field.name
        assert field.name in keras_vit.VisionTransformer.__doc__, field.name
        with pytest.raises(UnknownArgumentsError) as error:
            keras_vit.vision_transformer(**{field.name + "x": field.default})
        assert error.value.suggestions == {field.name + "x": field.name}
        assert field.name in error.value.valid
    # the config holds the declared arguments and the Keras ones, nothing hand-listed besides
    assert set(config) == {f.name for f in fields} | {"name", "trainable", "dtype"}


def test_a_value_an_argument_cannot_take_is_an_argument_error_with_its_fields():
    for name, value in (("dropout_rate", 1.5), ("num_layers", 0), ("include_top", "yes"), ("posemb", "learned"),
                        ("gelu", "relu"), ("num_register_tokens", -1)):
        with pytest.raises(ArgumentError) as error:
            keras_vit.vision_transformer(**{**SMALL, name: value})
        assert (error.value.name, error.value.value) == (name, value)
    with pytest.raises(ArgumentError) as error:
        keras_vit.vision_transformer(**SMALL, class_names=["a", "b"])
    assert (error.value.name, error.value.value) == ("class_names", ["a", "b"])


def test_argument_error_messages_say_the_argument_the_value_and_what_it_must_be():
    # the one message-text test per error type
    assert str(ArgumentError("dropout_rate", 1.5, "in [0, 1)")) == "dropout_rate must be in [0, 1), got 1.5."
    message = str(UnknownArgumentsError({"hiden_size"}, ["hidden_size", "classes"], "VisionTransformer"))
    assert message == ("VisionTransformer got unexpected keyword argument(s) 'hiden_size' (did you mean "
                       "'hidden_size'?). Valid: classes, hidden_size.")


def test_the_readme_argument_table_is_the_declarations():
    readme = (REPO / "README.md").read_text()
    table = re.search(r"<!-- builder arguments: keras_vit.arguments.table -->\n(.*?)\n<!-- end builder arguments -->",
                      readme, re.S)
    assert table is not None
    expected = arguments.table(models.ARGUMENT_FIELDS)
    assert table.group(1) == expected, f"Regenerate the README's argument table (keras_vit.arguments.table):\n{expected}"


_NEW_OPTION = (
    '    demo_flag: bool = argument(False, "a demonstration option.", check=args.boolean)\n'
)
_SCRIPT = textwrap.dedent("""
    import json, sys, inspect
    import keras, numpy as np
    import keras_vit
    from keras_vit.arguments import ArgumentError, UnknownArgumentsError
    small = dict(image_size=16, patch_size=4, hidden_size=12, num_layers=1, num_heads=3, mlp_dim=24, classes=5)
    model = keras_vit.vision_transformer(**small, demo_flag=True)
    model.save(sys.argv[1])
    loaded = keras.models.load_model(sys.argv[1])
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
    out = {
        "config": loaded.get_config()["demo_flag"],
        "default": keras_vit.vision_transformer(**small).get_config()["demo_flag"],
        "signature": inspect.signature(keras_vit.VisionTransformer).parameters["demo_flag"].default,
        "same": bool(np.array_equal(np.asarray(model(images)), np.asarray(loaded(images)))),
        "readme_row": "| `demo_flag` | `False` | a demonstration option. |" in keras_vit.arguments.table(
            keras_vit.models.ARGUMENT_FIELDS),
    }
    try:
        keras_vit.vision_transformer(**small, demo_flga=True)
    except UnknownArgumentsError as error:
        out["suggestion"] = error.suggestions["demo_flga"]
    try:
        keras_vit.vision_transformer(**small, demo_flag="yes")
    except ArgumentError as error:
        out["refused"] = [error.name, error.value]
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_a_new_boolean_option_declared_in_one_line_builds_round_trips_and_is_refused_mistyped(tmp_path):
    # A copy of the package with one line added to ModelOptions: nothing else is edited.
    package = tmp_path / "keras_vit"
    shutil.copytree(REPO / "keras_vit", package, ignore=shutil.ignore_patterns("__pycache__"))
    source = (package / "architecture.py").read_text()
    anchor = "\n    def __post_init__(self):\n        args.check_declared(self)\n"
    assert source.count(anchor) == 1  # ModelOptions' declarations end here
    (package / "architecture.py").write_text(source.replace(anchor, "\n" + _NEW_OPTION + anchor))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path / "demo.keras")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"config": True, "default": False, "signature": False, "same": True, "readme_row": True,
                   "suggestion": "demo_flag", "refused": ["demo_flag", "yes"]}
