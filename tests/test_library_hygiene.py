"""The library's manners: no global side effects, no private Keras attributes, no prints, layered imports."""

import ast
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

PACKAGE = REPO / "keras_vit"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _run(code, *args):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result.stdout


def test_no_private_attributes_of_keras_objects():
    """Every ``x._name`` in keras_vit names something keras_vit itself defines (a method or an attribute it sets)."""
    trees = {path: ast.parse(path.read_text()) for path in SOURCES}
    ours = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                ours.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                ours.add(node.attr)
            elif isinstance(node, ast.Assign):
                ours.update(t.id for t in node.targets if isinstance(t, ast.Name))
    used = [
        f"{path.relative_to(REPO)}:{node.lineno} .{node.attr}"
        for path, tree in trees.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and node.attr not in ours
    ]
    assert not used, used
    # the reasoning above holds only if keras_vit does not also assign to the private names Keras uses
    assert not {"_model_variables_moving_average", "_learning_rate", "_trainable_variables", "_distribution_strategy"} & ours


def test_the_library_never_prints_and_logs_through_module_loggers():
    """Outside command-line entry points (``main``, ``*_main``): no print; module loggers named ``__name__``;
    ``logging.basicConfig`` only in modules with an entry point."""
    prints, loggers = [], []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
        entry_points = any(f.name == "main" or f.name.endswith("_main") for f in functions)
        for function in [f for f in functions if not (f.name == "main" or f.name.endswith("_main"))]:
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                    prints.append(f"{path.relative_to(REPO)}:{node.lineno}")
        for node in tree.body:  # module-level loggers
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and getattr(node.value.func, "attr", None) == "getLogger":
                if not (len(node.value.args) == 1 and getattr(node.value.args[0], "id", None) == "__name__"):
                    loggers.append(f"{path.relative_to(REPO)}:{node.lineno}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "basicConfig" and not entry_points:
                loggers.append(f"{path.relative_to(REPO)}:{node.lineno} basicConfig")
    assert not prints, f"print outside command-line entry points: {prints}"
    assert not loggers, f"module loggers not named by __name__, or logging configured by the library: {loggers}"


def test_no_process_wide_setters_in_the_library():
    """No socket default timeout, no global dtype policy: a model's precision is its own ``dtype`` argument."""
    setters = [
        f"{path.relative_to(REPO)}:{node.lineno} {node.func.attr}"
        for path in SOURCES
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", None) in ("setdefaulttimeout", "set_dtype_policy", "set_global_policy")
    ]
    assert not setters, setters


@pytest.mark.slow
def test_the_model_library_does_not_import_the_training_application():
    names = sorted(
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for path in SOURCES
        if "train" not in path.relative_to(PACKAGE).parts[:1]
    )
    assert "keras_vit.models" in names and not any(name.startswith("keras_vit.train") for name in names)
    output = _run("""
        import importlib, sys
        for name in sys.argv[1:]:
            importlib.import_module(name)
        print(sorted(m for m in sys.modules if m.startswith("keras_vit.train")))
    """, *names)
    assert output.strip().splitlines()[-1] == "[]", output


STATE = """
    import logging, socket, sys
    from pathlib import Path

    def snapshot():
        import keras
        loggers = {name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled)
                   for name, lg in logging.Logger.manager.loggerDict.items() if isinstance(lg, logging.Logger)}
        return (list(logging.root.handlers), logging.root.level, socket.getdefaulttimeout(), keras.config.dtype_policy().name, loggers)

    def same(before, after, what):
        root_handlers, root_level, timeout, policy, loggers = after
        assert (root_handlers, root_level) == before[:2], f"{what} changed the root logger"
        assert timeout == before[2], f"{what} changed socket.getdefaulttimeout() to {timeout}"
        assert policy == before[3], f"{what} changed the global dtype policy to {policy}"
        for name, state in loggers.items():
            if name in before[4]:
                assert state == before[4][name], f"{what} changed the logger {name}: {state}"
            elif name.startswith("keras_vit"):
                assert state == (logging.NOTSET, [], True, False), f"{what} configured the logger {name}: {state}"
        print("unchanged after", what, flush=True)
"""


@pytest.mark.slow
def test_import_and_library_calls_leave_global_state_as_they_found_it(tmp_path):
    output = _run(STATE + """
    import keras, keras_tuner, numpy as np, tensorflow as tf  # third-party imports: their own business
    keras.config.set_dtype_policy("mixed_bfloat16")  # not the default: every call must leave it so
    socket.setdefaulttimeout(123.0)
    before = snapshot()
    import keras_vit
    from keras_vit.pretrained import download
    from keras_vit.train import runner, settings, trainer as training
    same(before, snapshot(), "import")

    model = keras_vit.create_model("Ti/16", image_size=32, classes=3, num_layers=1)
    same(before, snapshot(), "create_model")

    source = Path(sys.argv[1]) / "source.bin"
    source.write_bytes(b"weights")
    import os
    os.environ["KERAS_VIT_CACHE"] = str(Path(sys.argv[1]) / "cache")
    download.fetch(source.as_uri())
    same(before, snapshot(), "weights.fetch")

    keras.config.set_dtype_policy("float32")
    tiny = keras_vit.vision_transformer(8, 4, 8, 1, 2, 16, classes=3, channels=1)
    keras.config.set_dtype_policy("mixed_bfloat16")
    images = np.zeros((8, 8, 8, 1), "float32"); labels = np.eye(3, dtype="float32")[np.arange(8) % 3]
    trainer = training.Trainer(tiny, keras.optimizers.SGD(0.1), tf.distribute.get_strategy(), 8, jit_compile=False)
    trainer.fit(tf.data.Dataset.from_tensors((images, labels)).repeat(), 3, eval_every=1)
    same(before, snapshot(), "Trainer.fit")

    config = settings.load_config(settings.FINETUNE, None, [
        "model=Ti/16", 'model_overrides={"patch_size": 4, "hidden_size": 8, "num_layers": 1, "num_heads": 2, "mlp_dim": 16, "channels": 1}',
        "image_size=8", "batch_size=16", "steps=2", "warmup_steps=1", "precision=float32", "eval_every=2",
        "checkpoint_every=2", "log_every=1", "weights=null", "cache=false", f"output_dir={Path(sys.argv[1]) / 'run'}"])
    report = runner.run(config)
    assert report["precision"] == "float32" and report["steps"] == 2
    same(before, snapshot(), "runner.run")
    """, tmp_path)
    for call in ("import", "create_model", "weights.fetch", "Trainer.fit", "runner.run"):
        assert f"unchanged after {call}" in output, output
