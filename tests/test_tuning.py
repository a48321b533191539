"""Hyperparameter search: search spaces, tuners, resume after kill -9, failed trials, the best config."""

import json
import os
import signal
import subprocess
import sys

import keras_tuner
import pytest

from conftest import REPO
from keras_vit.train import runner, tuning

FAST = ["steps=6", "warmup_steps=2", "batch_size=32", "eval_every=0", "checkpoint_every=0", "log_every=3",
        'model_overrides={"channels": 1}']
SMALL_SPACE = ["--set-space", "hidden_size=[16, 24]", "--set-space", "num_layers=1", "--set-space", "mlp_ratio=2"]


def _tune(directory, *args, wait=True):
    command = [sys.executable, "recipes/tune.py", "--space", "architecture", "--preset", "pretrain_digits",
               "--directory", str(directory), "--project-name", "p", *SMALL_SPACE, *args, *FAST]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if not wait:
        return process
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def test_architecture_space_only_offers_valid_heads_and_patches():
    config = runner.load_config(runner.PRETRAIN, "pretrain_digits")
    for width in (64, 128, 192):
        hp = keras_tuner.HyperParameters()
        model = tuning.ViTHyperModel(config, "architecture", {"hidden_size": width})
        chosen = model.config_for(hp)["model_overrides"]
        space = {h.name: h for h in hp.space}
        heads = space[f"num_heads_w{width}"].values
        assert heads and all(width % h == 0 for h in heads) and chosen["num_heads"] in heads
        assert all(8 % p == 0 for p in space["patch_size"].values)
    finetune = tuning.ViTHyperModel(runner.load_config(runner.FINETUNE), "finetune", {"learning_rate": [0.01, 0.03], "ema": True})
    hp = keras_tuner.HyperParameters()
    config = finetune.config_for(hp)
    assert {h.name: h for h in hp.space}["learning_rate"].values == [0.01, 0.03] and config["ema_decay"] == 0.9999
    assert tuning.ViTHyperModel(runner.load_config(runner.FINETUNE), "finetune").config_for(keras_tuner.HyperParameters())["base_lr"] == 0.001
    with pytest.raises(ValueError, match="space must be one of"):
        tuning.ViTHyperModel(config, "shapes")


def test_random_search_writes_results_and_a_best_config_that_runs(tmp_path):
    code, output = _tune(tmp_path, "--tuner", "random", "--max-trials", "2")
    assert code == 0, output[-3000:]
    folder = tmp_path / "p"
    rows = (folder / "trials.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("trial,status,score")
    assert "| trial | status | score |" in (folder / "trials.md").read_text()
    assert (folder / "trials.png").stat().st_size > 2000
    best = json.loads((folder / "best_config.json").read_text())
    assert best["model_overrides"]["hidden_size"] in (16, 24) and best["output_dir"].endswith("best_run")
    rerun = subprocess.run([sys.executable, "recipes/pretrain.py", "--preset", str(folder / "best_config.json")],
                           cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((folder / "best_run" / "report.json").read_text())["config"]["model_overrides"] == best["model_overrides"]


def test_hyperband(tmp_path):
    code, output = _tune(tmp_path, "--tuner", "hyperband", "--max-epochs", "2", "--steps-per-epoch", "3")
    assert code == 0, output[-3000:]
    rows = (tmp_path / "p" / "trials.csv").read_text().splitlines()[1:]
    assert len(rows) >= 2 and all(",COMPLETED," in row for row in rows)  # promoted trials load their parent's weights


def test_kill_9_during_trial_2_then_rerun_does_not_repeat_trial_1(tmp_path):
    process = _tune(tmp_path, "--tuner", "random", "--max-trials", "3", wait=False)
    for line in process.stdout:
        if "Running Trial #2" in line:
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    code, output = _tune(tmp_path, "--tuner", "random", "--max-trials", "3")
    assert code == 0, output[-3000:]
    assert "Running Trial #1\n" not in output and "Running Trial #3" in output
    rows = (tmp_path / "p" / "trials.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(",COMPLETED," in row for row in rows)


def test_a_broken_space_is_reported_and_an_all_failed_search_exits_non_zero(tmp_path):
    code, output = _tune(tmp_path, "--tuner", "random", "--max-trials", "2", "--set-space", "hidden_size=16",
                         "--set-space", "num_heads_w16=5")
    assert code == 1
    assert "failed: ValueError: Hidden size 16 is not divisible by num_heads 5" in output
    assert "all 2 trials failed" in output
