#!/usr/bin/env python3
"""Which attention core is faster on each Keras backend: keras_vit's lean path or the backend's fused kernel.

    python benchmarks/attention_paths.py                              # tensorflow, jax, torch (those installed)
    python benchmarks/attention_paths.py --backends torch --runs 20

For each backend (its own process, ``KERAS_BACKEND``), shape (batch, heads, tokens, head size) and precision,
times the attention core alone, forward (inference) and forward + backward (training), both ways, interleaved step
by step; prints the median milliseconds and the ratio. The fused kernel is ``keras_vit._speed.fused_attention_core``
(``keras.ops.dot_product_attention``; on PyTorch ``scaled_dot_product_attention`` on q, k, v as they are).
``keras_vit._speed.FUSED_ATTENTION_BACKENDS`` lists the backends where it is used, chosen from this table
(benchmarks/RESULTS.md).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {"Ti/16 b32": (32, 3, 197, 64), "B/16 b8": (8, 12, 197, 64)}
WORKER = r"""
import json, sys, time
import numpy as np
import keras
from keras_vit import _speed

shape, precision, runs = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
backend = keras.backend.backend()
rng = np.random.default_rng(0)
q, k, v = (keras.ops.cast(rng.normal(size=shape).astype("float32"), precision) for _ in range(3))
scale = float(shape[-1]) ** -0.5


def lean(q, k, v):
    return _speed.attention(q * keras.ops.cast(scale, q.dtype), k, v)


def fused(q, k, v):  # the backend's fused kernel (keras.ops.dot_product_attention; on PyTorch its SDPA on the views)
    return _speed.fused_attention_core(q * keras.ops.cast(scale, q.dtype), k, v)


def compile_pair(function):
    if backend == "tensorflow":
        import tensorflow as tf

        forward = tf.function(function, jit_compile=precision == "float32")

        @tf.function(jit_compile=precision == "float32")
        def train(q, k, v):
            with tf.GradientTape() as tape:
                tape.watch([q, k, v])
                loss = tf.reduce_sum(tf.cast(function(q, k, v), tf.float32))
            return tape.gradient(loss, [q, k, v])

        return forward, train
    if backend == "jax":
        import jax

        loss = lambda q, k, v: function(q, k, v).astype("float32").sum()  # noqa: E731
        return jax.jit(function), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    import torch

    def train(q, k, v):
        q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
        function(q, k, v).float().sum().backward()
        return q.grad, k.grad, v.grad

    def forward(q, k, v):
        with torch.no_grad():
            return function(q, k, v)

    return forward, train


def block(result):
    for x in (result if isinstance(result, (list, tuple)) else [result]):
        keras.ops.convert_to_numpy(keras.ops.sum(keras.ops.cast(x, "float32")))


timers = {}
for name, function in (("lean", lean), ("fused", fused)):
    forward, train = compile_pair(function)
    for mode, step in (("inference", forward), ("training", train)):
        for _ in range(2):
            block(step(q, k, v))
        timers[(name, mode)] = step
times = {key: [] for key in timers}
for _ in range(runs):
    for key, step in timers.items():
        start = time.perf_counter()
        block(step(q, k, v))
        times[key].append(time.perf_counter() - start)
print(json.dumps({f"{name} {mode}": sorted(t)[len(t) // 2] * 1e3 for (name, mode), t in times.items()}))
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args(argv)
    print("| backend | shape (B, N, T, dh) | precision | mode | lean ms | fused kernel ms | lean / fused |")
    print("|---|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        for label, shape in SHAPES.items():
            for precision in args.precisions.split(","):
                env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
                done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(shape), precision, str(args.runs)],
                                      capture_output=True, text=True, env=env)
                if done.returncode:
                    print(f"| {backend} | {label} | {precision} | failed: {done.stderr.strip().splitlines()[-1][:80]} |")
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                for mode in ("inference", "training"):
                    lean, fused = result[f"lean {mode}"], result[f"fused {mode}"]
                    print(f"| {backend} | {label} {tuple(shape)} | {precision} | {mode} | {lean:.1f} | {fused:.1f} "
                          f"| {lean / fused:.2f} |", flush=True)


if __name__ == "__main__":
    main()
