"""The engine setting: the measured rule per CPU kind, when auto keeps the running backend, and refusals."""

import re

import pytest

from conftest import REPO
from keras_vit.train import engines, settings

AMX = "fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile".split()
ZEN4 = "fpu avx2 fma avx512f avx512_bf16".split()
ZEN3 = "fpu avx avx2 fma".split()


def _config(**overrides):
    return {**settings.load_config(settings.FINETUNE, "finetune_short"), **overrides}


@pytest.mark.parametrize("flags, kind", [(AMX, "amx"), (ZEN4, "avx512_bf16"), (ZEN3, "avx2"), (["fpu", "sse2"], None)])
def test_cpu_kind_reads_the_flags(flags, kind):
    assert engines.cpu_kind(flags) == kind


def test_every_rule_row_is_one_kind_and_precision_and_cites_a_results_section():
    keys = [(row.cpu_kind, row.precision) for row in engines.RULE]
    assert len(keys) == len(set(keys))
    headings = {line.lstrip("#").strip() for line in (REPO / "benchmarks" / "RESULTS.md").read_text().splitlines()
                if line.startswith("#")}
    for row in engines.RULE:
        assert row.cpu_kind in engines.CPU_KINDS and row.engine in engines.ENGINES[1:]
        cited = re.findall(r"'([^']+)'", row.evidence)
        assert all(any(heading.startswith(c) for heading in headings) for c in cited), (row, cited)


@pytest.mark.parametrize("flags, precision, engine", [
    (AMX, "auto", "torch"), (AMX, "float32", "torch"), (ZEN4, "auto", "tensorflow"), (ZEN3, "auto", None),
])
def test_auto_follows_the_rule_where_the_recipe_can_switch(flags, precision, engine):
    expected = engine or engines.rule_row("avx2", "float32").engine
    choice = engines.choose(_config(precision=precision), "tensorflow", flags, can_switch=True)
    assert (choice.engine, choice.setting, choice.cpu_kind) == (expected, "auto", engines.cpu_kind(flags))
    assert choice.reason.startswith(f"rule for {choice.cpu_kind}")


@pytest.mark.parametrize("overrides, accelerator, named, switch", [
    ({}, "cpu", True, True),                      # KERAS_BACKEND names the backend
    ({}, "cpu", False, False),                    # a library call: this process cannot switch
    ({}, "gpu", False, True),                     # the rule is for CPUs
    ({"loop": "trainer"}, "cpu", False, True),    # tf.distribute loop
    ({"accumulation_steps": 2}, "cpu", False, True),
    ({"strategy": "mirrored"}, "cpu", False, True),
    ({"precision": "mixed_float16"}, "cpu", False, True),  # no row for it
])
def test_auto_keeps_the_running_backend_where_the_rule_does_not_apply(overrides, accelerator, named, switch):
    choice = engines.choose(_config(**overrides), "tensorflow", AMX, accelerator, backend_named=named, can_switch=switch)
    assert choice.engine == "tensorflow" and not choice.reason.startswith("rule")


def test_a_set_engine_is_used_and_a_clash_is_refused_with_the_command():
    choice = engines.choose(_config(engine="torch"), "tensorflow", ZEN3)
    assert (choice.engine, choice.reason) == ("torch", "set")
    assert engines.launch_backend(choice, "tensorflow", backend_named=False) == "torch"
    assert engines.launch_backend(choice, "torch", backend_named=True) is None
    with pytest.raises(engines.EngineError) as named:
        engines.launch_backend(choice, "tensorflow", backend_named=True)
    assert "KERAS_BACKEND=torch" in str(named.value)
    with pytest.raises(engines.EngineError) as running:
        engines.check_running(choice, "tensorflow")
    assert "KERAS_BACKEND=torch" in str(running.value)
    engines.check_running(choice, "torch")


def test_engine_is_a_setting_with_its_choices():
    assert settings.SETTINGS["engine"].default == "auto"
    with pytest.raises(ValueError, match="engine"):
        settings.load_config(settings.FINETUNE, "finetune_short", ["engine=jax"])
