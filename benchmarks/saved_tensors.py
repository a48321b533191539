#!/usr/bin/env python3
"""What a ViT training step keeps for its backward pass, by op: keras_vit (TensorFlow graph) and timm (PyTorch).

    python benchmarks/saved_tensors.py --model Ti/16 --batch 32 --precision float32
    python benchmarks/saved_tensors.py --model B/16 --batch 8 --precision mixed_bfloat16 \\
        --frameworks keras_vit,timm --python timm=/path/to/venv/bin/python

keras_vit: the training step (forward, cross-entropy, ``tf.GradientTape`` gradients of every
trainable variable) is traced into a ``tf.function`` graph, nothing is run. The activations kept
for the backward pass are the forward tensors that a live gradient op reads (ops not reachable
from the gradients are pruned first, as TensorFlow's graph optimizer does); views (Reshape,
Identity, ...) count as the tensor they view, variables and constants are not activations.
timm: one forward pass under ``torch.autograd.graph.saved_tensors_hooks`` records every tensor
that autograd saves, deduplicated by storage, parameters excluded.

Sizes are per training step, grouped by the op that produced the tensor (and, inside a
Transformer block, the block's sub-layer), summed over all blocks. With ``--json`` every row is
written to a file. ``--python FRAMEWORK=PATH`` runs a framework in another interpreter.
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (the machine description)

HERE = os.path.dirname(os.path.abspath(__file__))
# Ops whose output is a view of (or the same buffer as) their first input in TensorFlow.
TF_VIEWS = {"Reshape", "Identity", "IdentityN", "ExpandDims", "Squeeze", "StopGradient", "Snapshot"}
TF_NOT_ACTIVATIONS = {"ReadVariableOp", "Const", "VarHandleOp", "Placeholder", "Shape", "ShapeN", "Size", "Rank"}


def _spec(model, image_size, classes):
    sys.path.insert(0, HERE)
    import throughput

    return throughput.architecture(model, image_size, classes)


# --- keras_vit -----------------------------------------------------------------------------------------------------


def _tf_part(name):
    """(sub-layer, whether inside a Transformer block) of a forward op name; Keras' ``_1`` scope suffixes removed."""
    parts = [re.sub(r"_1$", "", p) for p in name.split("/")[:-1]]
    block = next((i for i, p in enumerate(parts) if re.fullmatch(r"encoderblock_\d+", p)), None)
    if block is None:
        return (parts[1] if len(parts) > 1 else "loss"), False
    return (parts[block + 1] if len(parts) > block + 1 else "block (residual)"), True


def keras_vit_saved(spec, batch, precision, options):
    import keras
    import tensorflow as tf

    import keras_vit

    keras.mixed_precision.set_global_policy(precision)
    model = keras_vit.vision_transformer(**spec, **options)
    size = spec["image_size"]

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True), tf.float32)
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels, logits))
        return loss, tape.gradient(loss, model.trainable_variables)

    graph = step.get_concrete_function(
        tf.TensorSpec((batch, size, size, 3), tf.float32), tf.TensorSpec((batch, spec["classes"]), tf.float32)
    ).graph

    def ancestors(ops):
        seen, stack = set(), list(ops)
        while stack:
            op = stack.pop()
            if op.name not in seen:
                seen.add(op.name)
                stack.extend(t.op for t in op.inputs)
                stack.extend(op.control_inputs)
        return seen

    forward = ancestors([graph.outputs[0].op])  # the loss
    live = ancestors([t.op for t in graph.outputs[1:]])  # the gradients

    def is_backward(op):
        return op.name not in forward

    def buffer(tensor):
        while tensor.op.type in TF_VIEWS and tensor.op.inputs:
            tensor = tensor.op.inputs[0]
        return tensor

    from_images = set()
    for op in graph.get_operations():  # in creation order, which is a topological order
        if op.name == graph.inputs[0].op.name or any(t.op.name in from_images for t in op.inputs):
            from_images.add(op.name)
    kept = {}
    for op in graph.get_operations():
        if op.name not in live or not is_backward(op):
            continue
        for tensor in op.inputs:
            tensor = buffer(tensor)
            if is_backward(tensor.op) or tensor.op.type in TF_NOT_ACTIVATIONS:
                continue
            shape = tensor.shape
            if not shape.is_fully_defined():
                continue
            # Not computed from the images: derived from the weights (a cast copy, the concatenated q/k/v kernel).
            kind = None if tensor.op.name in from_images else "weights (derived)"
            kept[tensor.name] = (tensor, kind)
    rows = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for tensor, kind in kept.values():
        nbytes = tensor.shape.num_elements() * tensor.dtype.size
        if nbytes < 1024:  # scalars and per-row statistics
            continue
        where, in_block = _tf_part(tensor.op.name)
        key = ("block" if in_block else "model", kind or where, tensor.op.type, str(tensor.shape.as_list()),
               tensor.dtype.name)
        rows[key]["count"] += 1
        rows[key]["bytes"] += nbytes
    return [
        {"scope": k[0], "where": k[1], "op": k[2], "shape": k[3], "dtype": k[4], **v} for k, v in rows.items()
    ]


# --- timm ----------------------------------------------------------------------------------------------------------


def timm_saved(spec, batch, precision, options):
    import contextlib

    import torch
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=spec["image_size"], patch_size=spec["patch_size"], embed_dim=spec["hidden_size"],
        depth=spec["num_layers"], num_heads=spec["num_heads"], mlp_ratio=spec["mlp_dim"] / spec["hidden_size"],
        num_classes=spec["classes"],
    ).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack = [("model", False)]  # the innermost running module: (name without the block index, inside a block)
    for name, module in model.named_modules():
        if name:
            label = (re.sub(r"^blocks\.\d+\.?", "", name) or "block", name.startswith("blocks."))
            module.register_forward_pre_hook(lambda m, a, label=label: stack.append(label))
            module.register_forward_hook(lambda m, a, o: stack.pop() and None)  # returns None: output kept
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in params and pointer not in saved:
            producer = type(tensor.grad_fn).__name__ if tensor.grad_fn is not None else "input"
            where, in_block = stack[-1]
            saved[pointer] = (storage.nbytes(), where, in_block, producer, list(tensor.shape), str(tensor.dtype))
        return tensor

    images = torch.rand(batch, 3, spec["image_size"], spec["image_size"]) * 2 - 1
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if "bfloat16" in precision else contextlib.nullcontext
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast():
        logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.zeros(batch, dtype=torch.long))
    del loss, logits
    rows = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
    for nbytes, where, in_block, producer, shape, dtype in saved.values():
        if nbytes < 1024:
            continue
        key = ("block" if in_block else "model", where, producer.replace("Backward0", ""), str(shape),
               dtype.replace("torch.", ""))
        rows[key]["count"] += 1
        rows[key]["bytes"] += nbytes
    return [{"scope": k[0], "where": k[1], "op": k[2], "shape": k[3], "dtype": k[4], **v} for k, v in rows.items()]


ANALYSES = {"keras_vit": keras_vit_saved, "timm": timm_saved}


def report(framework, rows, layers):
    total = sum(r["bytes"] for r in rows)
    lines = [
        f"{framework}: {total / 2**20:.0f} MiB kept for the backward pass "
        f"({sum(r['bytes'] for r in rows if r['scope'] == 'block') / 2**20 / layers:.1f} MiB per block)",
        "",
        "| scope | sub-layer | op | shape | dtype | tensors | MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["bytes"]):
        lines.append(
            f"| {r['scope']} | {r['where']} | {r['op']} | {r['shape']} | {r['dtype']} | {r['count']} | "
            f"{r['bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Ti/16")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--frameworks", default="keras_vit", help="comma-separated: keras_vit, timm")
    parser.add_argument("--python", action="append", default=[], metavar="FRAMEWORK=PATH")
    parser.add_argument("--options", default="{}", help="keras_vit builder options as JSON, e.g. '{\"remat\": true}'")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # run one framework in this process, JSON to stdout
    parser.add_argument("--spec", help=argparse.SUPPRESS)  # the architecture, for a worker
    args = parser.parse_args(argv)

    if args.worker:
        rows = ANALYSES[args.worker](json.loads(args.spec), args.batch, args.precision, json.loads(args.options))
        print(json.dumps(rows))
        return
    spec = _spec(args.model, args.image_size, args.classes)
    pythons = dict(item.split("=", 1) for item in args.python)
    results = {}
    for framework in args.frameworks.split(","):
        if framework not in ANALYSES:
            raise SystemExit(f"Unknown framework {framework!r}: choose from {sorted(ANALYSES)}.")
        command = [pythons.get(framework, sys.executable), os.path.abspath(__file__), "--worker", framework,
                   "--spec", json.dumps(spec), "--batch", str(args.batch), "--precision", args.precision,
                   "--options", args.options]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(
            p for p in (os.path.dirname(HERE), os.environ.get("PYTHONPATH")) if p))
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"{framework} failed: {done.stderr.strip()[-2000:]}")
        results[framework] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{args.model} batch {args.batch} {args.precision}, {args.image_size} px\n")
    for framework, rows in results.items():
        print(report(framework, rows, spec["num_layers"]) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": throughput.machine(), "model": args.model, "batch": args.batch,
                       "precision": args.precision, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
