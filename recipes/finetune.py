#!/usr/bin/env python3
"""Fine-tune a pretrained ViT as the official code does (SGD momentum, clipping, warmup + cosine, 384 px).

    python recipes/finetune.py --preset finetune_cifar10 --output-dir runs/cifar10 model=B/16 base_lr=0.003

Re-running the same command resumes from the last checkpoint. Settings: keras_vit/train/runner.py (COMMON).
"""

import logging
import sys

from keras_vit.train.runner import FINETUNE, main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the library only logs; scripts show it
    sys.exit(main(FINETUNE, __doc__.splitlines()[0]))
