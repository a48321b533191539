"""Runs the recipe runner in a fresh process, as a test subprocess: ``run_recipe.py [--logical-cpus N] [--pause-after-checkpoint S] key=value ...``.

The defaults are conftest's tiny digits configuration (``TINY_RUN``). ``--logical-cpus`` splits the CPU into N devices before
TensorFlow starts (for MirroredStrategy); ``--pause-after-checkpoint`` sleeps after the first checkpoint so a
test can kill the process there.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TINY_RUN  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--logical-cpus", type=int, default=0)
parser.add_argument("--pause-after-checkpoint", type=float, default=0)
args, overrides = parser.parse_known_args()

import tensorflow as tf  # noqa: E402

if args.logical_cpus:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus)

from keras_vit.train import checkpointing, runner, settings  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
if args.pause_after_checkpoint:
    save = checkpointing.CheckpointManager.save

    def save_then_pause(self, *a, **k):
        path = save(self, *a, **k)
        print("checkpoint written", flush=True)
        time.sleep(args.pause_after_checkpoint)
        return path

    checkpointing.CheckpointManager.save = save_then_pause

config = settings.load_config(settings.FINETUNE, None, TINY_RUN + overrides)
report = runner.run(config)
print(f"replicas={report['replicas']} top1={report['top1']:.4f} strategy={report['strategy']}", flush=True)
sys.exit(0)
