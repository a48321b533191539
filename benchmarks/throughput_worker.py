#!/usr/bin/env python3
"""One benchmark worker: builds one model in one framework, then times steps on command.

Started by ``benchmarks/throughput.py`` (one process per framework and cell, so
that each has its own peak memory and global precision policy). It imports only
its own framework, so a peer can run from another interpreter
(``--python timm=/path/to/python``). Protocol on stdin/stdout, one JSON line each:

    worker -> {"ready": true, "build_s": ..., "warmup_s": ...}
    "run"  -> {"seconds": <one step>}
    "quit" -> {"peak_rss_mb": ..., "base_rss_mb": ...}

The architecture arrives as JSON (``hidden_size``, ``num_layers``, ``num_heads``,
``mlp_dim``, ``patch_size``, ``image_size``, ``classes``), so no framework needs
keras_vit's variant table. Inputs are fixed random tensors; a training step is
one AdamW update on softmax cross-entropy.
"""

import argparse
import json
import os
import resource
import sys
import time


def rss_mb():
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# --- TensorFlow frameworks (keras_vit, keras-hub) -------------------------------------------------------------


def _tf_batch(spec, batch):
    import numpy as np

    rng = np.random.default_rng(0)
    size = spec["image_size"]
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    labels = np.eye(spec["classes"], dtype="float32")[rng.integers(0, spec["classes"], batch)]
    return images, labels


def _tf_forward(model, images, xla):
    """One inference step: ``model(images, training=False)`` in a ``tf.function``, XLA-compiled or not."""
    import tensorflow as tf

    forward = tf.function(lambda x: model(x, training=False), jit_compile=xla)
    images = tf.constant(images)
    return lambda: forward(images).numpy()


def build_keras_vit(spec, workload, batch, precision, xla, options):
    """keras_vit; options: builder arguments (``remat``; ``image_size`` [None, None] with ``native_image_size``
    for a model of any size) and ``loop``: ``"trainer"`` (default) or ``"fit"``."""
    import keras
    import tensorflow as tf

    import keras_vit
    from keras_vit.train import distribute, optimization, trainer as training

    options = dict(options)
    loop = options.pop("loop", "trainer")
    keras.mixed_precision.set_global_policy(precision)
    model = keras_vit.vision_transformer(**{**spec, **options})  # the spec's keys are the builder's arguments
    images, labels = _tf_batch(spec, batch)
    if workload == "inference":
        return _tf_forward(model, images, xla)
    optimizer = optimization.make_optimizer("adam", 1e-3, weight_decay=1e-4)
    if loop == "fit":  # what a Keras user runs: compile, then train_on_batch (one fit step)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.CategoricalCrossentropy(from_logits=True),
            metrics=[],
            jit_compile=xla,
        )
        return lambda: model.train_on_batch(images, labels)
    strategy = distribute.get_strategy("default")
    trainer = training.Trainer(model, optimizer, strategy, batch, jit_compile=xla)
    batches = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors((images, labels)).repeat()))
    return lambda: [t.numpy() for t in trainer.train_steps(batches, 1)]


def build_keras_hub(spec, workload, batch, precision, xla, options):
    import keras
    import keras_hub

    keras.mixed_precision.set_global_policy(precision)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(spec["image_size"], spec["image_size"], 3),
        patch_size=spec["patch_size"],
        num_layers=spec["num_layers"],
        num_heads=spec["num_heads"],
        hidden_dim=spec["hidden_size"],
        mlp_dim=spec["mlp_dim"],
    )
    model = keras_hub.models.ViTImageClassifier(backbone, num_classes=spec["classes"], preprocessor=None)
    images, labels = _tf_batch(spec, batch)
    if workload == "inference":
        return _tf_forward(model, images, xla)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[],
        jit_compile=xla,
    )
    classes = labels.argmax(-1)
    return lambda: model.train_on_batch(images, classes)


def build_keras_vit_backend(spec, workload, batch, precision, xla, options):
    """keras_vit on the backend of ``KERAS_BACKEND`` (torch or JAX; ``throughput.py`` sets it): inference
    ``predict_on_batch``, training ``model.compile`` + ``train_on_batch`` (Keras' own loop; on JAX XLA-compiled)."""
    import keras

    import keras_vit

    model = keras_vit.vision_transformer(**{**spec, **options}, dtype=precision)
    images, labels = _tf_batch(spec, batch)
    if workload == "inference":
        return lambda: model.predict_on_batch(images)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[],
    )
    return lambda: model.train_on_batch(images, labels)


# --- deployment engines (keras_vit's exports) -------------------------------------------------------------------


def build_exported(spec, workload, batch, precision, xla, options, engine):
    """keras_vit exported with ``keras_vit.export.export`` (verified against Keras there) and run by ``engine``:
    OpenVINO's CPU plugin (float32, or bfloat16 through its inference precision) or ONNX Runtime (float32)."""
    import tempfile

    import keras_vit
    from keras_vit import export

    if workload != "inference":
        raise ValueError(f"{engine} runs exported models: inference only")
    bfloat16 = "bfloat16" in precision
    if bfloat16 and engine == "onnxruntime":
        raise ValueError("onnxruntime runs the float32 export only (it has no bfloat16 kernels on CPUs)")
    model = keras_vit.vision_transformer(**spec)
    images, _ = _tf_batch(spec, batch)
    folder = tempfile.mkdtemp(prefix="keras_vit_engine_")
    if engine == "openvino":
        import openvino

        export.export(model, f"{folder}/vit.xml", "openvino", images=images[:2])
        hint = {"INFERENCE_PRECISION_HINT": "bf16" if bfloat16 else "f32"}
        request = openvino.Core().compile_model(f"{folder}/vit.xml", "CPU", hint).create_infer_request()
        return lambda: request.infer([images])
    import onnxruntime

    export.export(model, f"{folder}/vit.onnx", "onnx", images=images[:2])
    session = onnxruntime.InferenceSession(f"{folder}/vit.onnx", providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: images})


def build_openvino(*args):
    return build_exported(*args, engine="openvino")


def build_onnxruntime(*args):
    return build_exported(*args, engine="onnxruntime")


# --- PyTorch (timm) ---------------------------------------------------------------------------------------------


def build_timm(spec, workload, batch, precision, xla, options):
    import contextlib

    import torch
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=spec["image_size"],
        patch_size=spec["patch_size"],
        embed_dim=spec["hidden_size"],
        depth=spec["num_layers"],
        num_heads=spec["num_heads"],
        mlp_ratio=spec["mlp_dim"] / spec["hidden_size"],
        num_classes=spec["classes"],
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, spec["image_size"], spec["image_size"], generator=generator) * 2 - 1
    labels = torch.randint(0, spec["classes"], (batch,), generator=generator)
    if precision == "mixed_bfloat16":
        autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    if workload == "inference":
        model.eval()

        def forward():
            with torch.inference_mode(), autocast():
                return model(images)

        return forward
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


# --- matmul peak ------------------------------------------------------------------------------------------------


def build_matmul(spec, workload, batch, precision, xla, options):
    """A (n x n) @ (n x n) product with n = ``batch``; precision float32 or bfloat16 (mixed_* map to it)."""
    import tensorflow as tf

    dtype = tf.bfloat16 if "bfloat16" in precision else tf.float32
    a = tf.cast(tf.random.stateless_normal((batch, batch), seed=(0, 1)), dtype)
    b = tf.cast(tf.random.stateless_normal((batch, batch), seed=(0, 2)), dtype)
    product = tf.function(tf.matmul, jit_compile=xla)
    return lambda: product(a, b).numpy()


BUILDERS = {"keras_vit": build_keras_vit, "keras-hub": build_keras_hub, "timm": build_timm, "matmul": build_matmul,
            "keras_vit-torch": build_keras_vit_backend, "keras_vit-jax": build_keras_vit_backend,
            "openvino": build_openvino, "onnxruntime": build_onnxruntime}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=sorted(BUILDERS), required=True)
    parser.add_argument("--spec", required=True, help="architecture as JSON")
    parser.add_argument("--workload", choices=("inference", "train"), required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--xla", type=int, default=0)
    parser.add_argument("--options", default="{}", help="framework options as JSON (keras_vit: remat)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    protocol = sys.stdout
    sys.stdout = sys.stderr  # frameworks' prints must not break the protocol
    base = current_rss_mb()
    start = time.perf_counter()
    step = BUILDERS[args.framework](
        json.loads(args.spec), args.workload, args.batch, args.precision, bool(args.xla), json.loads(args.options)
    )
    built = time.perf_counter()
    for _ in range(args.warmup):
        step()
    warm = time.perf_counter()

    def reply(message):
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    reply({"ready": True, "build_s": built - start, "warmup_s": warm - built})
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            start = time.perf_counter()
            step()
            reply({"seconds": time.perf_counter() - start})
        elif command == "quit":
            reply({"peak_rss_mb": rss_mb(), "base_rss_mb": base})
            return


if __name__ == "__main__":
    main()
