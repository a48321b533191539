#!/usr/bin/env python3
"""Checks a normal (non-editable) install from outside the checkout: run with that venv's python, cwd elsewhere.

    python .ci/check_installed.py CHECKOUT

The package must come from site-packages, every preset must be package data that loads into its recipe, the
console scripts must run, and each recipe script of the checkout must run on the installed package.
"""

import subprocess
import sys
import sysconfig
from pathlib import Path

checkout = Path(sys.argv[1]).resolve()
assert not Path.cwd().resolve().is_relative_to(checkout), "run this from a folder outside the checkout"

import keras_vit  # noqa: E402
from keras_vit.train import settings  # noqa: E402

site = Path(sysconfig.get_paths()["purelib"]).resolve()
where = Path(keras_vit.__file__).resolve()
assert where.is_relative_to(site), f"keras_vit was imported from {where}, not from {site}"
print(f"keras_vit {keras_vit.__version__} from {where.parent}")

RECIPES = (("pretrain_ssl", "pretrain_ssl.py"), ("pretrain", "pretrain.py"), ("finetune", "finetune.py"))
presets = settings.preset_names()
assert len(presets) >= 13, presets
for name in presets:
    recipe = next(script for prefix, script in RECIPES if name.startswith(prefix))
    command = [sys.executable, str(checkout / "recipes" / recipe), "--preset", name, "--print-config"]
    subprocess.run(command, check=True, capture_output=True, text=True)
print(f"{len(presets)} presets load from the installed package and print through their recipes: {', '.join(presets)}")

for script in ("keras-vit-convert", "keras-vit-interpolate-posemb"):
    subprocess.run([str(Path(sys.executable).parent / script), "--help"], check=True, capture_output=True)
print("console scripts run: keras-vit-convert, keras-vit-interpolate-posemb")

subprocess.run([sys.executable, str(checkout / "recipes" / "main_job.py"), "--quick", "--output-dir", "main_quick"], check=True)
print("recipes/main_job.py --quick ran on the installed package")
