#!/usr/bin/env python3
"""What Keras' quantization (``model.quantize``) gives a ViT: file size, CPU inference speed, accuracy.

    python benchmarks/quantization.py                                   # Ti/16 b32 and B/16 b8, 224 px
    python benchmarks/quantization.py --model runs/main/finetune/model.keras --digits   # + top-1 of the main job

For each model and mode (float32, int8, int4, float8): the ``.keras`` file's bytes and inference images/s
(the model called in a ``tf.function``, with ``--xla`` compiled by XLA; median of ``--runs`` steps, the modes interleaved step by step
in one process so that machine noise hits them alike). With ``--model`` and ``--digits``, the test top-1 of that
model (trained by the main job on the scikit-learn digits, whose test split is rebuilt the same way) after each
quantization. Random weights for the named variants: speed and size do not depend on the values.
"""

import argparse
import os
import statistics
import tempfile
import time

MODES = ("float32", "int8", "int4", "float8")


def quantized_copies(build, modes):
    """``{mode: model}``: a fresh model per mode, quantized (float32: as built)."""
    import keras

    models = {}
    for mode in modes:
        model = build()
        if mode != "float32":
            model.quantize(mode)
        models[mode] = model
        keras.utils.clear_session(free_memory=False)
    return models


def file_bytes(model):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        model.save(path)
        return os.path.getsize(path)


def images_per_second(models, images, runs, xla=False):
    """Median images/s of each model's inference step, steps interleaved across models."""
    import tensorflow as tf

    steps = {mode: tf.function(lambda x, m=model: m(x, training=False), jit_compile=xla) for mode, model in models.items()}
    inputs = tf.constant(images)
    for step in steps.values():
        for _ in range(2):
            step(inputs).numpy()
    times = {mode: [] for mode in steps}
    for _ in range(runs):
        for mode, step in steps.items():
            start = time.perf_counter()
            step(inputs).numpy()
            times[mode].append(time.perf_counter() - start)
    return {mode: len(images) / statistics.median(t) for mode, t in times.items()}


def digits_top1(models):
    """Test top-1 on the main job's digits test split (16x16, as the fine-tuned model takes them)."""
    import numpy as np

    from keras_vit.train import data

    size = next(iter(models.values())).input.shape[1]
    images, labels = zip(*data.pipeline(data.digits("test"), size, 512, False).as_numpy_iterator())
    images, labels = np.concatenate(images), np.concatenate(labels).argmax(1)
    return {mode: float((np.asarray(model.predict(images, verbose=0)).argmax(1) == labels).mean())
            for mode, model in models.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["Ti/16 32", "B/16 8"], help='"variant batch" pairs')
    parser.add_argument("--model", help="a trained .keras model to measure as well")
    parser.add_argument("--digits", action="store_true", help="with --model: its top-1 on the digits test split")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--xla", action="store_true", help="compile the inference steps with XLA")
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    import keras_vit

    modes = args.modes.split(",")
    print("| model | batch | mode | .keras bytes | vs float32 | images/s | vs float32 | test top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    cases = [(cell.split()[0], int(cell.split()[1])) for cell in args.cells]
    if args.model:
        cases.append((args.model, 32))
    for name, batch in cases:
        if name.endswith(".keras"):
            build = lambda: keras.models.load_model(name)  # noqa: E731
        else:
            build = lambda: keras_vit.create_model(name, image_size=args.image_size)  # noqa: E731
        models = quantized_copies(build, modes)
        shape = (batch, *next(iter(models.values())).input.shape[1:])
        images = np.random.default_rng(0).uniform(-1, 1, shape).astype("float32")
        sizes = {mode: file_bytes(model) for mode, model in models.items()}
        speeds = images_per_second(models, images, args.runs, args.xla)
        accuracy = digits_top1(models) if args.digits and name == args.model else {}
        for mode in modes:
            top1 = f"{100 * accuracy[mode]:.1f}%" if mode in accuracy else "-"
            label = os.path.basename(name) if name.endswith(".keras") else name
            print(f"| {label} | {batch} | {mode} | {sizes[mode]:,} | {sizes[mode] / sizes['float32']:.2f}x "
                  f"| {speeds[mode]:.1f} | {speeds[mode] / speeds['float32']:.2f}x | {top1} |", flush=True)


if __name__ == "__main__":
    main()
