#!/usr/bin/env python3
"""What a dropout mask costs on TensorFlow, in graph mode and under XLA: Keras' draw against ``layers.keep_mask``.

    python benchmarks/dropout_masks.py [--rows 2176] [--width 128] [--repeats 30]

Rows of the table: a keep mask of (rows, width) (the main job's MLP dropout: batch 128 x 17 tokens, 128 units)
drawn as ``keras.layers.Dropout`` does (TensorFlow's default "auto_select" algorithm) and as ``keep_mask`` does
(Philox named, 16 bits per entry); then a whole ``TransformerBlock`` training step (forward and gradients) on
(128, 17, 64) with dropout 0.1 and 0.0. Milliseconds per call, median of ``--repeats`` after a warm-up call.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def milliseconds(function, repeats):
    function()  # trace, compile
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function().numpy()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2176)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from keras_vit import layers

    x = tf.ones((args.rows, args.width))
    keras_dropout = keras.layers.Dropout(0.1, seed=0)
    generator = keras.random.SeedGenerator(0)
    cases = {
        "mask, keras.layers.Dropout": lambda: tf.reduce_sum(keras_dropout(x, training=True)),
        "mask, layers.keep_mask": lambda: tf.reduce_sum(layers.keep_mask(x.shape, 0.1, generator, "float32")),
    }
    tokens = tf.random.stateless_normal((128, 17, 64), (1, 2))
    for rate in (0.1, 0.0):
        block = layers.TransformerBlock(4, 128, dropout_rate=rate, seed=0)
        block.build(tokens.shape)

        def step(block=block):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(block(tokens, training=True) ** 2)
            return tf.add_n([tf.reduce_sum(g) for g in tape.gradient(loss, block.trainable_variables)])

        cases[f"block step, dropout {rate}"] = step

    print(f"| (rows, width) = ({args.rows}, {args.width}) | graph ms | XLA ms |")
    print("|---|---:|---:|")
    for name, function in cases.items():
        graph = milliseconds(tf.function(function), args.repeats)
        xla = milliseconds(tf.function(function, jit_compile=True), args.repeats)
        print(f"| {name} | {graph:.2f} | {xla:.2f} |")


if __name__ == "__main__":
    main()
