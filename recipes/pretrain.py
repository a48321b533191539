#!/usr/bin/env python3
"""Pre-train a ViT from scratch as the seed does (Adam, weight decay, warmup + linear decay, dropout 0.1).

    python recipes/pretrain.py --preset pretrain_imagenet2012 --output-dir runs/pretrain model=B/16

Re-running the same command resumes from the last checkpoint. Settings: --list-settings (docs/SETTINGS.md).
"""

import logging
import sys

import _launch

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(_launch.run_recipe("pretrain", __doc__.splitlines()[0]))
