"""The recipe runner: configuration presets and overrides, the command lines, the main job end to end."""

import contextlib
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import keras_vit
from conftest import REPO
from keras_vit.train import run_folder, runner


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
    kept = {p: p.read_bytes() for p in (tmp_path / "first").rglob("*") if p.is_file() and p.name != ".lock"}
    again = subprocess.run(
        [sys.executable, "recipes/main_job.py", "--quick", "--output-dir", str(tmp_path / "first"), "--seed", "1"], cwd=REPO, capture_output=True, text=True
    )
    assert again.returncode == 0 and "already holds the finished main job" in again.stdout, again.stderr[-2000:]
    assert {p: p.read_bytes() for p in (tmp_path / "first").rglob("*") if p.is_file() and p.name != ".lock"} == kept


@pytest.mark.parametrize(
    "override, message",
    [
        ("steps=abc", "steps='abc' is not allowed: expected an integer >= 1."),
        ("steps=-5", "steps=-5 is not allowed: expected an integer >= 1."),
        ("base_lr=fast", "base_lr='fast' is not allowed: expected a number >= 0"),
        ("crop_area=0.5", "crop_area=0.5 is not allowed: expected null or a list [min, max] with 0 < min <= max <= 1"),
        ("precision=float64", "precision='float64' is not allowed: expected one of 'auto', 'float32', 'mixed_bfloat16', 'mixed_float16'."),
        ("warmup_steps=-10", "warmup_steps=-10 is not allowed: expected an integer >= 0."),
        ("warmup_steps=600", "warmup_steps=600 is not allowed: expected fewer than steps=500"),
        ("flip=yes", "flip='yes' is not allowed: expected true or false."),
        ("channels=2", "channels=2 is not allowed: expected null or 1 or 3."),
    ],
)
def test_every_setting_is_checked_with_a_one_line_message(override, message):
    with pytest.raises(ValueError) as raised:
        runner.load_config(runner.FINETUNE, "finetune_short", [override])
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_a_wrong_setting_creates_nothing(tmp_path):
    config = runner.load_config(runner.FINETUNE, None, [f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="steps=-5 is not allowed"):
        runner.run({**config, "steps": -5, "warmup_steps": -10})
    assert not (tmp_path / "run").exists()
    result = subprocess.run(
        [sys.executable, "recipes/finetune.py", "--output-dir", str(tmp_path / "run"), "steps=abc"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 2 and "error: steps='abc' is not allowed: expected an integer >= 1." in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_malformed_preset_names_the_file(tmp_path):
    preset = tmp_path / "mine.json"
    preset.write_text('{"steps": 10,\n "base_lr": 0.1,,}')
    with pytest.raises(ValueError, match=rf"Preset {preset} is not valid JSON: .*line 2"):
        runner.load_config(runner.FINETUNE, str(preset))
    preset.write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"Preset {preset} must be a JSON object"):
        runner.load_config(runner.FINETUNE, str(preset))


@contextlib.contextmanager
def _keras_vit_logs(caplog, level=logging.INFO):
    logger = logging.getLogger("keras_vit")
    with caplog.at_level(level, logger="keras_vit"):
        logger.addHandler(caplog.handler)
        try:
            yield
        finally:
            logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def finished_folder_run(tmp_path_factory):
    """A 4-step run on an RGB image folder whose test split lacks a class, from a 1-channel ``.keras`` model, no model given."""
    import keras
    from PIL import Image

    import keras_vit

    root = tmp_path_factory.mktemp("folder_run")
    rng = np.random.default_rng(0)
    for split, classes in {"train": ("ant", "bee", "cat"), "test": ("ant", "cat")}.items():
        for name in classes:
            (root / "data" / split / name).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype="uint8")).save(root / "data" / split / name / f"{i}.png")
    keras.utils.set_random_seed(0)
    source = keras_vit.vision_transformer(8, 2, 16, 1, 2, 32, classes=10, channels=1)
    source.save(root / "digits.keras")
    overrides = [
        f"dataset=folder:{root / 'data'}", f"weights={root / 'digits.keras'}", "image_size=8", "batch_size=4", "steps=4",
        "warmup_steps=1", "crop_area=[0.6, 1.0]", "flip=false", "precision=float32", "eval_every=2", "checkpoint_every=2",
        "log_every=2", f"output_dir={root / 'run'}",
    ]
    config = runner.load_config(runner.FINETUNE, None, overrides)
    assert config["model"] is None and config["channels"] is None
    report = runner.run(config)
    return config, report, source


def test_keras_file_gives_the_architecture_and_splits_share_labels(finished_folder_run):
    import keras

    import keras_vit

    config, report, source = finished_folder_run
    assert 0.0 <= report["top1"] <= 1.0 and [r["step"] for r in report["history"]] == [2, 4]
    model = keras.models.load_model(f"{config['output_dir']}/model.keras")
    assert model.input.shape == (None, 8, 8, 1) and model.output.shape == (None, 3)  # the file's 1 channel, 3 folder classes
    assert model.count_params() == keras_vit.vision_transformer(8, 2, 16, 1, 2, 32, classes=3, channels=1).count_params()


def test_the_report_names_the_classes_of_the_outputs(finished_folder_run):
    import keras

    import keras_vit

    config, report, _ = finished_folder_run
    stored = json.loads((Path(config["output_dir"]) / "report.json").read_text())
    assert report["class_names"] == stored["class_names"] == ["ant", "bee", "cat"]  # the train split's folders
    model = keras.models.load_model(f"{config['output_dir']}/model.keras")
    scores = model.predict(np.zeros((1, 8, 8, 1), "float32"), verbose=0)
    (best, name, _), = keras_vit.decode_predictions(scores, top=1, class_names=stored["class_names"])[0]
    assert name == stored["class_names"][int(scores[0].argmax())] and best == int(scores[0].argmax())


def test_rerunning_a_finished_run_keeps_its_outputs(finished_folder_run, caplog):
    config, report, _ = finished_folder_run
    output = Path(config["output_dir"])
    kept = {name: ((output / name).read_bytes(), (output / name).stat().st_mtime_ns) for name in ("report.json", "history.csv", "training.png", "model.keras")}
    with _keras_vit_logs(caplog):
        again = runner.run(config)
    assert again["already_finished"] and again["top1"] == report["top1"] and again["history"] == json.loads(json.dumps(report["history"]))
    assert f"{output} already holds this finished run (top-1 {report['top1']:.4f} after 4 steps): nothing to do" in caplog.text
    for name, (content, mtime) in kept.items():
        assert (output / name).read_bytes() == content and (output / name).stat().st_mtime_ns == mtime, name


def test_checkpoints_of_other_settings_name_the_differences(finished_folder_run):
    config, _, _ = finished_folder_run
    with pytest.raises(run_folder.SettingsMismatchError) as raised:
        runner.run({**config, "base_lr": 0.02, "mixup_alpha": 0.2})
    message = str(raised.value)
    assert f"{config['output_dir']} holds checkpoints of another configuration (base_lr: 0.01 in the folder, 0.02 now; mixup_alpha: 0.0 in the folder, 0.2 now)" in message
    assert "\n" not in message


def test_a_live_run_locks_its_folder_and_a_dead_one_does_not(finished_folder_run, caplog):
    config, _, _ = finished_folder_run
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from keras_vit.train import run_folder\n"
         f"with run_folder.lock({config['output_dir']!r}):\n    print('locked', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_folder.FolderInUseError) as raised:
            runner.run(config)
        assert str(raised.value) == (
            f"Output folder {config['output_dir']} is in use by another run (pid {holder.pid} on {socket.gethostname()}): "
            "wait for it to end, stop it, or choose another output_dir."
        )
    finally:
        holder.kill()  # like kill -9: the lock file stays, its flock goes
        holder.wait()
    assert (Path(config["output_dir"]) / ".lock").read_text() == f"pid {holder.pid} on {socket.gethostname()}"
    with _keras_vit_logs(caplog):
        assert runner.run(config)["already_finished"]
    assert f"Took over the lock of {config['output_dir']} from an ended run (pid {holder.pid}" in caplog.text
    assert not (Path(config["output_dir"]) / ".lock").exists()  # released at the end
