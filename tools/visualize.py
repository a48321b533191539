#!/usr/bin/env python3
"""Attention-rollout overlays and the seed's Figure 7 panels for a model (.keras or official .npz).

    python tools/visualize.py runs/main/finetune/model.keras image1.png image2.jpg --out figures/
"""

import argparse
import logging
import sys

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .keras model or an official .npz checkpoint")
    parser.add_argument("images", nargs="*", help="image files (default: 4 random images)")
    parser.add_argument("--out", required=True, help="output folder for the PNG figures")
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    import keras_vit
    from keras_vit import plotting

    model = keras_vit.from_official_checkpoint(args.model) if args.model.endswith(".npz") else keras.models.load_model(args.model)
    height, width, channels = model.input.shape[1:]
    if args.images:
        pixels = [tf.image.resize(tf.io.decode_image(tf.io.read_file(p), channels=channels, expand_animations=False), (height, width)) for p in args.images]
        images = keras_vit.preprocess_input(np.stack(pixels))
    else:
        images = np.random.default_rng(0).uniform(-1, 1, (4, height, width, channels)).astype("float32")
    for path in plotting.write_figures(model, keras.ops.convert_to_numpy(images), args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from keras_vit.cli import tool_main

    sys.exit(tool_main(main, "visualize.py"))
