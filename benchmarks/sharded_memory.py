#!/usr/bin/env python3
"""Per-device memory of ViT training under the JAX strategies (``keras_vit.layout_map``) on 8 devices.

    python benchmarks/sharded_memory.py                       # the table from the shardings (seconds)
    python benchmarks/sharded_memory.py --measure B/16:data,B/16:fsdp,B/16:tensor --batch 8 --steps 2

The table: bytes one device holds of the weights and of the optimizer state (SGD momentum: one slot per weight;
Adam: two), computed from each variable's ``jax.sharding.NamedSharding`` shard shape (``layout.backend_layout``)
on a mesh of 8 devices: ``(8,)`` for data and FSDP, ``(2, 4)`` batch x model for tensor parallelism (B/16's 12
heads do not split 8 ways). Nothing is allocated.

``--measure MODEL:STRATEGY,...`` trains each in a fresh process on 8 virtual CPU devices (XLA's
``--xla_force_host_platform_device_count=8``): the model under ``keras_vit.distribution.model_parallel``, Adam,
``--steps`` steps of ``--batch`` random images (224 px, 1000 classes); it reads back the bytes device 0 holds
of the model's and optimizer's variables (their live shards) and the process's peak resident memory (all 8
virtual devices share it; minus the resident memory before the model was built). XLA's CPU devices report no
memory statistics of their own.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MODELS = ("B/16", "L/16")
STRATEGIES = ("data", "fsdp", "tensor")
MESHES = {"data": ((8,), ("batch",)), "fsdp": ((8,), ("batch",)), "tensor": ((2, 4), ("batch", "model"))}
# (strategy, mesh shape, min_shard_bytes) of the table's rows per model: the recipes' three, then FSDP splitting
# every variable it can (no size threshold) and tensor parallelism 8 ways where the heads allow it
ROWS = [("data", None, None), ("fsdp", None, None), ("tensor", None, None), ("fsdp", None, 0), ("tensor", (1, 8), None)]
MIB = 2**20


def _architecture(name):
    import keras_vit

    config = keras_vit.model_config(name)
    arguments = {k: config[k] for k in ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
                                        "classifier", "representation_size")}
    return keras_vit.Architecture.from_arguments(image_size=224, classes=1000, **arguments)


def _mesh(strategy, shape=None):
    import keras

    default, names = MESHES[strategy]
    return keras.distribution.DeviceMesh(shape or default, names)


def sharded_bytes(name, strategy, shape=None, min_shard_bytes=None):
    """Bytes of the weights on one device, from the shardings' shard shapes (an optimizer slot: the same again)."""
    import math

    from keras_vit.distribution import MIN_SHARD_BYTES, layout_map, variable_shapes

    arch = _architecture(name)
    minimum = MIN_SHARD_BYTES if min_shard_bytes is None else min_shard_bytes
    layouts = layout_map(arch, _mesh(strategy, shape), strategy, min_shard_bytes=minimum)
    total = 0
    for path, shape in variable_shapes(arch).items():
        total += math.prod(layouts[path].backend_layout.shard_shape(tuple(shape))) * 4
    return total


def table():
    rows = ["| model | strategy | mesh | weights / device | + SGD momentum | + Adam (m, v) | vs data |",
            "|---|---|---|---|---|---|---|"]
    for name in MODELS:
        data = None
        for strategy, shape, minimum in ROWS:
            try:
                weights = sharded_bytes(name, strategy, shape, minimum)
            except ValueError:  # heads or MLP size the model axis does not divide
                rows.append(f"| {name} | {strategy} | {'x'.join(map(str, shape))} | not possible: "
                            f"{_architecture(name).num_heads} heads | | | |")
                continue
            data = data or weights
            label = strategy + (", no size threshold" if minimum == 0 else "")
            mesh = "x".join(map(str, shape or MESHES[strategy][0]))
            rows.append(f"| {name} | {label} | {mesh} | {weights / MIB:,.1f} MiB | {2 * weights / MIB:,.1f} MiB | "
                        f"{3 * weights / MIB:,.1f} MiB | {weights / data:.2f} |")
    return "\n".join(rows)


def _peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _current_rss():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name, strategy, batch, steps):
    """One training run in this process (8 virtual devices); a dict of what was read back."""
    import keras
    import numpy as np

    import keras_vit
    from keras_vit.distribution import model_parallel

    arch = _architecture(name)
    before = _current_rss()
    with model_parallel(_mesh(strategy), strategy).scope():
        model = keras_vit.VisionTransformer(image_size=224, patch_size=arch.patch_size, hidden_size=arch.hidden_size,
                                            num_layers=arch.num_layers, num_heads=arch.num_heads, mlp_dim=arch.mlp_dim,
                                            classes=1000)
        model.compile(keras.optimizers.Adam(1e-4), keras.losses.CategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        images = rng.uniform(-1, 1, (batch * steps, 224, 224, 3)).astype("float32")
        labels = np.eye(1000, dtype="float32")[rng.integers(0, 1000, batch * steps)]
        model.fit(images, labels, batch_size=batch, epochs=1, verbose=0)

    def on_device_0(variables):
        return sum(v.value.addressable_shards[0].data.nbytes for v in variables)

    return {
        "model": name, "strategy": strategy, "batch": batch, "steps": steps,
        "weights_device0": on_device_0(model.variables),
        "optimizer_device0": on_device_0(model.optimizer.variables),
        "peak_rss": _peak_rss(), "rss_before_model": before,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", default="", help="MODEL:STRATEGY,... to train on 8 virtual CPU devices")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a measurement in this process
    parser.add_argument("--json", help="write the measurements to this file")
    args = parser.parse_args()
    if args.one:
        name, strategy = args.one.split(":")
        print(json.dumps(measure(name, strategy, args.batch, args.steps)))
        return
    print(table())
    results = []
    for cell in filter(None, args.measure.split(",")):
        command = [sys.executable, __file__, "--one", cell, "--batch", str(args.batch), "--steps", str(args.steps)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"{cell}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if results:
        print("\n| model | strategy | weights + Adam on device 0 (live shards) | process peak RSS, 8 devices "
              "(above the start) | per device (/8) |\n|---|---|---|---|---|")
        for r in results:
            grown = r["peak_rss"] - r["rss_before_model"]
            print(f"| {r['model']} | {r['strategy']} | {(r['weights_device0'] + r['optimizer_device0']) / MIB:,.1f} MiB | "
                  f"{r['peak_rss'] / MIB:,.0f} MiB ({grown / MIB:,.0f} MiB) | {grown / 8 / MIB:,.0f} MiB |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
