#!/usr/bin/env python3
"""The main job: the paper's recipe in miniature on real data that ships offline (scikit-learn digits).

1. pre-train a small ViT on the 8x8 digits at their native resolution (Adam, weight decay, warmup, linear decay);
2. fine-tune it at 2x the resolution (16x16), position embeddings interpolated the official way
   (Adam, warmup + cosine decay);
3. evaluate on the held-out test split (also at 12x12 and 24x24: one model of any image size), measure few-shot
   accuracy of the pre-trained features, and write runs/main/report.json (+ training curves and the Figure 7
   panels in runs/main/figures with matplotlib).

    python recipes/main_job.py [--output-dir runs/main] [--seed 0] [--quick]
    KERAS_BACKEND=jax python recipes/main_job.py      # the same on JAX (or torch): Keras' fit loop

Each stage resumes from its checkpoints when re-run; re-running a finished job changes nothing. --quick runs a few
steps (a smoke test). The run is deterministic on one machine: the same command gives the same report.json accuracies.
"""

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import _launch


def write_analysis(root, pretrain, finetune):
    """Few-shot accuracy of the pre-trained features (the seed's second metric) and the Figure 7 panels."""
    import keras
    import numpy as np

    from keras_vit import evaluation, plotting
    from keras_vit.train import data

    def arrays(split, size):
        images, labels = zip(*data.pipeline(data.digits(split), size, 512, False).as_numpy_iterator())
        return np.concatenate(images), np.concatenate(labels).argmax(1)

    pretrained = keras.models.load_model(root / "pretrain" / "model.keras")
    shots = evaluation.fewshot(pretrained, arrays("train", 8), arrays("test", 8), shots=(1, 5, 10), seeds=3)
    result = {"pretrain_fewshot": shots}
    try:
        finetuned = keras.models.load_model(root / "finetune" / "model.keras")
        paths = plotting.write_figures(finetuned, arrays("test", 16)[0][:6], root / "figures")
        result["figures"] = [str(p) for p in paths]
    except ImportError as error:
        print(f"No figures: {error}")
    return result


def machine():
    """The CPU model, core count, Keras backend and software versions, for the report (numbers depend on them)."""
    import importlib.metadata

    import keras
    import tensorflow as tf

    import keras_vit

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "keras_vit": keras_vit.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "tensorflow": tf.__version__,
        **{name: importlib.metadata.version(name) for name in ("jax", "torch") if keras.backend.backend() == name},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", help="default runs/main (runs/main_quick with --quick)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, data order and augmentation (default 0)")
    parser.add_argument("--quick", action="store_true", help="a few steps only, to check the pipeline")
    args = parser.parse_args(argv)
    _launch.quiet_start()
    from keras_vit.train import command_line

    return command_line.guarded_main(lambda: run_job(args))


def run_job(args):
    """Both stages, the analysis and the report of the main job; the exit status."""
    from keras_vit.train import runner, settings

    root = Path(args.output_dir or ("runs/main_quick" if args.quick else "runs/main"))
    quick = ["steps=20", "warmup_steps=5", "eval_every=10", "checkpoint_every=10", "log_every=10"] if args.quick else []
    quick.append(f"seed={args.seed}")
    started = time.perf_counter()
    pretrain = runner.run(
        settings.load_config(settings.PRETRAIN, "pretrain_digits", quick + [f"output_dir={root / 'pretrain'}"])
    )
    finetune = runner.run(
        settings.load_config(
            settings.FINETUNE,
            "finetune_digits",
            quick + [f"output_dir={root / 'finetune'}", f"weights={root / 'pretrain' / 'model.keras'}"],
        )
    )
    if pretrain.get("already_finished") and finetune.get("already_finished") and (root / "report.json").exists():
        print(f"{root} already holds the finished main job: report.json and the figures are kept (use another --output-dir to run again).")
        return 0
    figures = write_analysis(root, pretrain, finetune)
    report = {
        "task": "scikit-learn digits (1,797 real 8x8 images; stratified 80/20 split)",
        "seed": args.seed,
        "machine": machine(),
        "pretrain": {"resolution": 8, "top1": pretrain["top1"], "steps": pretrain["steps"], "wall_seconds": pretrain["wall_seconds"]},
        "finetune": {"resolution": 16, "top1": finetune["top1"], "steps": finetune["steps"], "wall_seconds": finetune["wall_seconds"]},
        "test_accuracy": finetune["top1"],
        # the fine-tuned model as one model of any size, on the test digits resized to 12x12, 16x16 and 24x24
        "test_accuracy_by_image_size": finetune.get("top1_by_image_size"),
        "wall_seconds": time.perf_counter() - started,
        "model": str(root / "finetune" / "model.keras"),
        **figures,
    }
    (root / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(main())
