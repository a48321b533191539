"""The settings schema: defaults, presets, overrides, validation, upgrades of stored settings, the docs table."""

import dataclasses
import json
import os

import pytest

from conftest import REPO
from keras_vit.train import settings


def test_every_setting_is_declared_once_with_a_rule_help_and_a_default_it_accepts():
    names = [field.name for section in settings.SECTIONS for field in dataclasses.fields(section)]
    assert len(names) == len(set(names)) == len(settings.SETTINGS)
    for name, described in settings.SETTINGS.items():
        assert described.help and described.rule.allowed and described.since <= settings.SCHEMA_VERSION, name
        assert described.rule.check(described.default), (name, described.default)
    assert set(settings.REPORTING_SETTINGS) == {"output_dir", "eval_every", "checkpoint_every", "log_every", "cluster_timeout",
                                                "eval_image_sizes", "engine"}
    fresh = settings.defaults()
    fresh["model_overrides"]["dropout_rate"] = 0.5  # mutable defaults are copies
    assert settings.defaults()["model_overrides"] == {}


def test_the_docs_table_is_the_schema():
    text = (REPO / "docs" / "SETTINGS.md").read_text()
    assert text[text.index("| setting |"):] == settings.settings_table()


def test_every_preset_loads_into_its_recipe():
    assert {"finetune_cifar10", "finetune_oxford_iiit_pet", "pretrain_digits", "finetune_digits"} <= set(settings.preset_names())
    for name in settings.preset_names():
        defaults = settings.PRETRAIN_SSL if name.startswith("pretrain_ssl") else settings.PRETRAIN if name.startswith("pretrain") else settings.FINETUNE
        config = settings.load_config(defaults, name)
        assert set(config) == set(settings.SETTINGS) and config["steps"] > config["warmup_steps"], name


def test_finetune_and_pretrain_defaults_are_the_official_ones():
    config = settings.load_config(settings.FINETUNE, "finetune_cifar10")
    assert (config["optimizer"], config["momentum"], config["grad_clip"], config["weight_decay"]) == ("sgd", 0.9, 1.0, 0.0)
    assert (config["batch_size"], config["warmup_steps"], config["decay"], config["image_size"]) == (512, 500, "cosine", 384)
    assert (config["steps"], config["base_lr"]) == (10_000, 0.01)
    pretrain = settings.load_config(settings.PRETRAIN)
    assert (pretrain["optimizer"], pretrain["beta_1"], pretrain["beta_2"], pretrain["weight_decay"]) == ("adam", 0.9, 0.999, 0.1)
    assert (pretrain["batch_size"], pretrain["warmup_steps"], pretrain["decay"]) == (4096, 10_000, "linear")


def test_overrides_parse_json_values():
    config = settings.load_config(settings.FINETUNE, None, ["base_lr=0.003", "randaugment=[2, 10]", "weights=null", "model=S/16", "model_overrides.dropout_rate=0.1"])
    assert config["base_lr"] == 0.003 and config["randaugment"] == [2, 10] and config["weights"] is None
    assert config["model"] == "S/16" and config["model_overrides"] == {"dropout_rate": 0.1}


@pytest.mark.parametrize("typo, meant", [("base_lrr", "base_lr"), ("learning_rate", "base_lr"), ("stepz", "steps")])
def test_an_unknown_setting_is_refused_suggesting_the_closest(typo, meant, tmp_path):
    with pytest.raises(settings.UnknownSettingError) as raised:
        settings.load_config(settings.FINETUNE, None, [f"{typo}=1"])
    assert (raised.value.name, raised.value.suggestion) == (typo, meant)
    assert f"{meant!r}" in str(raised.value) and "\n" not in str(raised.value)
    preset = tmp_path / "mine.json"
    preset.write_text(json.dumps({typo: 1}))
    with pytest.raises(settings.UnknownSettingError) as raised:
        settings.load_config(settings.FINETUNE, str(preset))
    assert raised.value.name == typo and str(preset) in str(raised.value)


def test_unknown_presets_and_malformed_ones_name_what_is_wrong(tmp_path):
    with pytest.raises(settings.SettingError) as raised:
        settings.load_config(settings.FINETUNE, "nope")
    assert "'nope'" in str(raised.value) and "finetune_cifar10" in str(raised.value)
    preset = tmp_path / "mine.json"
    preset.write_text('{"steps": 10,\n "base_lr": 0.1,,}')
    with pytest.raises(settings.SettingError) as raised:
        settings.load_config(settings.FINETUNE, str(preset))
    assert str(preset) in str(raised.value) and "line 2" in str(raised.value)
    preset.write_text("[1, 2]")
    with pytest.raises(settings.SettingError) as raised:
        settings.load_config(settings.FINETUNE, str(preset))
    assert str(preset) in str(raised.value) and "list" in str(raised.value)
    with pytest.raises(settings.SettingError) as raised:
        settings.load_config(settings.FINETUNE, None, ["nonsense"])
    assert "'nonsense'" in str(raised.value)


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("steps=abc", "steps", "abc"),
        ("steps=-5", "steps", -5),
        ("base_lr=fast", "base_lr", "fast"),
        ("crop_area=0.5", "crop_area", 0.5),
        ("precision=float64", "precision", "float64"),
        ("warmup_steps=-10", "warmup_steps", -10),
        ("warmup_steps=600", "warmup_steps", 600),  # finetune_short: steps=500
        ("flip=yes", "flip", "yes"),
        ("channels=2", "channels", 2),
        ("loop=keras", "loop", "keras"),
        ("randaugment=[2, 15]", "randaugment", [2, 15]),
        ("lora_rank=-1", "lora_rank", -1),
        ("lora_rank=1.5", "lora_rank", 1.5),
        ('model_overrides={"image_size": 8}', "model_overrides", {"image_size": 8}),
    ],
)
def test_every_setting_is_checked_with_a_one_line_message_naming_it(override, key, value):
    with pytest.raises(settings.SettingError) as raised:
        settings.load_config(settings.FINETUNE, "finetune_short", [override])
    assert str(raised.value).startswith(f"{key}={value!r} is not allowed") and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "backend, overrides, key",
    [
        ("jax", ["loop=trainer"], "loop"),
        ("torch", ["strategy=mirrored"], "strategy"),
        ("jax", ["accumulation_steps=2"], "accumulation_steps"),  # loop=auto is fit on JAX
        ("tensorflow", ["loop=fit", "accumulation_steps=2"], "accumulation_steps"),
    ],
)
def test_settings_that_need_another_backend_or_loop_are_refused(backend, overrides, key):
    config = settings.load_config(settings.FINETUNE, "finetune_short", overrides)
    with pytest.raises(settings.SettingError) as raised:
        settings.validate(config, backend)
    assert str(raised.value).startswith(f"{key}=") and "\n" not in str(raised.value)
    assert settings.validate(settings.load_config(settings.FINETUNE, "finetune_short"), backend)  # the defaults run anywhere


@pytest.mark.parametrize("backend, loop", [("tensorflow", "trainer"), ("jax", "fit"), ("torch", "fit")])
def test_loop_auto_is_the_trainer_on_tensorflow_and_fit_elsewhere(backend, loop):
    assert settings.resolve_loop("auto", backend) == loop
    assert settings.resolve_loop("fit", "tensorflow") == "fit"


def test_settings_of_an_older_schema_take_the_defaults_of_later_settings():
    current = settings.training_settings(settings.load_config(settings.FINETUNE, "finetune_short"))
    version_1 = {k: v for k, v in current.items() if settings.SETTINGS[k].since == 1}
    assert set(current) - set(version_1) == {"loop", "lora_rank", "mesh_shape"}
    assert settings.upgrade(version_1, 1) == current
    assert settings.upgrade(current, settings.SCHEMA_VERSION) == current
    assert settings.upgrade({**version_1, "loop": "fit"}, 1)["loop"] == "fit"  # what was stored wins
    with pytest.raises(settings.SettingError) as raised:
        settings.upgrade(current, settings.SCHEMA_VERSION + 1)
    assert str(settings.SCHEMA_VERSION + 1) in str(raised.value)


def test_one_file_named_by_two_paths_is_one_setting(tmp_path, monkeypatch):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "model.keras").write_bytes(b"stand-in")
    os.symlink(tmp_path / "model.keras", tmp_path / "link.keras")
    monkeypatch.chdir(tmp_path)
    relative = {"weights": "model.keras", "dataset": "folder:data", "data_dir": "data"}
    absolute = {"weights": str(tmp_path / "model.keras"), "dataset": f"folder:{tmp_path / 'data'}", "data_dir": str(tmp_path / "data")}
    assert settings.canonical(relative) == settings.canonical(absolute) == settings.canonical({**absolute, "weights": "link.keras"})
    assert settings.canonical({"weights": "augreg_in21k", "dataset": "digits"}) == {"weights": "augreg_in21k", "dataset": "digits"}
    assert settings.canonical({"weights": "other.keras"}) == {"weights": "other.keras"}  # not there: kept as given


@pytest.mark.parametrize("override, name", [
    ("base_lr=Infinity", "base_lr"), ("base_lr=NaN", "base_lr"), ("weight_decay=Infinity", "weight_decay"),
    ("crop_area=[NaN, 1.0]", "crop_area"), ('classes=["cat", "dog", "cat"]', "classes"),
])
def test_non_finite_numbers_and_a_class_listed_twice_are_refused(override, name):
    with pytest.raises(settings.SettingError) as refused:
        settings.load_config(settings.FINETUNE, None, ["dataset=folder:images", override])
    assert refused.value.name == name


@pytest.mark.parametrize("defaults, overrides", [
    (settings.FINETUNE, ["lora_rank=4", "weights=null"]),  # a frozen random backbone
    (settings.PRETRAIN_SSL, ["lora_rank=4", "weights=runs/x/model.keras"]),  # pre-training learns every weight
])
def test_lora_is_for_fine_tuning_pretrained_weights(defaults, overrides):
    with pytest.raises(settings.SettingError) as refused:
        settings.load_config(defaults, None, overrides)
    assert (refused.value.name, refused.value.value) == ("lora_rank", 4)
    assert settings.load_config(settings.FINETUNE, None, ["lora_rank=4"])["lora_rank"] == 4  # augreg_in21k weights
