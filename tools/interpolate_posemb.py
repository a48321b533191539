#!/usr/bin/env python3
"""Interpolate the position embeddings of a .npz, .keras or .weights.h5 ViT checkpoint (see --help)."""

import sys

from keras_vit.cli import interpolate_main

if __name__ == "__main__":
    sys.exit(interpolate_main())
