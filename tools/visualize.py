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
    parser.add_argument("images", nargs="*", help="image files, resized to the model's (native) size (default: 4 random images)")
    parser.add_argument("--out", required=True, help="output folder for the PNG figures")
    args = parser.parse_args(argv)

    import keras

    import keras_vit
    from keras_vit import plotting
    from keras_vit.preprocessing import load_images
    from keras_vit.pretrained.load import architecture_of

    model = keras_vit.from_official_checkpoint(args.model) if args.model.endswith(".npz") else keras.models.load_model(args.model)
    arch = architecture_of(model)  # a model of any size: the figures are drawn at its native size
    (height, width), channels = arch.native_image_size, arch.channels
    if args.images:
        images = load_images(args.images, (height, width), channels)
    else:
        images = np.random.default_rng(0).uniform(-1, 1, (4, height, width, channels)).astype("float32")
    for path in plotting.write_figures(model, images, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from keras_vit.cli import tool_main

    sys.exit(tool_main(main, "visualize.py"))
