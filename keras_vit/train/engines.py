"""Which Keras backend (the run's "engine") trains fastest on this CPU: a measured rule, per CPU kind.

The ``engine`` setting is ``tensorflow``, ``torch`` or ``auto``. ``auto`` looks the CPU kind (``cpu_kind``:
``amx``, ``avx512_bf16`` or ``avx2``, from the CPU's flags) and the precision that will run up in ``RULE``,
whose rows are measurements (benchmarks/RESULTS.md, cited in each row's ``evidence``). ``auto`` keeps the
running backend where the rule does not apply: a backend named by ``KERAS_BACKEND``, a machine with a GPU or
TPU, a cluster or a ``tf.distribute`` strategy, settings that need TensorFlow (``loop="trainer"``, gradient
accumulation), or a CPU kind without a row.

A process cannot change its Keras backend once Keras is imported: the recipes' launcher
(``recipes/_launch.py``) starts the recipe again under ``KERAS_BACKEND=<engine>`` when ``launch_backend`` says
so; ``keras_vit.train.runner.run`` called from Python keeps its backend (``auto``) or refuses an ``engine`` that
is not it (``EngineError``, with the command to run). ``choose`` gives the ``Choice`` that report.json records.
"""

import dataclasses
import os

ENGINES = ("auto", "tensorflow", "torch")
CPU_KINDS = ("amx", "avx512_bf16", "avx2")


@dataclasses.dataclass(frozen=True)
class Row:
    """On CPUs of ``cpu_kind`` training in ``precision``, ``engine`` was measured the faster backend."""

    cpu_kind: str
    precision: str
    engine: str
    evidence: str


# One row per (CPU kind, precision that precision=auto runs there); the evidence is a section of
# benchmarks/RESULTS.md: images/s of the same training step on both backends, side by side in one run.
RULE = (
    Row("amx", "mixed_bfloat16", "torch",
        "RESULTS.md 'CPU speed with AMX' (2026-12-02, Intel Xeon with AMX): train Ti/16 b32 bfloat16 39.42 images/s "
        "on the torch backend (1.03x timm) against 21.32 on TensorFlow (0.53x)"),
    Row("amx", "float32", "torch",
        "RESULTS.md 'CPU speed with AMX' (2026-12-02, Intel Xeon with AMX): train Ti/16 b32 float32 23.27 images/s "
        "on the torch backend against 19.22 on TensorFlow (Trainer, XLA)"),
    Row("avx512_bf16", "mixed_bfloat16", "tensorflow",
        "issue 38 (2-core AMD EPYC Zen 4, main f245347): TensorFlow trains Ti/16 b32 bfloat16 at 0.96x-1.01x timm; "
        "the torch backend was not measured on this kind, so the default stays"),
    Row("avx512_bf16", "float32", "tensorflow",
        "RESULTS.md 'Training steps, side by side (2026-11-29)' (AMD EPYC Zen 5): TensorFlow trains in float32 at "
        "1.58x-1.87x timm; the torch backend was not measured on this kind"),
    Row("avx2", "float32", "tensorflow",
        "RESULTS.md 'AVX2 CPUs (issue 38)' (2026-12-07, 2-core AMD EPYC Zen 3, loaded): train Ti/16 b32 float32 "
        "0.53 images/s on TensorFlow (Trainer and fit, XLA; 1.34x timm) against 0.32 on the torch backend (0.80x), "
        "faster in every round"),
)


@dataclasses.dataclass(frozen=True)
class Choice:
    """The engine a run uses and why (``report.json``'s ``engine``): ``setting``, ``cpu_kind``, ``reason``."""

    engine: str
    setting: str
    cpu_kind: str
    reason: str


class EngineError(ValueError):
    """The engine asked for is not the running Keras backend, and this process cannot switch."""


def cpu_kind(flags):
    """``"amx"``, ``"avx512_bf16"`` or ``"avx2"`` for a CPU's flags (``/proc/cpuinfo``); None for other CPUs."""
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    if "avx2" in flags:
        return "avx2"
    return None


def rule_row(kind, precision):
    """The ``RULE`` row of a CPU kind and precision, or None."""
    return next((row for row in RULE if row.cpu_kind == kind and row.precision == precision), None)


def _keeps_backend(config, accelerator):
    """Why ``auto`` keeps the running backend whatever the CPU (or None): a GPU/TPU, a cluster, a strategy,
    settings that only TensorFlow runs."""
    if accelerator != "cpu":
        return f"a {accelerator.upper()} machine: the rule is for CPUs"
    if os.environ.get("TF_CONFIG") or config["strategy"] not in ("auto", "default") or config.get("tpu"):
        return "a cluster, TPU or tf.distribute strategy is set: the rule is for one CPU process"
    if config["loop"] == "trainer" or config["accumulation_steps"] > 1:
        return "loop='trainer' or accumulation_steps > 1 run on TensorFlow only"
    return None


def choose(config, backend, flags, accelerator="cpu", backend_named=False, can_switch=False):
    """The ``Choice`` of ``config["engine"]`` for a process on Keras ``backend``.

    ``flags``: the CPU's flags; ``accelerator``: ``"cpu"``, ``"gpu"`` or ``"tpu"``; ``backend_named``: whether
    ``KERAS_BACKEND`` names the backend; ``can_switch``: whether the caller can start the run under another
    backend (the recipes' launcher). ``auto`` keeps the running backend when it is named, or cannot be
    switched, or the rule does not apply. The precision looked up is the run's: ``precision=auto`` runs
    mixed_bfloat16 on CPUs with native bfloat16 (amx, avx512_bf16) on both engines, else float32.
    """
    setting = config["engine"]
    kind = cpu_kind(flags)
    if setting != "auto":
        return Choice(setting, setting, kind, "set")
    precision = config["precision"]
    if precision == "auto":
        precision = "mixed_bfloat16" if kind in ("amx", "avx512_bf16") else "float32"
    row = rule_row(kind, precision)
    kept = _keeps_backend(config, accelerator)
    if kept is None and row is None:
        kept = f"no measurement for {kind or 'this CPU'} in {precision}: the running backend is kept"
    if kept is None and row.engine != backend:
        if backend_named:
            kept = f"KERAS_BACKEND={backend} is set (the rule's pick, {row.engine}, is not used)"
        elif not can_switch:
            kept = f"the rule picks {row.engine}, but this process runs {backend} (only the recipes restart themselves)"
    if kept is not None:
        return Choice(backend, setting, kind, kept)
    return Choice(row.engine, setting, kind, f"rule for {kind} in {precision}: {row.evidence}")


def launch_backend(choice, backend, backend_named):
    """The backend the recipe launcher must start the run under (None: this process runs it); ``EngineError``
    when ``KERAS_BACKEND`` names another backend than the engine set."""
    if choice.engine == backend:
        return None
    if backend_named:
        raise EngineError(
            f"engine={choice.setting!r} asks for Keras' {choice.engine} backend but KERAS_BACKEND={backend} is set: "
            f"run with KERAS_BACKEND={choice.engine} (or engine=auto to keep {backend})."
        )
    return choice.engine


def check_running(choice, backend):
    """Refuses (``EngineError``) a ``choice`` whose engine is not the running backend, naming what to run."""
    if choice.engine != backend:
        raise EngineError(
            f"engine={choice.setting!r} means Keras' {choice.engine} backend, but this process runs {backend} and "
            f"cannot switch: start it with KERAS_BACKEND={choice.engine} (the recipes restart themselves)."
        )
