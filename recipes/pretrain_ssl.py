#!/usr/bin/env python3
"""Self-supervised pre-training by masked patch prediction (the seed's section 4.6), then fine-tune the encoder.

    python recipes/pretrain_ssl.py --preset pretrain_ssl_jft --output-dir runs/ssl model=B/16
    python recipes/finetune.py --output-dir runs/ssl_ft weights=runs/ssl/model.keras ...
    python recipes/pretrain_ssl.py --digits-demo       # SSL + fine-tuning vs from scratch, offline, report.json

Re-running the same command resumes from the last checkpoint. Settings: --list-settings (docs/SETTINGS.md).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import _launch


def digits_demo(root, quick=False):
    """SSL pre-training on digits, fine-tuning from it, and fine-tuning from scratch for the same steps."""
    from keras_vit.train import runner, settings

    short = ["steps=10", "warmup_steps=2", "eval_every=5", "checkpoint_every=5", "log_every=5"] if quick else []

    def stage(defaults, preset, *overrides):
        return runner.run(settings.load_config(defaults, preset, short + list(overrides)))

    ssl = stage(settings.PRETRAIN_SSL, "pretrain_ssl_digits", f"output_dir={root / 'pretrain'}")
    finetuned = stage(settings.FINETUNE, "finetune_ssl_digits", f"output_dir={root / 'finetune'}", f"weights={root / 'pretrain' / 'model.keras'}")
    scratch = stage(settings.FINETUNE, "finetune_ssl_digits", f"output_dir={root / 'scratch'}", "weights=null")
    report = {
        "task": "digits 16x16: masked patch prediction pre-training, then fine-tuning; vs the same fine-tuning from scratch",
        "ssl_pretrain": {"steps": ssl["steps"], "mean_colour_accuracy": ssl["top1"]},
        "finetune_from_ssl": {"steps": finetuned["steps"], "top1": finetuned["top1"]},
        "from_scratch": {"steps": scratch["steps"], "top1": scratch["top1"]},
        "gain": finetuned["top1"] - scratch["top1"],
    }
    (root / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--digits-demo", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", default="runs/ssl")
    known, rest = parser.parse_known_args()
    if known.digits_demo:
        _launch.quiet_start()
        from keras_vit.train import command_line

        def demo():
            digits_demo(Path(known.output_dir), known.quick)
            return 0

        sys.exit(command_line.guarded_main(demo))
    if known.quick:
        parser.error("--quick goes with --digits-demo")
    sys.exit(_launch.run_recipe("pretrain_ssl", __doc__.splitlines()[0], rest + ["--output-dir", known.output_dir]))
