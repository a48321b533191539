#!/usr/bin/env python3
"""What a dropout mask costs on TensorFlow, in graph mode and under XLA: Keras' draw against ``layers.keep_mask``.

    python benchmarks/dropout_masks.py [--rows 2176] [--width 128] [--repeats 30]

Rows of the table: a keep mask of (rows, width) (the main job's MLP dropout: batch 128 x 17 tokens, 128 units)
drawn as ``keras.layers.Dropout`` does (TensorFlow's default "auto_select" algorithm) and as ``keep_mask`` does
(Philox named, 16 bits per entry); then a whole ``TransformerBlock`` training step (forward and gradients) on
(128, 17, 64) with dropout 0.1 and 0.0; then the main job's pre-training step (``Trainer``, preset
``pretrain_digits``, one fixed batch) with its stochastic depth 0.1 and with dropout 0.1 instead.
Milliseconds per call (per step), median of ``--repeats`` after a warm-up call.
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
    for name, overrides in (("stochastic depth 0.1", []), ("dropout 0.1", DROPOUT_INSTEAD)):
        graph, xla = (main_job_step(overrides + [f"jit_compile={jit}"], args.repeats) for jit in ("false", "true"))
        print(f"| main job pre-training step, {name} | {graph:.2f} | {xla:.2f} |")


DROPOUT_INSTEAD = ["model_overrides.dropout_rate=0.1", "model_overrides.stochastic_depth_rate=0.0"]


def main_job_step(overrides, repeats):
    """Milliseconds per step of the ``pretrain_digits`` preset's ``Trainer`` on one fixed batch."""
    import tensorflow as tf

    from keras_vit.train import runner

    config = runner.load_config(runner.PRETRAIN, "pretrain_digits", overrides)
    strategy, precision = runner.setup(config)
    source, train_dataset, _ = runner.prepare_data(config)
    trainer = runner.build_trainer(config, strategy, precision, source.num_classes)
    batch = next(iter(train_dataset()))
    batches = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
    steps = 20
    return milliseconds(lambda: trainer.train_steps(batches, steps)[0], max(repeats // 5, 3)) / steps


if __name__ == "__main__":
    main()
