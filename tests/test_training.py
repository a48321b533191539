"""Schedules, optimisation steps, strategies (default, mirrored, multi-worker) and resume after kill -9."""

import csv
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from conftest import REPO, graph_ancestors
from keras_vit.train import checkpointing, distribute, optimization, trainer as training

HELPER = Path(__file__).parent / "helpers" / "run_recipe.py"


def official_lr(step, base, total, warmup, decay, linear_end=1e-5):
    """vit_jax's create_learning_rate_schedule, written out in NumPy (step counted from 1)."""
    progress = np.clip((step - warmup) / float(total - warmup), 0.0, 1.0)
    if decay == "linear":
        lr = linear_end + (base - linear_end) * (1.0 - progress)
    else:
        lr = base * 0.5 * (1.0 + np.cos(np.pi * progress))
    return lr * np.minimum(1.0, step / warmup) if warmup else lr


@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 500])
def test_schedule_equals_the_official_formula(decay, warmup):
    schedule = optimization.WarmupDecay(0.03, 10_000, warmup, decay)
    for step in (1, 2, 250, 499, 500, 501, 1000, 5000, 9999, 10_000, 12_000):
        expected = official_lr(step, 0.03, 10_000, warmup, decay)
        assert float(schedule(step - 1)) == pytest.approx(expected, rel=1e-5, abs=1e-9), step
    config = schedule.get_config()
    assert optimization.WarmupDecay.from_config(config).get_config() == config


def _tiny_classifier():
    keras.utils.set_random_seed(1)
    return keras_vit.vision_transformer(8, 4, 8, 1, 2, 16, classes=3, channels=1)


def _batch():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (8, 8, 8, 1)).astype("float32")
    labels = np.eye(3, dtype="float32")[rng.integers(0, 3, 8)]
    return images, labels


def _one_step(model, accumulation_steps=1, grad_clip=None, lr=0.5):
    strategy = tf.distribute.get_strategy()
    optimizer = keras.optimizers.SGD(lr)
    trainer = training.Trainer(model, optimizer, strategy, 8, grad_clip=grad_clip, accumulation_steps=accumulation_steps, jit_compile=False)
    images, labels = _batch()
    dataset = tf.data.Dataset.from_tensors((images, labels)).repeat()
    trainer.train_steps(iter(strategy.experimental_distribute_dataset(dataset)), 1)
    return [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]


def test_clipped_sgd_step_equals_a_manual_update():
    model = _tiny_classifier()
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    images, labels = _batch()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.categorical_crossentropy(labels, model(images, training=True), from_logits=True))
    grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
    norm = np.sqrt(sum((g.astype("float64") ** 2).sum() for g in grads))
    clip = norm / 4  # make sure clipping is active
    after = _one_step(model, grad_clip=clip)
    for w0, w1, g in zip(before, after, grads):
        np.testing.assert_allclose(w1, w0 - 0.5 * g * (clip / norm), atol=1e-6)


def test_gradient_accumulation_equals_the_full_batch_update():
    full = _one_step(_tiny_classifier(), accumulation_steps=1)
    accumulated = _one_step(_tiny_classifier(), accumulation_steps=4)
    for a, b in zip(full, accumulated):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _trainer_of(model, **kwargs):
    return training.Trainer(model, keras.optimizers.SGD(0.5), tf.distribute.get_strategy(), 8, jit_compile=False, **kwargs)


def test_integer_labels_train_as_their_one_hot_labels():
    images, one_hot = _batch()
    ids = one_hot.argmax(1)
    results = []
    for labels in (one_hot, ids.astype("int32"), ids[:, None].astype("int64")):
        trainer = _trainer_of(_tiny_classifier(), label_smoothing=0.1)
        data = tf.data.Dataset.from_tensors((images, labels))
        history = trainer.fit(data.repeat(), 2, eval_dataset=data, eval_every=1).history
        results.append((history["loss"], history["val_accuracy"], [keras.ops.convert_to_numpy(v) for v in trainer.model.trainable_variables]))
    for loss, accuracy, weights in results[1:]:
        assert loss == results[0][0] and accuracy == results[0][1]
        for a, b in zip(weights, results[0][2]):
            np.testing.assert_array_equal(a, b)


def test_an_empty_evaluation_dataset_is_refused_before_the_first_step():
    images, labels = _batch()
    trainer = _trainer_of(_tiny_classifier())
    train = tf.data.Dataset.from_tensors((images, labels)).repeat()
    for empty in (tf.data.Dataset.from_tensor_slices((images[:0], labels[:0])).batch(4),
                  tf.data.Dataset.from_tensor_slices((images, labels)).filter(lambda x, y: False).batch(4)):  # cardinality unknown
        with pytest.raises(ValueError) as raised:
            trainer.fit(train, 2, eval_dataset=empty)
        assert "eval_dataset holds no examples" in str(raised.value)
        assert int(keras.ops.convert_to_numpy(trainer.optimizer.iterations)) == 0
        with pytest.raises(ValueError):
            trainer.evaluate(empty)


@pytest.mark.parametrize("compile_update", [False, True])
def test_update_computes_nothing_weight_sized_before_the_gradients_exist(compile_update):
    # Under XLA the gradients come from one call; the graph executor would start the update's parts that do
    # not read them (the decoupled weight decay's variable-sized products) while that call holds the step's
    # activations. Every weight-shaped tensor the update computes must depend on the call; an update compiled
    # on its own is one call that takes every gradient as an input (it starts once they all exist).
    model = _tiny_classifier()
    optimizer = optimization.make_optimizer("adam", 1e-3, weight_decay=0.1)
    trainer = training.Trainer(model, optimizer, tf.distribute.get_strategy(), 8, jit_compile=True,
                               compile_update=compile_update)
    images, labels = _batch()
    graph = tf.function(trainer._replica_step).get_concrete_function(
        tf.TensorSpec(images.shape), tf.TensorSpec(labels.shape)
    ).graph
    operations = graph.get_operations()
    calls = {name: [op for op in operations if name in op.node_def.attr["f"].func.name]
             for name in ("_gradients_fn", "_update_fn")}
    (gradients,) = calls["_gradients_fn"]
    assert len(calls["_update_fn"]) == int(compile_update)
    if compile_update:
        (update,) = calls["_update_fn"]
        read = {t.op.name for t in update.inputs if t.dtype.is_floating}
        assert len(read) == 1 and gradients.name in graph_ancestors([update])  # all floats it reads: the gradients
        assert len(update.inputs) >= len(model.trainable_variables)
        return
    shapes = {tuple(v.shape) for v in model.trainable_variables if np.prod(v.shape) > 1}
    weight_sized = [
        op for op in operations
        if op.type not in ("Placeholder", "ReadVariableOp", "Identity", "Const") and op is not gradients
        and any(t.dtype.is_floating and tuple(t.shape.as_list() or ()) in shapes for t in op.outputs)
    ]
    assert len(weight_sized) > len(shapes)  # the update's products were found
    early = [op.name for op in weight_sized if gradients.name not in graph_ancestors([op])]
    assert not early, early


def test_default_strategy_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="keras_vit"):
        logger = logging.getLogger("keras_vit")
        logger.addHandler(caplog.handler)
        try:
            strategy = distribute.get_strategy()
        finally:
            logger.removeHandler(caplog.handler)
    assert strategy.num_replicas_in_sync == 1
    (line,) = {r.getMessage() for r in caplog.records if r.name == "keras_vit.train.distribute"}
    assert "_DefaultDistributionStrategy" in line and "1 replica" in line


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_tpu_fails_fast():
    start = time.monotonic()
    address = f"grpc://127.0.0.1:{_free_port()}"
    with pytest.raises(ConnectionError) as raised:
        distribute.get_strategy("tpu", tpu=address, timeout=2)
    assert address in str(raised.value) and "\n" not in str(raised.value)
    assert time.monotonic() - start < 10


def _helper(args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, str(HELPER), *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}, **kwargs,
    )


def _finish(process, timeout=300):
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def _checkpoint_weights(folder):
    """{key: array} of every model variable in the latest checkpoint under ``folder``."""
    return checkpointing.read(checkpointing.CheckpointManager(folder).latest_checkpoint, "model")


@pytest.mark.slow
def test_mirrored_strategy_over_two_cpu_devices(tmp_path):
    output = _finish(_helper(["--logical-cpus", "2", "strategy=mirrored", f"output_dir={tmp_path}"]))
    assert "replicas=2" in output and "strategy=MirroredStrategy" in output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["replicas"] == 2 and np.isfinite(report["history"][-1]["loss"])
    assert keras.models.load_model(tmp_path / "model.keras").output.shape == (None, 10)


@pytest.mark.slow
def test_multi_worker_mirrored_two_processes_end_identical(tmp_path):
    ports = [_free_port(), _free_port()]
    workers = []
    for index in range(2):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": index}}
        workers.append(_helper(["strategy=auto", f"output_dir={tmp_path}"], env={"TF_CONFIG": json.dumps(tf_config)}))
    outputs = [_finish(worker) for worker in workers]
    assert all("strategy=CollectiveAllReduceStrategy" in output and "replicas=2" in output for output in outputs)  # MultiWorkerMirroredStrategy
    chief = _checkpoint_weights(tmp_path / "checkpoints")
    other = _checkpoint_weights(tmp_path / "checkpoints" / "workers" / "worker_1")
    assert chief.keys() == other.keys() and len(chief) > 5
    for name in chief:
        np.testing.assert_array_equal(chief[name], other[name], err_msg=name)
    assert (tmp_path / "model.keras").exists() and not list((tmp_path / "checkpoints" / "workers").rglob("*.keras"))


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_and_ends_with_the_uninterrupted_weights(tmp_path):
    settings = ["deterministic=true", "steps=12"]
    reference = tmp_path / "uninterrupted"
    _finish(_helper([*settings, f"output_dir={reference}"]))

    interrupted = tmp_path / "interrupted"
    command = [*settings, f"output_dir={interrupted}"]
    process = _helper(["--pause-after-checkpoint", "120", *command])
    for line in process.stdout:
        if "checkpoint written" in line:
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert (interrupted / "checkpoints" / "checkpoint").read_text() == "ckpt-4"
    output = _finish(_helper(command))
    assert f"Restored step 4 from {interrupted / 'checkpoints' / 'ckpt-4'}" in output
    resumed, expected = _checkpoint_weights(interrupted / "checkpoints"), _checkpoint_weights(reference / "checkpoints")
    assert resumed.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)
    with open(interrupted / "history.csv") as file:
        rows = list(csv.DictReader(file))  # CSVLogger: one row per evaluation interval, none repeated
    assert [(row["epoch"], float(row["step"])) for row in rows] == [("0", 4), ("1", 8), ("2", 12)]


def _adamw_run(compile_update, steps=3, policy=None):
    """(losses, gradient norms, weights) of ``steps`` clipped AdamW steps with EMA on the tiny classifier."""
    model = _tiny_classifier() if policy is None else _tiny_classifier_in(policy)
    optimizer = optimization.make_optimizer("adam", 1e-2, weight_decay=0.1, ema_decay=0.9)
    trainer = training.Trainer(model, optimizer, tf.distribute.get_strategy(), 8, grad_clip=0.2, jit_compile=False,
                               compile_update=compile_update)
    batches = iter(tf.distribute.get_strategy().experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(_batch()).repeat()))
    losses, norms = [], []
    for _ in range(steps):
        loss, _, norm = trainer.train_steps(batches, 1)
        losses.append(float(loss))
        norms.append(float(norm))
    return losses, norms, [keras.ops.convert_to_numpy(v) for v in model.trainable_variables + optimizer.variables]


def _tiny_classifier_in(policy):
    keras.config.set_dtype_policy(policy)
    try:
        return _tiny_classifier()
    finally:
        keras.config.set_dtype_policy("float32")


def test_the_update_compiled_on_its_own_equals_the_graph_update():
    assert training.default_compile_update(tf.distribute.get_strategy())
    plain, compiled = _adamw_run(False), _adamw_run(True)
    np.testing.assert_allclose(compiled[0], plain[0], rtol=1e-6)
    np.testing.assert_allclose(compiled[1], plain[1], rtol=1e-6)
    assert plain[1][0] > 0.2  # the clipping was active
    for a, b in zip(compiled[2], plain[2]):  # weights, moments, EMA averages, iteration count
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_training_with_the_compiled_update_follows_the_graph_update():
    plain, compiled = _adamw_run(False, steps=5, policy="mixed_bfloat16"), _adamw_run(True, steps=5, policy="mixed_bfloat16")
    np.testing.assert_allclose(compiled[0], plain[0], rtol=1e-2)  # bfloat16: 8 bits of mantissa
    np.testing.assert_allclose(compiled[1], plain[1], rtol=2e-2)
    assert plain[0][-1] < plain[0][0]


def test_bfloat16_step_reads_and_casts_each_weight_once():
    # Keras casts a float32 variable to the compute dtype where a layer reads it: each weight must be read (and
    # cast) once per step, its bfloat16 copy shared by the forward and the backward pass.
    model = _tiny_classifier_in("mixed_bfloat16")
    trainer = training.Trainer(model, keras.optimizers.SGD(0.1), tf.distribute.get_strategy(), 8, jit_compile=False)
    images, labels = _batch()
    graph = trainer._gradients.get_concrete_function(tf.TensorSpec(images.shape), tf.TensorSpec(labels.shape)).graph
    reads = {}
    for op in graph.get_operations():
        if op.type == "ReadVariableOp":
            reads.setdefault(op.inputs[0].name, []).append(op)
    assert len(reads) == len(model.trainable_variables)
    assert all(len(ops) == 1 for ops in reads.values()), {k: len(v) for k, v in reads.items() if len(v) > 1}
    casts = [consumer for (op,) in reads.values() for consumer in op.outputs[0].consumers() if consumer.type == "Cast"]
    assert len(casts) <= len(reads) and all(c.outputs[0].dtype == tf.bfloat16 for c in casts)
    assert len(casts) > len(reads) // 2  # most weights compute in bfloat16 (LayerNorm's stay float32)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training_steps(policy):
    keras.config.set_dtype_policy(policy)
    try:
        model = _tiny_classifier()
        optimizer = optimization.make_optimizer("sgd", 0.1, loss_scale=policy == "mixed_float16")
        trainer = training.Trainer(model, optimizer, tf.distribute.get_strategy(), 8, grad_clip=1.0, jit_compile=False)
        before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
        images, labels = _batch()
        history = trainer.fit(tf.data.Dataset.from_tensors((images, labels)).repeat(), 3, eval_every=1).history
    finally:
        keras.config.set_dtype_policy("float32")
    assert len(history["loss"]) == 3 and np.isfinite(history["loss"]).all()
    assert all(v.dtype == "float32" for v in model.trainable_variables)
    assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
    moved = [not np.array_equal(a, keras.ops.convert_to_numpy(b)) for a, b in zip(before, model.trainable_variables)]
    assert sum(moved) > len(moved) // 2


@pytest.mark.parametrize(
    "flags, native", [("fpu avx2 avx512f avx512_bf16 fma", True), ("fpu amx_bf16 amx_tile", True), ("fpu avx2 fma", False)]
)
def test_bfloat16_cpu_detection_and_default_precision(tmp_path, monkeypatch, flags, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    assert distribute.cpu_has_bfloat16(str(cpuinfo)) is native
    assert distribute.cpu_has_bfloat16(str(tmp_path / "missing")) is False
    monkeypatch.setattr(distribute, "cpu_has_bfloat16", lambda: native)
    expected = "mixed_bfloat16" if native else "float32"
    assert distribute.default_precision(tf.distribute.get_strategy()) == expected


@pytest.mark.parametrize("backend", ["tensorflow", "torch", "jax"])
@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_on_a_cpu_follows_the_measured_rule_per_backend(monkeypatch, backend, native):
    # bfloat16 only where the CPU has native bfloat16 products and the backend reaches them (oneDNN: TensorFlow,
    # PyTorch); JAX's XLA computes bfloat16 products on CPUs in float32, slower than float32 (benchmarks/RESULTS.md).
    from keras_vit.train import building

    monkeypatch.setattr(distribute, "cpu_has_bfloat16", lambda: native)
    monkeypatch.setattr(building, "_accelerator", lambda name: "cpu")
    expected = "mixed_bfloat16" if native and backend != "jax" else "float32"
    assert building.default_precision(backend, tf.distribute.get_strategy()) == expected
    monkeypatch.setattr(building, "_accelerator", lambda name: "gpu")
    if backend != "tensorflow":  # TensorFlow asks its own device list (the test above)
        assert building.default_precision(backend) == "mixed_float16"


@pytest.mark.parametrize("policy, xla", [("float32", True), ("mixed_bfloat16", False)])
def test_default_xla_setting_on_cpu(policy, xla):
    # bfloat16 products under XLA on CPUs run in float32 and lose to oneDNN's (benchmarks/RESULTS.md).
    keras.config.set_dtype_policy(policy)
    try:
        model = _tiny_classifier()
    finally:
        keras.config.set_dtype_policy("float32")
    assert training.default_jit_compile(tf.distribute.get_strategy(), model) is xla
