#!/usr/bin/env python3
"""Convert an official JAX .npz ViT checkpoint to .keras or .weights.h5 (see --help)."""

import sys

from keras_vit.cli import convert_main

if __name__ == "__main__":
    sys.exit(convert_main())
