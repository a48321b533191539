#!/usr/bin/env python3
"""Fine-tune a pretrained ViT as the official code does (SGD momentum, clipping, warmup + cosine, 384 px).

    python recipes/finetune.py --preset finetune_cifar10 --output-dir runs/cifar10 model=B/16 base_lr=0.003

Re-running the same command resumes from the last checkpoint. Settings: --list-settings (docs/SETTINGS.md).
"""

import logging
import sys

import _launch

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(_launch.run_recipe("finetune", __doc__.splitlines()[0]))
