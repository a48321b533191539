"""The recipe runner: configuration presets and overrides, the command lines, the main job end to end."""

import json
import subprocess
import sys

import pytest

import keras_vit
from conftest import REPO
from keras_vit.train import runner


def test_every_preset_loads_into_its_recipe():
    presets = sorted(runner.PRESETS_DIR.glob("*.json"))
    assert {p.stem for p in presets} >= {"finetune_cifar10", "finetune_oxford_iiit_pet", "pretrain_digits", "finetune_digits"}
    for path in presets:
        defaults = runner.PRETRAIN if path.stem.startswith("pretrain") else runner.FINETUNE
        config = runner.load_config(defaults, path.stem)
        assert config["steps"] > config["warmup_steps"]


def test_finetune_defaults_are_the_official_ones():
    config = runner.load_config(runner.FINETUNE, "finetune_cifar10")
    assert (config["optimizer"], config["momentum"], config["grad_clip"], config["weight_decay"]) == ("sgd", 0.9, 1.0, 0.0)
    assert (config["batch_size"], config["warmup_steps"], config["decay"], config["image_size"]) == (512, 500, "cosine", 384)
    assert (config["steps"], config["base_lr"]) == (10_000, 0.01)
    pretrain = runner.load_config(runner.PRETRAIN)
    assert (pretrain["optimizer"], pretrain["beta_1"], pretrain["beta_2"], pretrain["weight_decay"]) == ("adam", 0.9, 0.999, 0.1)
    assert (pretrain["batch_size"], pretrain["warmup_steps"], pretrain["decay"]) == (4096, 10_000, "linear")


def test_overrides_parse_json_values():
    config = runner.load_config(runner.FINETUNE, None, ["base_lr=0.003", "randaugment=[2, 15]", "weights=null", "model=S/16", "model_overrides.dropout_rate=0.1"])
    assert config["base_lr"] == 0.003 and config["randaugment"] == [2, 15] and config["weights"] is None
    assert config["model"] == "S/16" and config["model_overrides"] == {"dropout_rate": 0.1}
    with pytest.raises(ValueError, match="Unknown setting 'learning_rate'. Settings: accumulation_steps"):
        runner.load_config(runner.FINETUNE, None, ["learning_rate=0.1"])
    with pytest.raises(ValueError, match="Unknown preset 'nope'.*finetune_cifar10"):
        runner.load_config(runner.FINETUNE, "nope")


def test_recipe_command_line_prints_the_resolved_config():
    result = subprocess.run(
        [sys.executable, "recipes/finetune.py", "--preset", "finetune_oxford_iiit_pet", "--print-config", "base_lr=0.03"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert (config["dataset"], config["steps"], config["base_lr"]) == ("oxford_iiit_pet", 500, 0.03)
    bad = subprocess.run([sys.executable, "recipes/pretrain.py", "nonsense"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "Overrides are key=value" in bad.stderr


def _main_job(output_dir, *args):
    result = subprocess.run(
        [sys.executable, "recipes/main_job.py", "--quick", "--output-dir", str(output_dir), *args],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result, json.loads((output_dir / "report.json").read_text())


def test_main_job_quick_end_to_end_is_deterministic(tmp_path):
    result, report = _main_job(tmp_path / "first", "--seed", "1")
    assert report["pretrain"]["resolution"] == 8 and report["finetune"]["resolution"] == 16
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert report["seed"] == 1 and report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert report["machine"]["keras_vit"] == keras_vit.__version__
    assert "Interpolated position embeddings from 16 grid tokens to a 8x8 grid" in result.stderr
    for stage in ("pretrain", "finetune"):
        assert (tmp_path / "first" / stage / "model.keras").exists() and (tmp_path / "first" / stage / "history.csv").exists()
        assert (tmp_path / "first" / stage / "training.png").stat().st_size > 5000
        assert list((tmp_path / "first" / stage / "logs").iterdir())
    _, again = _main_job(tmp_path / "second", "--seed", "1")
    accuracies = lambda r: (r["pretrain"]["top1"], r["finetune"]["top1"], r["pretrain_fewshot"])  # noqa: E731
    assert accuracies(again) == accuracies(report)
