"""The recipe runner: command lines, run folders (lock, settings, upgrades, finished runs), weights files, the main job."""

import contextlib
import json
import logging
import os
import runpy
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_vit
from conftest import REPO, TINY_RUN, fixture_path
from keras_vit.train import building, command_line, run_folder, runner, settings

sys.path.insert(0, str(REPO / "recipes"))
import _launch  # noqa: E402

V1_FOLDER = REPO / "tests" / "data" / "run_folder_v1"


def _tiny(tmp_path, *overrides, name="run"):
    return settings.load_config(settings.FINETUNE, None, TINY_RUN + [f"output_dir={tmp_path / name}", *overrides])


@contextlib.contextmanager
def _keras_vit_logs(caplog, level=logging.INFO):
    logger = logging.getLogger("keras_vit")
    with caplog.at_level(level, logger="keras_vit"):
        logger.addHandler(caplog.handler)
        try:
            yield
        finally:
            logger.removeHandler(caplog.handler)


# --- command lines ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["finetune.py", "pretrain.py", "pretrain_ssl.py", "main_job.py", "tune.py"])
def test_recipe_help_answers_before_keras_and_tensorflow_are_imported(script):
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, '--help']; sys.path.insert(0, 'recipes')\n"
        "try:\n"
        f"    runpy.run_path('recipes/{script}', run_name='__main__')\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0, done.code\n"
        "print(sorted(m for m in ('keras', 'tensorflow', 'keras_vit', 'jax', 'torch') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and result.stdout.strip().splitlines()[-1] == "[]"


def test_tune_recipe_offers_the_tuning_module_s_choices():
    from keras_vit.train import tuning

    tune = runpy.run_path(str(REPO / "recipes" / "tune.py"))
    assert (tune["SPACES"], tune["TUNERS"], tune["TRIAL_METRICS"]) == (tuning.SPACES, tuple(sorted(tuning.TUNERS)), tuning.TRIAL_METRICS)


def _command(*argv):
    """``(exit status, stdout, stderr)`` of a single-stage recipe's command line, in this process."""

    def error(message):
        raise SystemExit((2, message))

    parser = _launch.recipe_parser("test")
    out, err = [], []
    with contextlib.redirect_stdout(_Writer(out)), contextlib.redirect_stderr(_Writer(err)):
        try:
            code = command_line.recipe_main("finetune", _launch.parse_recipe_args(parser, list(argv)), error)
        except SystemExit as stop:
            code, message = stop.code
            err.append(message)
    return code, "".join(out), "".join(err)


class _Writer:
    def __init__(self, parts):
        self.parts = parts

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass


def test_recipe_command_line_prints_the_resolved_config_and_refuses_wrong_settings(tmp_path):
    code, out, _ = _command("--preset", "finetune_oxford_iiit_pet", "--print-config", "base_lr=0.03")
    config = json.loads(out)
    assert code == 0 and (config["dataset"], config["steps"], config["base_lr"]) == ("oxford_iiit_pet", 500, 0.03)
    code, _, err = _command("--output-dir", str(tmp_path / "run"), "steps=abc")
    assert code == 2 and err.startswith("steps='abc' is not allowed")
    code, _, err = _command("nonsense")
    assert code == 2 and "'nonsense'" in err
    code, out, _ = _command("--list-settings")
    assert code == 0 and out == settings.settings_table()
    assert not (tmp_path / "run").exists()


def test_settings_go_anywhere_on_a_recipe_s_command_line_and_also_as_options():
    code, out, err = _command("--preset", "finetune_oxford_iiit_pet", "base_lr=0.03", "--print-config", "--seed", "1",
                              "steps=700", "--warmup-steps=30", "--output-dir", "runs/x", "flip=false")
    config = json.loads(out)
    assert code == 0, err
    assert (config["base_lr"], config["seed"], config["steps"], config["warmup_steps"], config["flip"]) == (0.03, 1, 700, 30, False)
    assert (config["dataset"], config["output_dir"]) == ("oxford_iiit_pet", "runs/x")
    code, _, err = _command("--print-config", "--sede", "1")
    assert code == 2 and "'sede'" in err and "'seed'" in err  # an unknown setting, with the closest one


@pytest.mark.slow
def test_recipe_scripts_exit_with_the_argparse_status_and_no_start_up_notices(tmp_path):
    result = subprocess.run([sys.executable, "recipes/pretrain.py", "--output-dir", str(tmp_path / "run"), "steps=abc"],
                            cwd=REPO, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert result.returncode == 2 and "error: steps='abc' is not allowed" in result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith(("I0000", "E0000", "W0000", "WARNING: All log"))], result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "line, without_driver, notice",
    [
        ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR", False, True),
        ("I0000 00:00:1.5 8293 port.cc:153] oneDNN custom operations are on. You may see ...", False, True),
        ("I0000 00:00:1.5 8293 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.", True, True),
        ("E0000 00:00:1.5 8293 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error", True, True),
        ("E0000 00:00:1.5 8293 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error", False, False),
        ("Traceback (most recent call last):", True, False),
    ],
)
def test_only_tensorflow_s_start_up_notices_are_filtered(line, without_driver, notice):
    assert _launch.is_start_up_notice(line, without_driver) is notice


# --- a finished run on an image folder, from a .keras file --------------------------------------------------


@pytest.fixture(scope="module")
def finished_folder_run(tmp_path_factory):
    """A 4-step run on an RGB image folder whose test split lacks a class, from a 1-channel ``.keras`` model, no
    model given; ``loads`` counts the ``keras.models.load_model`` calls of the run."""
    from PIL import Image

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
    config = settings.load_config(settings.FINETUNE, None, overrides)
    assert config["model"] is None and config["channels"] is None
    loads = []
    load_model = keras.models.load_model
    keras.models.load_model = lambda *a, **k: loads.append(a[0]) or load_model(*a, **k)
    try:
        report = runner.run(config)
    finally:
        keras.models.load_model = load_model
    return config, report, source, loads


def test_keras_file_gives_the_architecture_read_once_and_splits_share_labels(finished_folder_run):
    config, report, source, loads = finished_folder_run
    assert [str(path) for path in loads] == [config["weights"]]  # the file is read once
    assert [r["step"] for r in report["history"]] == [2, 4]
    model = keras.models.load_model(f"{config['output_dir']}/model.keras")
    assert model.input.shape == (None, 8, 8, 1) and model.output.shape == (None, 3)  # the file's 1 channel, 3 folder classes
    assert model.count_params() == keras_vit.vision_transformer(8, 2, 16, 1, 2, 32, classes=3, channels=1).count_params()
    # the encoder is the file's: every weight but the new head
    for layer in ("embedding", "posembed_input", "encoderblock_0"):
        for a, b in zip(model.get_layer(layer).get_weights(), source.get_layer(layer).get_weights()):
            assert a.shape == b.shape


def test_the_report_is_the_history_of_the_run(finished_folder_run):
    config, report, _, _ = finished_folder_run
    stored = json.loads((Path(config["output_dir"]) / "report.json").read_text())
    assert stored["history"] == json.loads(json.dumps(report["history"]))
    assert (report["backend"], report["loop"], report["replicas"], report["precision"]) == ("tensorflow", "trainer", 1, "float32")
    for row in report["history"]:
        assert set(row) >= {"step", "loss", "accuracy", "val_accuracy", "learning_rate", "images_per_second"}
    assert report["images_per_second"] == report["history"][-1]["images_per_second"]
    csv_rows = (Path(config["output_dir"]) / "history.csv").read_text().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].startswith("epoch,")


def test_the_report_names_the_classes_of_the_outputs(finished_folder_run):
    import keras

    import keras_vit

    config, report, _, _ = finished_folder_run
    stored = json.loads((Path(config["output_dir"]) / "report.json").read_text())
    assert report["class_names"] == stored["class_names"] == ["ant", "bee", "cat"]  # the train split's folders
    model = keras.models.load_model(f"{config['output_dir']}/model.keras")
    assert model.class_names == stored["class_names"]  # stored with the model too
    scores = model.predict(np.zeros((1, 8, 8, 1), "float32"), verbose=0)
    (best, name, _), = keras_vit.decode_predictions(scores, top=1, class_names=stored["class_names"])[0]
    assert name == stored["class_names"][int(scores[0].argmax())] and best == int(scores[0].argmax())


def test_rerunning_a_finished_run_keeps_its_outputs(finished_folder_run, caplog):
    config, report, _, _ = finished_folder_run
    output = Path(config["output_dir"])
    kept = {name: ((output / name).read_bytes(), (output / name).stat().st_mtime_ns) for name in ("report.json", "history.csv", "training.png", "model.keras")}
    with _keras_vit_logs(caplog):
        again = runner.run(config)
    assert again["already_finished"] and again["top1"] == report["top1"] and again["history"] == json.loads(json.dumps(report["history"]))
    assert f"{output} already holds this finished run" in caplog.text
    for name, (content, mtime) in kept.items():
        assert (output / name).read_bytes() == content and (output / name).stat().st_mtime_ns == mtime, name


def test_the_same_weights_file_by_another_path_is_the_same_run(finished_folder_run, monkeypatch):
    config, report, _, _ = finished_folder_run
    weights = Path(config["weights"])
    monkeypatch.chdir(weights.parent)
    again = runner.run({**config, "weights": weights.name, "dataset": "folder:data"})  # relative paths now
    assert again["already_finished"] and again["top1"] == report["top1"]


def test_checkpoints_of_other_settings_name_the_differences(finished_folder_run):
    config, _, _, _ = finished_folder_run
    with pytest.raises(run_folder.SettingsMismatchError) as raised:
        runner.run({**config, "base_lr": 0.02, "mixup_alpha": 0.2})
    message = str(raised.value)
    assert "base_lr: 0.01 in the folder, 0.02 now" in message and "mixup_alpha: 0.0 in the folder, 0.2 now" in message
    assert config["output_dir"] in message and "\n" not in message


def test_a_live_run_locks_its_folder_and_a_dead_one_does_not(finished_folder_run, caplog):
    config, _, _, _ = finished_folder_run
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"handle = open({str(Path(config['output_dir']) / '.lock')!r}, 'a+'); fcntl.flock(handle, fcntl.LOCK_EX)\n"
         "handle.write(f'pid {__import__(\"os\").getpid()} on here'); handle.flush(); print('locked', flush=True); time.sleep(120)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_folder.FolderInUseError) as raised:
            runner.run(config)
        assert config["output_dir"] in str(raised.value) and f"pid {holder.pid} on here" in str(raised.value)
    finally:
        holder.kill()  # like kill -9: the lock file stays, its flock goes
        holder.wait()
    with _keras_vit_logs(caplog):
        assert runner.run(config)["already_finished"]
    (took_over,) = {r.getMessage() for r in caplog.records if r.name == "keras_vit.train.run_folder"}
    assert config["output_dir"] in took_over and f"pid {holder.pid} " in took_over
    assert not (Path(config["output_dir"]) / ".lock").exists()  # released at the end
    with run_folder.lock(config["output_dir"]):
        assert (Path(config["output_dir"]) / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}"


def _copy_of(finished_folder_run, tmp_path):
    """The finished run's config pointing at a copy of its folder (which the test may change)."""
    config = finished_folder_run[0]
    shutil.copytree(config["output_dir"], tmp_path / "copy")
    return {**config, "output_dir": str(tmp_path / "copy")}


def test_a_folder_of_another_training_loop_is_refused(finished_folder_run, tmp_path):
    """A TensorFlow (Trainer) folder resumed under JAX, where loop=auto is Keras' fit loop, was accepted and the new
    history.csv rows landed under the Trainer's columns."""
    config = _copy_of(finished_folder_run, tmp_path)
    folder = Path(config["output_dir"])
    assert run_folder.written_by(folder) == {"loop": "trainer", "backend": "tensorflow"}
    with pytest.raises(run_folder.LoopMismatchError) as refused:
        runner.open_folder(folder, config, {"loop": "fit", "backend": "jax"})
    assert (refused.value.stored, refused.value.current) == ({"loop": "trainer", "backend": "tensorflow"}, {"loop": "fit", "backend": "jax"})
    record = json.loads((folder / "settings.json").read_text())
    del record["written_by"]  # a folder written before settings.json named its loop: history.csv tells
    (folder / "settings.json").write_text(json.dumps(record))
    with pytest.raises(run_folder.LoopMismatchError) as refused:
        runner.open_folder(folder, config, {"loop": "fit", "backend": "torch"})
    assert refused.value.stored["loop"] == "trainer"
    assert runner.run(config)["already_finished"] and run_folder.written_by(folder)["loop"] == "trainer"


def test_execution_settings_do_not_block_a_resume(finished_folder_run):
    config = finished_folder_run[0]
    changed = {"jit_compile": False, "steps_per_execution": 2, "cache": False, "shuffle_buffer": 7}
    assert set(changed) == set(settings.RESUMABLE_SETTINGS)
    assert runner.run({**config, **changed})["already_finished"]


@pytest.mark.parametrize("content", ["", "{", "[]", '{"schema_version": 3}'])
def test_an_unreadable_settings_json_is_rebuilt_when_the_checkpoints_are_this_run_s(finished_folder_run, tmp_path, content, caplog):
    config = _copy_of(finished_folder_run, tmp_path)
    folder = Path(config["output_dir"])
    (folder / "settings.json").write_text(content)
    with pytest.raises(run_folder.SettingsMismatchError) as refused:
        runner.run({**config, "base_lr": 0.5})
    assert refused.value.folder == folder and len(refused.value.differences) == 1
    with _keras_vit_logs(caplog, logging.WARNING):
        assert runner.run(config)["already_finished"]
    assert str(folder / "settings.json") in caplog.text
    assert run_folder.stored_settings(folder)[2] == settings.training_settings(config)


def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(run_folder.FolderNotWritableError) as refused:
        runner.run(_tiny(tmp_path, name="a_file/run"))
    assert refused.value.folder == tmp_path / "a_file" / "run" and refused.value.errno is not None
    code, _, err = _command("--output-dir", str(tmp_path / "a_file" / "run"), *TINY_RUN)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused(tmp_path):
    (tmp_path / "read_only").mkdir(mode=0o500)
    with pytest.raises(run_folder.FolderNotWritableError):
        runner.run(_tiny(tmp_path, name="read_only/run"))


def test_a_full_disk_is_one_line_and_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    import errno

    from keras_vit.train import checkpointing

    def full(path, **arrays):
        Path(path).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpointing.np, "savez", full)
    code, _, err = _command("--output-dir", str(tmp_path / "run"), *TINY_RUN)
    assert code == 1 and len(err.strip().splitlines()) == 1 and os.strerror(errno.ENOSPC) in err
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == []


def test_temporaries_of_a_killed_run_are_deleted_by_the_next(finished_folder_run, tmp_path):
    from keras_vit.train import reporting

    config = _copy_of(finished_folder_run, tmp_path)
    folder = Path(config["output_dir"])
    left = [folder / name for name in reporting.TEMPORARIES + run_folder.TEMPORARIES]
    left += [folder / "checkpoints" / "checkpoint.tmp", folder / "checkpoints" / ".ckpt-6.tmp" / "model.npz"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left by kill -9")
    assert runner.run(config)["already_finished"]
    assert not [path for path in left if path.exists()] and not (folder / "checkpoints" / ".ckpt-6.tmp").exists()


# --- upgrades: a folder written before settings had a schema version -----------------------------------------


def test_a_run_folder_of_schema_version_1_resumes_and_finishes(tmp_path, caplog):
    folder = tmp_path / "run"
    shutil.copytree(V1_FOLDER, folder)
    assert "schema_version" not in json.loads((folder / "settings.json").read_text())
    config = _tiny(tmp_path)
    with _keras_vit_logs(caplog):
        report = runner.run(config)
    assert f"Restored step 4 from {folder / 'checkpoints' / 'ckpt-4'}" in caplog.text
    assert [row["step"] for row in report["history"]] == [4, 8]
    assert report["history"][0]["val_accuracy"] == pytest.approx(0.10277777, abs=1e-6)  # the row written at 410d757
    version, run_id, stored = run_folder.stored_settings(folder)
    assert version == settings.SCHEMA_VERSION and stored == settings.training_settings(config)
    assert run_id == json.loads((folder / "checkpoints" / "ckpt-8" / "state.json").read_text())["run_id"]
    assert run_id == json.loads((V1_FOLDER / "checkpoints" / "ckpt-4" / "state.json").read_text())["run_id"]
    assert runner.run(config)["already_finished"]


def test_a_real_change_to_a_version_1_folder_is_refused_in_one_line(tmp_path):
    shutil.copytree(V1_FOLDER, tmp_path / "run")
    for changed, named in ((["base_lr=0.02"], "base_lr: 0.01 in the folder, 0.02 now"), (["loop=fit"], 'loop: "auto" in the folder, "fit" now')):
        with pytest.raises(run_folder.SettingsMismatchError) as raised:
            runner.run(_tiny(tmp_path, *changed))
        assert named in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "run" / "checkpoints" / "ckpt-8").exists()


# --- weights files and data without which nothing should start --------------------------------------------


def test_an_official_npz_without_a_model_setting_gives_the_architecture(tmp_path):
    npz = str(fixture_path("vit_tiny_token", "ckpt"))
    config = _tiny(tmp_path, f"weights={npz}", "model=null", 'model_overrides={"channels": 1}', "image_size=16", "steps=2", "warmup_steps=1", "eval_every=2", "checkpoint_every=2")
    assert config["model"] is None
    report = runner.run(config)
    expected = keras_vit.from_official_checkpoint(npz, image_size=16, classes=10, channels=1)
    assert report["parameters"] == expected.count_params() and report["steps"] == 2
    model = keras.models.load_model(tmp_path / "run" / "model.keras")
    assert model.vit_config["hidden_size"] == 48 and model.vit_config["num_layers"] == 2  # the fixture's, not B/16's


def test_an_empty_evaluation_split_is_refused_before_anything_trains(tmp_path, monkeypatch):
    from keras_vit.train import data

    real = data.load_source
    monkeypatch.setattr(data, "load_source", lambda spec, split, *a, **k: real(spec, split, *a, **k) if split == "train" else data.from_arrays(np.zeros((0, 8, 8, 1)), np.zeros((0,)), 10))
    with pytest.raises(ValueError) as raised:
        runner.run(_tiny(tmp_path))
    assert "eval_split='test'" in str(raised.value) and "no examples" in str(raised.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lora_rank_fine_tunes_the_query_and_value_factors_and_the_head(tmp_path):
    environment = building.Environment("tensorflow", "trainer", None, "float32")
    building.build_model(_tiny(tmp_path), 10, environment).save(tmp_path / "pretrained.keras")
    config = _tiny(tmp_path, "lora_rank=2", f"weights={tmp_path / 'pretrained.keras'}")
    model = building.build_model(config, 10, environment)
    trainable = {v.path.split("/", 1)[-1] for v in model.trainable_variables}
    assert trainable == {"MultiHeadDotProductAttention_1/query/lora_kernel_a", "MultiHeadDotProductAttention_1/query/lora_kernel_b",
                         "MultiHeadDotProductAttention_1/value/lora_kernel_a", "MultiHeadDotProductAttention_1/value/lora_kernel_b",
                         "kernel", "bias"}  # the head's kernel and bias
    report = runner.run(config)
    assert report["trainable_parameters"] == sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert report["trainable_parameters"] < report["parameters"] / 2


def test_a_one_class_folder_is_refused_before_training(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 1), 40 * i, "uint8")[..., 0]).save(tmp_path / "data" / split / "cat" / f"{i}.png")
    with pytest.raises(settings.SettingError) as refused:
        runner.run(_tiny(tmp_path, f"dataset=folder:{tmp_path / 'data'}"))
    assert (refused.value.name, refused.value.value) == ("dataset", f"folder:{tmp_path / 'data'}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_mistyped_model_override_is_refused_naming_the_setting_it_meant(tmp_path):
    config = settings.load_config(settings.FINETUNE, None, TINY_RUN + ['model_overrides={"hiden_size": 8, "dropout_rat": 0.5}'])
    environment = building.Environment("tensorflow", "trainer", None, "float32")
    with pytest.raises(TypeError) as raised:
        building.build_model(config, 10, environment)
    message = str(raised.value)
    assert "'hiden_size' (did you mean 'hidden_size'?)" in message
    assert "'dropout_rat' (did you mean 'dropout_rate'?)" in message


def test_precision_is_the_models_own_and_the_global_policy_stays(tmp_path):
    config = settings.load_config(settings.FINETUNE, None, TINY_RUN + ["precision=mixed_bfloat16"])
    environment = building.Environment("tensorflow", "trainer", None, "mixed_bfloat16")
    model = building.build_model(config, 10, environment)
    assert keras.config.dtype_policy().name == "float32"
    assert model.get_config()["dtype"] == "mixed_bfloat16" and model.get_layer("encoderblock_0").compute_dtype == "bfloat16"


# --- the main job --------------------------------------------------------------------------------------------


def _main_job(output_dir, *args, env=None):
    result = subprocess.run(
        [sys.executable, "recipes/main_job.py", "--quick", "--output-dir", str(output_dir), *args],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result, json.loads((output_dir / "report.json").read_text())


@pytest.mark.slow
def test_main_job_quick_end_to_end_is_deterministic(tmp_path):
    result, report = _main_job(tmp_path / "first", "--seed", "1")
    assert report["pretrain"]["resolution"] == 8 and report["finetune"]["resolution"] == 16
    assert report["seed"] == 1 and report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert report["machine"]["keras_vit"] == keras_vit.__version__ and report["machine"]["backend"] == "tensorflow"
    assert [line for line in result.stderr.splitlines() if line.startswith("keras_vit.pretrained.adapt:") and "8x8" in line]
    assert not [line for line in result.stderr.splitlines() if line.startswith(("I0000", "E0000", "WARNING: All log"))]
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


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_main_job_quick_runs_on_the_jax_and_torch_backends(tmp_path, backend):
    pytest.importorskip(backend)
    _, report = _main_job(tmp_path / backend, env={"KERAS_BACKEND": backend})
    assert report["machine"]["backend"] == backend and report["machine"][backend]
    for stage in ("pretrain", "finetune"):
        stage_report = json.loads((tmp_path / backend / stage / "report.json").read_text())
        assert (stage_report["backend"], stage_report["loop"], stage_report["strategy"]) == (backend, "fit", None)
        assert [row["step"] for row in stage_report["history"]] == [10, 20]
        assert all(np.isfinite(row["loss"]) for row in stage_report["history"])


def test_eval_image_sizes_evaluate_the_trained_model_as_one_model_of_any_size(tmp_path):
    config = settings.load_config(settings.FINETUNE, None, TINY_RUN + [f"output_dir={tmp_path / 'run'}",
                                                                        "eval_image_sizes=[8, 12, [8, 16]]"])
    report = runner.run(config)
    by_size = report["top1_by_image_size"]
    assert set(by_size) == {"8x8", "12x12", "8x16"}
    assert by_size["8x8"] == pytest.approx(report["top1"], abs=1e-9)  # the trained size: the run's own top-1
    assert json.loads((tmp_path / "run" / "report.json").read_text())["top1_by_image_size"] == by_size
    with pytest.raises(settings.SettingError) as refused:
        settings.load_config(settings.PRETRAIN_SSL, None, ["eval_image_sizes=[8]", "dataset=digits", "image_size=8"])
    assert "eval_image_sizes" in str(refused.value)


# --- the run's deliverable ----------------------------------------------------------------------------------------


def _model_keras_parts(path):
    """``(compile_config, top-level groups of the weights file)`` of a ``.keras`` file."""
    import io
    import zipfile

    import h5py

    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
        with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as weights:
            groups = sorted(weights)
    return config.get("compile_config"), groups


def test_the_model_of_a_fit_run_loads_with_the_model_library_alone(tmp_path, monkeypatch):
    """loop=fit (the default on JAX and torch) saved its compile state: the schedule of keras_vit.train was needed."""
    from keras_vit.train import checkpointing

    runner.run(_tiny(tmp_path, "loop=fit"))
    path = tmp_path / "run" / "model.keras"
    compile_config, groups = _model_keras_parts(path)
    assert not compile_config and "optimizer" not in groups
    monkeypatch.delitem(keras.saving.get_custom_objects(), "keras_vit>WarmupDecay")  # as in a process without it
    model = keras.saving.load_model(path)
    trained = checkpointing.read(checkpointing.CheckpointManager(tmp_path / "run" / "checkpoints").latest_checkpoint)
    for variable in model.weights:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), trained[variable.path])
    assert keras_vit.from_official_checkpoint(path).count_params() == model.count_params()


@pytest.mark.slow
def test_the_model_of_a_fit_run_loads_in_a_process_that_imports_only_keras_vit(tmp_path):
    runner.run(_tiny(tmp_path, "loop=fit"))
    code = (
        "import sys, keras, keras_vit\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "again = keras_vit.from_official_checkpoint(sys.argv[1])\n"
        "assert 'keras_vit.train' not in sys.modules and model.count_params() == again.count_params()\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run" / "model.keras")], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]


def test_eval_image_sizes_the_model_cannot_take_are_refused_before_training(tmp_path):
    with pytest.raises(settings.SettingError) as refused:
        runner.run(_tiny(tmp_path, "eval_image_sizes=[8, 33]"))  # 33 is not a multiple of the patch size 2
    assert str(refused.value).startswith("eval_image_sizes=[8, 33] is not allowed")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_evaluation_that_fails_after_training_keeps_the_model(tmp_path, monkeypatch):
    from keras_vit.train import reporting

    config = _tiny(tmp_path, "eval_image_sizes=[12]")
    real = reporting.top1_by_image_size

    def fails(*args, **kwargs):
        raise MemoryError("out of memory at 12x12")

    monkeypatch.setattr(reporting, "top1_by_image_size", fails)
    with pytest.raises(MemoryError):
        runner.run(config)
    folder = tmp_path / "run"
    assert (folder / "model.keras").exists() and not (folder / "report.json").exists()
    trained = keras.saving.load_model(folder / "model.keras").get_weights()
    monkeypatch.setattr(reporting, "top1_by_image_size", real)
    report = runner.run(config)  # evaluates again from the final checkpoint: no step is trained again
    assert "already_finished" not in report and set(report["top1_by_image_size"]) == {"12x12"}
    assert [row["step"] for row in report["history"]] == [4, 8]
    for a, b in zip(keras.saving.load_model(folder / "model.keras").get_weights(), trained):
        np.testing.assert_array_equal(a, b)
