"""Hyperparameter search: search spaces, tuners, resume after kill -9, failed trials, the best config."""

import json
import os
import signal
import subprocess
import sys

import keras
import keras_tuner
import pytest

import keras_vit
from conftest import REPO
from keras_vit.train import building, settings, tuning

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
    config = settings.load_config(settings.PRETRAIN, "pretrain_digits")
    for width in (64, 128, 192):
        hp = keras_tuner.HyperParameters()
        model = tuning.ViTHyperModel(config, "architecture", {"hidden_size": width})
        chosen = model.config_for(hp)["model_overrides"]
        space = {h.name: h for h in hp.space}
        heads = space[f"num_heads_w{width}"].values
        assert heads and all(width % h == 0 for h in heads) and chosen["num_heads"] in heads
        assert all(8 % p == 0 for p in space["patch_size"].values)
    finetune = tuning.ViTHyperModel(settings.load_config(settings.FINETUNE), "finetune", {"learning_rate": [0.01, 0.03], "ema": True})
    hp = keras_tuner.HyperParameters()
    config = finetune.config_for(hp)
    assert {h.name: h for h in hp.space}["learning_rate"].values == [0.01, 0.03] and config["ema_decay"] == 0.9999
    assert tuning.ViTHyperModel(settings.load_config(settings.FINETUNE), "finetune").config_for(keras_tuner.HyperParameters())["base_lr"] == 0.001
    with pytest.raises(ValueError) as raised:
        tuning.ViTHyperModel(config, "shapes")
    assert "'shapes'" in str(raised.value) and "architecture" in str(raised.value)


def test_finetuning_the_architecture_of_a_keras_file_without_a_model_setting(tmp_path):
    keras.utils.set_random_seed(0)
    keras_vit.vision_transformer(8, 2, 16, 1, 2, 32, classes=10, channels=1).save(tmp_path / "digits.keras")
    config = settings.load_config(settings.FINETUNE, None, [
        f"weights={tmp_path / 'digits.keras'}", "image_size=8", "batch_size=16", "steps=3", "warmup_steps=1",
        "precision=float32", "eval_every=0", "crop_area=[0.6, 1.0]", "flip=false"])
    assert config["model"] is None
    hypermodel = tuning.ViTHyperModel(config, "finetune", {"learning_rate": [0.01]}, building.setup(config))
    hp = keras_tuner.HyperParameters()
    trial_config = hypermodel.config_for(hp)
    assert "classifier" not in trial_config["model_overrides"] and "classifier" not in hp.values  # the file's head
    tuner = tuning.make_tuner("random", hypermodel, max_trials=1, directory=tmp_path, project_name="p")
    tuner.search()
    (trial,) = tuner.oracle.trials.values()
    assert trial.status == "COMPLETED", trial.message
    assert tuner.get_best_models(1)[0].count_params() == keras_vit.vision_transformer(8, 2, 16, 1, 2, 32, classes=10, channels=1).count_params()


@pytest.mark.slow
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


@pytest.mark.slow
def test_hyperband(tmp_path):
    code, output = _tune(tmp_path, "--tuner", "hyperband", "--max-epochs", "2", "--steps-per-epoch", "3")
    assert code == 0, output[-3000:]
    rows = (tmp_path / "p" / "trials.csv").read_text().splitlines()[1:]
    assert len(rows) >= 2 and all(",COMPLETED," in row for row in rows)  # promoted trials load their parent's weights
    assert "retracing" not in output and "I0000" not in output


def test_the_tuner_recipe_hides_only_tensorflow_s_retracing_warning(caplog, monkeypatch):
    import logging
    import runpy

    monkeypatch.syspath_prepend(str(REPO / "recipes"))  # as when the script runs: its folder first (for _launch)
    tune = runpy.run_path(str(REPO / "recipes" / "tune.py"))
    logger = logging.getLogger("tensorflow.test_tuning")
    logger.addFilter(tune["RetracingNotice"]())
    with caplog.at_level(logging.WARNING, logger="tensorflow.test_tuning"):
        logger.warning("5 out of the last 5 calls to <bound method Trainer._train_chunk_fn> triggered tf.function retracing.")
        logger.warning("Something else went wrong.")
    assert [record.getMessage() for record in caplog.records] == ["Something else went wrong."]


@pytest.mark.slow
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
    assert "retracing" not in output  # tf.function retracing warnings are about our own trials: not shown
    rows = (tmp_path / "p" / "trials.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(",COMPLETED," in row for row in rows)


@pytest.mark.slow
def test_a_broken_space_is_reported_and_an_all_failed_search_exits_non_zero(tmp_path):
    code, output = _tune(tmp_path, "--tuner", "random", "--max-trials", "2", "--set-space", "hidden_size=16",
                         "--set-space", "num_heads_w16=5")
    assert code == 1
    failures = [line for line in output.splitlines() if line.startswith("trial ") and " failed: ValueError" in line]
    assert len(failures) == 2 and all("16" in line and "5" in line for line in failures), output[-3000:]
    assert "all 2 trials failed" in output
