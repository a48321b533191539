"""Runs the recipe runner in a fresh process, as a test subprocess: ``run_recipe.py [--logical-cpus N] [--pause-after-checkpoint S] key=value ...``.

The defaults are a tiny digits configuration. ``--logical-cpus`` splits the CPU into N devices before
TensorFlow starts (for MirroredStrategy); ``--pause-after-checkpoint`` sleeps after the first checkpoint so a
test can kill the process there.
"""

import argparse
import logging
import sys
import time

TINY = [
    "model=Ti/16",
    'model_overrides={"patch_size": 2, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32, "channels": 1, "dropout_rate": 0.1}',
    "dataset=digits",
    "image_size=8",
    "batch_size=32",
    "steps=8",
    "warmup_steps=2",
    "base_lr=0.01",
    "crop_area=[0.6, 1.0]",
    "flip=false",
    "precision=float32",
    "eval_every=4",
    "checkpoint_every=4",
    "log_every=4",
    "weights=null",
]

parser = argparse.ArgumentParser()
parser.add_argument("--logical-cpus", type=int, default=0)
parser.add_argument("--pause-after-checkpoint", type=float, default=0)
args, overrides = parser.parse_known_args()

import tensorflow as tf  # noqa: E402

if args.logical_cpus:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus)

from keras_vit.train import checkpointing, runner  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
if args.pause_after_checkpoint:
    save = checkpointing.CheckpointManager.save

    def save_then_pause(self, *a, **k):
        path = save(self, *a, **k)
        print("checkpoint written", flush=True)
        time.sleep(args.pause_after_checkpoint)
        return path

    checkpointing.CheckpointManager.save = save_then_pause

config = runner.load_config(runner.FINETUNE, None, TINY + overrides)
report = runner.run(config)
print(f"replicas={report['replicas']} top1={report['top1']:.4f} strategy={report['strategy']}", flush=True)
sys.exit(0)
