"""Layouts of a ViT on a device mesh (``keras_vit.layout_map``) and the recipes' JAX strategies.

The layout rules run on every backend (meshes of device names). The tests on devices need JAX with 8 devices,
which XLA makes of one CPU when told before JAX starts; CI runs them in a pytest invocation of their own:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax python -m pytest -q tests/test_sharding.py

The slow test starts two JAX processes (``jax.distributed`` on localhost, 2 CPU devices each) from any backend.
"""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_vit
from conftest import REPO, TINY_RUN
from keras_vit.distribution import MIN_SHARD_BYTES, bytes_per_device, layout_map, model_parallel, variable_shapes

ON_JAX = keras.backend.backend() == "jax"
DEVICES = 8
HELPER = Path(__file__).parent / "helpers" / "run_recipe.py"

TINY = dict(image_size=16, patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, classes=8)
ARCHITECTURES = {  # plain, hybrid, MAP head with registers and a representation layer, no head
    "plain": TINY,
    "hybrid": {**TINY, "resnet_layers": (1, 2), "patch_size": 1, "resnet_width_factor": 0.5},
    "map_registers": {**TINY, "classifier": "map", "num_register_tokens": 4, "representation_size": 24},
    "gap_sincos_no_top": {**TINY, "classifier": "gap", "posemb": "sincos2d", "include_top": False, "pooling": "max"},
}


def _mesh(shape, names, devices=None):
    return keras.distribution.DeviceMesh(shape, names, devices or [f"cpu:{i}" for i in range(math.prod(shape))])


def _devices():
    if not ON_JAX:
        return 0
    import jax

    return jax.device_count()


on_8_devices = pytest.mark.skipif(
    _devices() < DEVICES,
    reason="needs JAX with 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 KERAS_BACKEND=jax",
)


# --- the rules (every backend) -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_an_architecture_lists_the_variables_its_model_has(kind):
    model = keras_vit.VisionTransformer(**ARCHITECTURES[kind], dropout_rate=0.1)
    built = {v.path: tuple(v.shape) for v in model.variables if "seed_generator" not in v.path}
    assert variable_shapes(model.architecture) == built


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("strategy", ["data", "fsdp", "tensor"])
def test_every_variable_has_its_exact_path_in_the_map(kind, strategy):
    model = keras_vit.VisionTransformer(**ARCHITECTURES[kind], dropout_rate=0.1)
    mesh = _mesh((2, 4), ("batch", "model"))
    layouts = layout_map(model, mesh, strategy)
    assert list(layouts) == [v.path for v in model.variables]  # seed states included
    from_architecture = layout_map(model.architecture, mesh, strategy)
    assert {p: layouts[p].axes for p in from_architecture} == {p: from_architecture[p].axes for p in from_architecture}


def test_fsdp_splits_the_largest_dimension_the_axis_divides_above_big_vision_s_threshold():
    mesh = _mesh((8,), ("batch",))
    arch = keras_vit.Architecture.from_arguments(**{**TINY, "hidden_size": 256, "mlp_dim": 4104, "num_heads": 8})
    layouts = layout_map(arch, mesh, "fsdp")
    # (256, 4104) float32 is 4.2 MB > 4 MiB: the largest dimension 4104 = 8 x 513
    assert layouts["encoderblock_0/Dense_0/kernel"].axes == (None, "batch")
    assert layouts["encoderblock_0/Dense_1/kernel"].axes == ("batch", None)
    assert layouts["encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].axes == (None,) * 3  # 256 KiB
    assert MIN_SHARD_BYTES == 4 * 2**20
    every = layout_map(arch, mesh, "fsdp", min_shard_bytes=0)
    assert every["encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].axes == ("batch", None, None)
    assert every["encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"].axes == (None, None, "batch")  # ties: last
    assert every["posembed_input/pos_embedding"].axes == (None, None, "batch")  # (1, 17, 256): 17 is not divisible
    assert every["head/bias"].axes == ("batch",)
    odd = layout_map(keras_vit.Architecture.from_arguments(**{**TINY, "classes": 7}), mesh, "fsdp", min_shard_bytes=0)
    assert odd["head/bias"].axes == (None,)  # 7 classes: no dimension the axis divides


def test_tensor_parallelism_splits_heads_and_mlp_columns_megatron_style():
    mesh = _mesh((2, 4), ("batch", "model"))
    layouts = layout_map(keras_vit.Architecture.from_arguments(**ARCHITECTURES["map_registers"]), mesh, "tensor")
    for scope in ("encoderblock_1/MultiHeadDotProductAttention_1", "pool/MultiHeadDotProductAttention_0"):
        for projection in ("query", "key", "value"):
            assert layouts[f"{scope}/{projection}/kernel"].axes == (None, "model", None)
            assert layouts[f"{scope}/{projection}/bias"].axes == ("model", None)
        assert layouts[f"{scope}/out/kernel"].axes == ("model", None, None)
        assert layouts[f"{scope}/out/bias"].axes == (None,)
    for scope in ("encoderblock_0", "pool"):
        assert layouts[f"{scope}/Dense_0/kernel"].axes == (None, "model")
        assert layouts[f"{scope}/Dense_0/bias"].axes == ("model",)
        assert layouts[f"{scope}/Dense_1/kernel"].axes == ("model", None)
        assert layouts[f"{scope}/Dense_1/bias"].axes == (None,)
    split = {path for path in layouts if any(layouts[path].axes)}
    assert all("MultiHeadDotProductAttention" in p or "Dense_" in p for p in split)
    assert {"reg/registers", "pool/probe", "head/kernel", "pre_logits/kernel", "embedding/projection/kernel"} <= set(layouts) - split


def test_what_a_mesh_cannot_split_is_refused_naming_it():
    arch = keras_vit.Architecture.from_arguments(**TINY)  # 4 heads
    with pytest.raises(ValueError, match="query/kernel"):
        layout_map(arch, _mesh((1, 8), ("batch", "model")), "tensor")
    with pytest.raises(ValueError, match="no axis 'model'"):
        layout_map(arch, _mesh((8,), ("batch",)), "tensor")
    with pytest.raises(ValueError, match="batch axis"):
        layout_map(arch, _mesh((4,), ("model",)), "tensor")
    with pytest.raises(ValueError, match="strategy"):
        layout_map(arch, _mesh((8,), ("batch",)), "zero3")
    with pytest.raises(TypeError, match="Architecture"):
        layout_map("B/16", _mesh((8,), ("batch",)), "data")


def test_bytes_per_device_divide_each_variable_by_its_split():
    arch = keras_vit.Architecture.from_arguments(**TINY)
    shapes = variable_shapes(arch)
    total = sum(math.prod(s) for s in shapes.values()) * 4
    mesh = _mesh((2, 4), ("batch", "model"))
    assert bytes_per_device(layout_map(arch, mesh, "data"), shapes) == total
    split = {p for p in shapes if "Dense_0" in p or "Dense_1/kernel" in p or ("MultiHead" in p and "out/bias" not in p)}
    expected = total - sum(math.prod(shapes[p]) * 4 * 3 // 4 for p in split)
    assert bytes_per_device(layout_map(arch, mesh, "tensor"), shapes) == expected


# --- the recipes' settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tensorflow", "torch"])
@pytest.mark.parametrize("strategy", ["jax_data", "jax_fsdp", "jax_tensor"])
def test_jax_strategies_are_refused_off_jax_in_one_line(backend, strategy):
    from keras_vit.train import settings

    config = settings.load_config(settings.FINETUNE, None, [f"strategy={strategy}"])
    with pytest.raises(settings.SettingError) as refused:
        settings.validate(config, backend)
    assert f"strategy={strategy!r}" in str(refused.value) and "\n" not in str(refused.value)
    settings.validate(config, "jax")


def test_a_run_refuses_a_jax_strategy_before_anything_starts_off_jax(tmp_path):
    if ON_JAX:
        pytest.skip("the refusal is the other backends'")
    from keras_vit.train import runner, settings

    config = settings.load_config(settings.FINETUNE, None, TINY_RUN + ["strategy=jax_fsdp", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(settings.SettingError, match="strategy='jax_fsdp'"):
        runner.run(config)
    assert not (tmp_path / "run").exists()


def test_mesh_shape_belongs_to_the_jax_strategies():
    from keras_vit.train import settings

    with pytest.raises(settings.SettingError, match="mesh_shape"):
        settings.load_config(settings.FINETUNE, None, ["mesh_shape=[2, 4]"])
    with pytest.raises(settings.SettingError, match="mesh_shape"):
        settings.load_config(settings.FINETUNE, None, ["strategy=jax_tensor", "mesh_shape=[2, 0]"])
    assert settings.upgrade({"strategy": "auto"}, 3)["mesh_shape"] is None  # folders of schema 3 resume


@on_8_devices
@pytest.mark.parametrize("overrides, named", [
    (["strategy=jax_tensor", "mesh_shape=[2, 3]"], "mesh_shape"),
    (["strategy=jax_fsdp", "mesh_shape=[2, 4]"], "mesh_shape"),
    (["strategy=jax_data", "batch_size=12"], "batch_size"),
])
def test_a_mesh_the_devices_cannot_form_is_refused_naming_the_setting(overrides, named):
    from keras_vit.train import building, settings

    config = settings.load_config(settings.FINETUNE, None, TINY_RUN + overrides)
    with pytest.raises(settings.SettingError, match=named):
        building.setup(config)


# --- on 8 devices (JAX) --------------------------------------------------------------------------------------------


def _spec(variable):
    import jax

    sharding = variable.value.sharding
    assert isinstance(sharding, jax.sharding.NamedSharding), variable.path
    return tuple(sharding.spec) + (None,) * (len(variable.shape) - len(sharding.spec))


MESHES = {"data": ((8,), ("batch",)), "fsdp": ((8,), ("batch",)), "tensor": ((2, 4), ("batch", "model"))}


@on_8_devices
@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
@pytest.mark.parametrize("strategy", sorted(MESHES))
def test_variables_and_optimizer_slots_are_sharded_as_declared(kind, strategy):
    mesh = keras.distribution.DeviceMesh(*MESHES[strategy])
    arch = keras_vit.Architecture.from_arguments(**ARCHITECTURES[kind])
    layouts = layout_map(arch, mesh, strategy, min_shard_bytes=0)
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    by_rule = {}
    for distribution in (keras.distribution.ModelParallel(layout_map=layouts, batch_dim_name="batch"),
                         model_parallel(mesh, strategy, min_shard_bytes=0)):
        with distribution.scope():
            model = keras_vit.VisionTransformer(**ARCHITECTURES[kind])
            optimizer = keras.optimizers.Adam()
            optimizer.build(model.trainable_variables)
        for variable in model.variables:
            spec = _spec(variable)
            assert spec == layouts[variable.path].axes, variable.path
            parts = [sizes[a] if a else 1 for a in spec]
            shard = variable.value.addressable_shards[0].data.shape
            assert shard == tuple(side // part for side, part in zip(variable.shape, parts)), variable.path
        slots = [v for v in optimizer.variables if v.path.endswith(("_momentum", "_velocity"))]
        assert len(slots) == 2 * len(model.trainable_variables)
        for slot in slots:
            reference = slot.path.split("/", 1)[1].rsplit("_", 1)[0]
            assert _spec(slot) == layouts[next(p for p in layouts if p.replace("/", "_") == reference)].axes
        by_rule[len(by_rule)] = {v.path: _spec(v) for v in model.variables}
    assert by_rule[0] == by_rule[1]
    if strategy != "data":
        assert any(any(spec) for spec in by_rule[0].values())


# A model whose MLP kernels (128, 8256) exceed big_vision's 4 MiB, so that the recipes' FSDP splits them.
SHARDED_MODEL = {"patch_size": 2, "hidden_size": 128, "num_layers": 1, "num_heads": 4, "mlp_dim": 8256, "channels": 1}
SHARDED_SETTINGS = ["steps=20", "batch_size=16", "optimizer=adam", "base_lr=0.001"]
SHARDED_RUN = TINY_RUN + [f"model_overrides={json.dumps(SHARDED_MODEL)}", *SHARDED_SETTINGS, "eval_every=10",
                          "checkpoint_every=10"]
RECIPE_MESHES = {"auto": [], "jax_data": [], "jax_fsdp": [], "jax_tensor": ["mesh_shape=[2, 4]"]}


class _Losses(keras.callbacks.Callback):
    """The batch losses (Keras' running mean over each interval) and the step they were logged at."""

    def __init__(self, stop_at_interval=None):
        super().__init__()
        self.losses, self.stop_at_interval = {}, stop_at_interval

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.stop_at_interval:
            raise KeyboardInterrupt  # as a kill after the checkpoint before this interval

    def on_train_batch_end(self, batch, logs=None):
        self.losses[logs["step"]] = float(logs["loss"])


def _recipe_run(strategy, folder, stop_at_interval=None, evaluate=False):
    """Trains SHARDED_RUN as the runner does (setup, keras.distribution for the run, assemble, fit)."""
    from keras_vit.train import building, settings

    config = settings.load_config(settings.FINETUNE, None, SHARDED_RUN + [f"strategy={strategy}", *RECIPE_MESHES[strategy]])
    environment = building.setup(config)
    losses = _Losses(stop_at_interval)
    with environment.distributed():
        loop, prepared = building.assemble(config, environment)
        try:
            loop.fit(prepared.train_dataset, config["steps"], eval_every=config["eval_every"], callbacks=[losses],
                     checkpoint_dir=folder, checkpoint_every=config["checkpoint_every"], run_id="r")
        except KeyboardInterrupt:
            pass
        accuracy = loop.evaluate(prepared.eval_dataset) if evaluate else None
    weights = {v.path: keras.ops.convert_to_numpy(v) for v in loop.model.variables}
    specs = {v.path: _spec(v) for v in loop.model.variables} if strategy != "auto" else {}
    return dict(losses=losses.losses, weights=weights, specs=specs, accuracy=accuracy)


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory):
    if _devices() < DEVICES:
        pytest.skip("needs JAX with 8 devices")
    root = tmp_path_factory.mktemp("sharded")
    return {strategy: _recipe_run(strategy, root / strategy, evaluate=strategy in ("auto", "jax_fsdp"))
            for strategy in RECIPE_MESHES}


def _assert_adam_weights_close(actual, expected, path):
    """Sharded and single-device weights after the same Adam steps: equal up to the summation order of gradients.

    Adam divides each gradient by its own running scale, so an element whose gradient is reduction-order noise
    (~1e-9) can move by a visible fraction of the learning rate: at most 1 element in 10,000 may be off by more
    than 2e-6, and none by more than 1e-4.
    """
    difference = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
    allowed = 2e-6 + 1e-4 * np.abs(expected)
    assert np.mean(difference > allowed) <= 1e-4, (path, float(difference.max()))
    assert difference.max() <= 1e-4, (path, float(difference.max()))


@on_8_devices
@pytest.mark.parametrize("strategy", ["jax_data", "jax_fsdp", "jax_tensor"])
def test_a_recipe_s_20_steps_equal_the_single_device_run(recipe_runs, strategy):
    reference, run = recipe_runs["auto"], recipe_runs[strategy]
    assert sorted(run["losses"]) == list(range(1, 21))
    losses = np.array([run["losses"][step] for step in range(1, 21)])
    expected = np.array([reference["losses"][step] for step in range(1, 21)])
    np.testing.assert_allclose(losses, expected, rtol=2e-6, atol=0)
    for path, value in reference["weights"].items():
        _assert_adam_weights_close(run["weights"][path], value, path)
    kernels = {path: spec for path, spec in run["specs"].items() if path.endswith(("Dense_0/kernel", "Dense_1/kernel"))}
    expected_specs = {"jax_data": [(None, None)] * 2, "jax_fsdp": [(None, "batch"), ("batch", None)],
                      "jax_tensor": [(None, "model"), ("model", None)]}[strategy]
    assert list(kernels.values()) == expected_specs


@on_8_devices
def test_evaluation_on_a_mesh_counts_every_example_once(recipe_runs):
    # 360 test digits in batches of 16: the last batch is filled up with 8 zero-weight images for the mesh
    assert recipe_runs["jax_fsdp"]["accuracy"] == pytest.approx(recipe_runs["auto"]["accuracy"], abs=1e-7)
    assert round(recipe_runs["auto"]["accuracy"] * 360, 4) == int(round(recipe_runs["auto"]["accuracy"] * 360))


@on_8_devices
@pytest.mark.parametrize("strategy", ["jax_fsdp", "jax_tensor"])
def test_a_resumed_sharded_run_continues_exactly(recipe_runs, tmp_path, strategy):
    stopped = _recipe_run(strategy, tmp_path, stop_at_interval=1)
    assert sorted(stopped["losses"]) == list(range(1, 11))
    assert (tmp_path / "checkpoint").read_text() == "ckpt-10"
    resumed = _recipe_run(strategy, tmp_path)
    uninterrupted = recipe_runs[strategy]
    assert sorted(resumed["losses"]) == list(range(11, 21))
    assert [resumed["losses"][s] for s in range(11, 21)] == [uninterrupted["losses"][s] for s in range(11, 21)]
    for path, value in uninterrupted["weights"].items():
        np.testing.assert_array_equal(resumed["weights"][path], value, err_msg=path)
    assert resumed["specs"] == uninterrupted["specs"]


# --- two processes (slow) ------------------------------------------------------------------------------------------


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process(index, port, overrides, pause=0):
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
           "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": str(index)}
    extra = ["--pause-after-checkpoint", str(pause)] if pause else []
    return subprocess.Popen([sys.executable, str(HELPER), *extra, *overrides], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_processes(overrides, pause=0):
    port = _free_port()
    return [_process(i, port, overrides, pause) for i in range(2)]


def _finish(processes):
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-4000:]
    return outputs


def _checkpoint(folder):
    from keras_vit.train import checkpointing

    latest = checkpointing.CheckpointManager(folder).latest_checkpoint
    return checkpointing.read(latest), json.loads((latest / "state.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["jax_fsdp"])  # weights split across the processes; jax_tensor passes too (minutes)
def test_two_jax_processes_train_as_one_device_and_resume_after_kill_9(tmp_path, strategy):
    common = [f"model_overrides={json.dumps({**SHARDED_MODEL, 'dropout_rate': 0.1})}", *SHARDED_SETTINGS,
              "eval_every=5", "checkpoint_every=5"]
    mesh = ["mesh_shape=[2, 2]"] if strategy == "jax_tensor" else []
    single = tmp_path / "single"
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(HELPER), *common, f"output_dir={single}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    interrupted = tmp_path / "two"
    command = [*common, f"strategy={strategy}", *mesh, f"output_dir={interrupted}"]
    processes = _two_processes(command, pause=600)
    for line in processes[0].stdout:
        if "checkpoint written" in line:
            break
    for p in processes:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert (interrupted / "checkpoints" / "checkpoint").read_text() == "ckpt-5"
    outputs = _finish(_two_processes(command))
    assert "Restored step 5" in outputs[0] and "Restored step 5" in outputs[1]
    replicas = 2 if strategy == "jax_tensor" else 4  # the batch axis: (2, 2) or all 4 devices
    assert f"replicas={replicas} " in outputs[0]

    two, state = _checkpoint(interrupted / "checkpoints")
    one, single_state = _checkpoint(single / "checkpoints")
    assert state["step"] == single_state["step"] == 20
    for path, value in one.items():
        np.testing.assert_allclose(two[path], value, rtol=1e-4, atol=2e-6, err_msg=path)
    rows = [json.loads(json.dumps(r)) for r in json.loads((interrupted / "report.json").read_text())["history"]]
    expected = json.loads((single / "report.json").read_text())["history"]
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [5, 10, 15, 20]
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in expected], rtol=2e-6)
    np.testing.assert_allclose([r["val_accuracy"] for r in rows], [r["val_accuracy"] for r in expected])
    assert (interrupted / "model.keras").exists() and not (interrupted / "workers" / "process_1" / "model.keras").exists()
    reloaded = keras.saving.load_model(interrupted / "model.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded.get_layer("head").kernel), two["head/kernel"])
