#!/usr/bin/env python3
"""Hyperparameter search (keras-tuner) over the seed's fine-tuning grid or ViT architectures.

    python recipes/tune.py --space architecture --preset pretrain_digits --tuner random --max-trials 4 \
        --directory runs/tune --project-name digits steps=200

Re-running the same command resumes the search (finished trials are not repeated). Writes trials.csv,
trials.md, trials.png and best_config.json (runs as is: recipes/pretrain.py --preset .../best_config.json)
into DIRECTORY/PROJECT_NAME. Exits non-zero when every trial failed.
"""

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import _launch

SPACES = ("finetune", "architecture")  # keras_vit.train.tuning.SPACES (a test keeps them equal)
TUNERS = ("bayesian", "hyperband", "random")  # sorted(keras_vit.train.tuning.TUNERS)
TRIAL_METRICS = ("val_accuracy", "train_accuracy", "train_loss")  # keras_vit.train.tuning.TRIAL_METRICS


class RetracingNotice(logging.Filter):
    """Drops TensorFlow's "triggered tf.function retracing" warning: every trial builds a new model and traces its
    own training functions, which TensorFlow counts as retracing one function; its advice does not apply."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


def parse_space(items, path):
    from keras_vit.train import settings

    space = json.loads(Path(path).read_text()) if path else {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set-space takes name=JSON, got {item!r}")
        space[name] = settings.parse_value(value)
    return space


def write_results(tuner, hypermodel, folder, objective):
    from keras_vit.train import tuning

    rows = tuning.trial_table(tuner)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(folder / "trials.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    (folder / "trials.md").write_text("\n".join(lines) + "\n")
    completed = [row for row in rows if row["status"] == "COMPLETED"]
    if completed:
        best = tuner.oracle.get_best_trials(1)[0]
        config = hypermodel.config_for(best.hyperparameters)
        config["output_dir"] = str(folder / "best_run")
        (folder / "best_config.json").write_text(json.dumps(config, indent=2) + "\n")
        print(f"best trial {best.trial_id}: {objective} {best.score:.4f}; config in {folder / 'best_config.json'}")
    _plot(rows, objective, folder / "trials.png")
    return rows


def _cell(value):
    return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))


def _plot(rows, objective, path):
    from keras_vit import plotting

    try:
        plotting.plot_trials(rows, objective, path)
    except ImportError:
        pass  # no matplotlib: the table is in trials.csv and trials.md


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--space", choices=SPACES, default="finetune")
    parser.add_argument("--preset", help="base recipe preset (a name in keras_vit/train/presets/ or a JSON file)")
    parser.add_argument("--tuner", choices=TUNERS, default="random")
    parser.add_argument("--objective", default="val_accuracy", choices=TRIAL_METRICS)
    parser.add_argument("--max-trials", type=int, default=10)
    parser.add_argument("--max-time", type=float, help="seconds; no trial starts after that")
    parser.add_argument("--max-epochs", type=int, default=4, help="Hyperband: most epochs of a trial")
    parser.add_argument("--steps-per-epoch", type=int, default=50, help="Hyperband: steps in one epoch")
    parser.add_argument("--space-config", help="JSON file of search-space overrides")
    parser.add_argument("--set-space", action="append", default=[], help="name=JSON: fix (value), choose ([...]) or range ({min, max})")
    parser.add_argument("--directory", default="runs/tune")
    parser.add_argument("--project-name", default="vit")
    parser.add_argument("--overwrite", action="store_true", help="start the search afresh")
    parser.add_argument("overrides", nargs="*", help="key=value (or --key value) settings of the base recipe, anywhere")
    args = _launch.parse_recipe_args(parser, argv)
    _launch.quiet_start()
    logging.getLogger("tensorflow").addFilter(RetracingNotice())
    from keras_vit.train import building, settings, tuning

    defaults = settings.FINETUNE if args.space == "finetune" else settings.PRETRAIN
    try:
        config = settings.load_config(defaults, args.preset, args.overrides)
        environment = building.setup(config)
    except settings.SettingError as error:
        parser.error(str(error))
    hypermodel = tuning.ViTHyperModel(
        config, args.space, parse_space(args.set_space, args.space_config), environment,
        steps_per_epoch=args.steps_per_epoch if args.tuner == "hyperband" else None, time_budget_s=args.max_time,
    )
    tuner = tuning.make_tuner(
        args.tuner, hypermodel, args.objective, args.max_trials, args.max_epochs, args.directory, args.project_name,
        seed=config["seed"], overwrite=args.overwrite,
    )
    try:
        tuner.search()
    except Exception as error:  # keras-tuner stops on a fatal error or too many failed trials
        print(f"search stopped: {type(error).__name__}: {str(error).strip().splitlines()[-1]}")
    folder = Path(args.directory) / args.project_name
    rows = write_results(tuner, hypermodel, folder, args.objective)
    failed = tuning.failures(tuner)
    for trial_id, message in failed:
        print(f"trial {trial_id} failed: {message}")
    if rows and len(failed) == len(rows):
        print(f"error: all {len(rows)} trials failed; the first: {failed[0][1]}", file=sys.stderr)
        return 1
    if not rows:
        print("error: no trial ran", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(main())
