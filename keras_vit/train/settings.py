"""The recipe settings: one typed schema, read by the presets, the command line, validation, the docs and run folders.

Every setting is a field of one of the section dataclasses below (``Task``,
``Model``, ``Data``, ``Augmentation``, ``Optimization``, ``Execution``,
``Outputs``): its type annotation, default, rule (what is allowed), help line,
whether it only says where or how often a run reports (``reporting``), whether
it only says how the steps are computed, so that a run may resume with
another value (``resumable``), and the schema version that introduced it
(``since``) live in that one place.
``SETTINGS`` lists them all; ``defaults()`` is the dict of defaults; the
recipes' defaults (``FINETUNE``, ``PRETRAIN``, ``PRETRAIN_SSL``) change a few.
``load_config`` applies a preset (``presets/<name>.json``) and ``key=value``
overrides and calls ``validate``, which raises a ``ValueError`` of one line
naming the key, the value and what is allowed, e.g.
``steps='abc' is not allowed: expected an integer >= 1.``

Run folders store the training settings with ``SCHEMA_VERSION``. ``upgrade``
brings settings stored by an older version to this one: a setting introduced
later takes its default, which behaves as the older code did, so such a folder
resumes.

Versions: 1, the settings of keras_vit 0.1.0 as first released (run folders
store no version); 2 adds ``loop`` and ``lora_rank``; 3 adds ``eval_image_sizes``; 4 adds ``mesh_shape`` (and the
JAX strategies).
"""

import dataclasses
import difflib
import json
import math
import os
from numbers import Real
from pathlib import Path
from typing import Callable

from keras_vit.train.distribute import KINDS as TF_STRATEGIES
from keras_vit.train.engines import ENGINES
from keras_vit.train.jax_distribute import STRATEGIES as JAX_STRATEGIES
from keras_vit.train.optimization import DECAYS, OPTIMIZERS

SCHEMA_VERSION = 4
STRATEGIES = TF_STRATEGIES + tuple(JAX_STRATEGIES)
TASKS = ("classify", "masked_patch_prediction")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
LOOPS = ("auto", "trainer", "fit")
DEFAULT_MODEL = "B/16"
# Presets are package data: found in an installed wheel as in a checkout.
PRESETS_DIR = Path(__file__).resolve().parent / "presets"


# --- rules: a check and the words that say what is allowed ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """``check(value) -> bool`` and ``allowed``, the words for the error message."""

    check: Callable
    allowed: str


def _integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value):
    """A finite real number (JSON's ``Infinity`` and ``NaN`` are not settings)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum):
    return Rule(lambda v: _integer(v) and v >= minimum, f"an integer >= {minimum}")


def number(minimum, maximum=None, open_max=False, open_min=False):
    def check(value):
        if not _number(value):
            return False
        above = value > minimum if open_min else value >= minimum
        below = maximum is None or (value < maximum if open_max else value <= maximum)
        return above and below

    low, high = "(" if open_min else "[", ")" if open_max else "]"
    return Rule(check, f"a number >= {minimum}" if maximum is None else f"a number in {low}{minimum}, {maximum}{high}")


def choice(options):
    return Rule(lambda v: isinstance(v, str) and v in options, "one of " + ", ".join(map(repr, options)))


def optional(rule):
    return Rule(lambda v: v is None or rule.check(v), f"null or {rule.allowed}")


TEXT = Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")
BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false")
OBJECT = Rule(lambda v: isinstance(v, dict), 'a JSON object, e.g. {"dropout_rate": 0.1}')
IMAGE_SIZE = Rule(
    lambda v: (_integer(v) and v >= 1) or (isinstance(v, list) and len(v) == 2 and all(_integer(x) and x >= 1 for x in v)),
    "an integer >= 1 or a list [height, width]",
)
CROP_AREA = Rule(
    lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v) and 0 < v[0] <= v[1] <= 1),
    "null or a list [min, max] with 0 < min <= max <= 1, e.g. [0.05, 1.0]",
)
RANDAUGMENT = Rule(
    lambda v: v is None or (isinstance(v, list) and len(v) == 2 and _integer(v[0]) and v[0] >= 0 and _number(v[1]) and 0 <= v[1] <= 10),
    "null or a list [num_ops, magnitude] with magnitude in [0, 10] (Keras' RandAugment factor is magnitude / 10), e.g. [2, 10]",
)
CLASS_NAMES = optional(Rule(lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v) and len(set(v)) == len(v),
                             "a list of distinct class folder names"))
IMAGE_SIZES = optional(Rule(lambda v: isinstance(v, list) and v and all(IMAGE_SIZE.check(x) for x in v),
                            "a list of image sizes (integers or [height, width])"))
MESH_SHAPE = optional(Rule(lambda v: isinstance(v, list) and 1 <= len(v) <= 2 and all(_integer(x) and x >= 1 for x in v),
                          "a list [devices] or [batch, model] of integers >= 1"))
JIT = Rule(lambda v: v == "auto" or isinstance(v, bool), "'auto', true or false")


def setting(default, rule, help, reporting=False, resumable=False, since=1):
    """A schema field: ``default`` (copied per use when mutable), ``rule``, one ``help`` line, ``reporting`` (does not
    change training: left out of what a run folder remembers), ``resumable`` (says how the steps are computed or the
    data is fed, not what is trained: a run folder remembers it, and a run resumes with another value) and
    ``since`` (the schema version that added it)."""
    meta = dict(rule=rule, help=help, reporting=reporting, resumable=resumable, since=since)
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --- the schema, by section -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Task:
    task: str = setting("classify", choice(TASKS), "classify, or masked_patch_prediction (self-supervised, keras_vit.ssl)")


@dataclasses.dataclass
class Model:
    model: str | None = setting(
        None, optional(TEXT),
        "model name (keras_vit.create_model); null: the architecture of a .keras or official .npz weights file, else B/16",
    )
    model_overrides: dict = setting({}, OBJECT, 'vision_transformer keyword arguments, e.g. {"dropout_rate": 0.1}')
    weights: str | None = setting(None, optional(TEXT), 'null, a family ("augreg_in21k"), a checkpoint path or URL')
    image_size: int | list = setting(224, IMAGE_SIZE, "input resolution: an integer or [height, width]")
    lora_rank: int = setting(0, integer(0), "rank of LoRA adapters on the attention's query and value (0: off, all weights train)", since=2)


@dataclasses.dataclass
class Data:
    dataset: str = setting("digits", TEXT, '"digits", "folder:PATH" (PATH/<split>/<class>/*.jpg) or a TFDS name')
    classes: list | None = setting(None, CLASS_NAMES, "image folders: class folder names in label order, for every split (null: the train split's)")
    channels: int | None = setting(None, optional(Rule(lambda v: _integer(v) and v in (1, 3), "1 or 3")), "image folders: 1 or 3 decoded channels (null: the model's)")
    skip_undecodable: bool = setting(False, BOOLEAN, "image folders: leave out (and count) files that are not images instead of failing")
    train_split: str = setting("train", TEXT, "the split trained on")
    eval_split: str = setting("test", TEXT, "the split evaluated on (must hold examples)")
    data_dir: str | None = setting(None, optional(TEXT), "TFDS data_dir")
    download: bool = setting(False, BOOLEAN, "let TFDS download and prepare the dataset")
    shuffle_buffer: int = setting(10_000, integer(1), "examples in the shuffle buffer", resumable=True)
    cache: bool = setting(True, BOOLEAN, "cache decoded examples in memory (off for ImageNet-sized data)", resumable=True)


@dataclasses.dataclass
class Augmentation:
    mixup_alpha: float = setting(0.0, number(0), "mixup's Beta(alpha, alpha) (0: off)")
    randaugment: list | None = setting(None, RANDAUGMENT, "[num_ops, magnitude 0-10] of Keras' RandAugment (null: off)")
    crop_area: list | None = setting([0.05, 1.0], CROP_AREA, "inception crop area range (null: no crop)")
    flip: bool = setting(True, BOOLEAN, "random horizontal flips")


@dataclasses.dataclass
class Optimization:
    batch_size: int = setting(512, integer(1), "global batch")
    steps: int = setting(10_000, integer(1), "optimizer steps of the whole run")
    warmup_steps: int = setting(500, integer(0), "linear warmup steps")
    base_lr: float = setting(0.01, number(0, open_min=True), "peak learning rate")
    decay: str = setting("cosine", choice(DECAYS), "learning-rate decay after the warmup")
    linear_end: float = setting(1e-5, number(0), "final learning rate of linear decay")
    optimizer: str = setting("sgd", choice(OPTIMIZERS), "sgd (momentum) or adam (decoupled weight decay)")
    momentum: float = setting(0.9, number(0, 1, open_max=True), "SGD momentum")
    beta_1: float = setting(0.9, number(0, 1, open_max=True), "Adam beta_1")
    beta_2: float = setting(0.999, number(0, 1, open_max=True), "Adam beta_2")
    weight_decay: float = setting(0.0, number(0), "decoupled (AdamW-style) weight decay")
    grad_clip: float | None = setting(1.0, optional(number(0, open_min=True)), "clip the full-batch gradient's global norm (null: off)")
    accumulation_steps: int = setting(1, integer(1), "micro-batches per batch, same update (loop=trainer)")
    label_smoothing: float = setting(0.0, number(0, 1, open_max=True), "label smoothing of the cross-entropy")
    ema_decay: float | None = setting(None, optional(number(0, 1, open_min=True, open_max=True)), "Polyak averaging, e.g. 0.9999; evaluation and the saved model use the averages")


@dataclasses.dataclass
class Execution:
    loop: str = setting(
        "auto", choice(LOOPS),
        "trainer (tf.distribute loop, TensorFlow only) or fit (model.compile + model.fit, every backend); auto: trainer on TensorFlow, else fit",
        since=2,
    )
    precision: str = setting("auto", choice(PRECISIONS), "auto: bf16 on TPU and bf16-capable CPUs, fp16 on GPU, else float32")
    # Not stored with the checkpoints (reporting=True), as the Keras backend itself is not: no schema change.
    engine: str = setting(
        "auto", choice(ENGINES),
        "Keras backend: tensorflow, torch, or auto (the one measured faster on this CPU kind, keras_vit.train.engines; "
        "KERAS_BACKEND wins); the recipes restart under it",
        reporting=True, since=4,
    )
    jit_compile: str | bool = setting(
        "auto", JIT, "XLA on TensorFlow and JAX: auto (where it pays), true or false; PyTorch runs eagerly", resumable=True
    )
    steps_per_execution: int = setting(1, integer(1), "steps run in one compiled call", resumable=True)
    strategy: str = setting(
        "auto", choice(STRATEGIES),
        "tf.distribute strategy (TensorFlow; auto: TPU, TF_CONFIG cluster, several GPUs, else default), or on JAX "
        "jax_data, jax_fsdp, jax_tensor (keras.distribution layouts over every device; auto: one device)",
    )
    mesh_shape: list | None = setting(
        None, MESH_SHAPE,
        "JAX strategies' device mesh: [devices] (jax_data, jax_fsdp) or [batch, model] (jax_tensor); null: every "
        "device, jax_tensor [processes, devices per process]",
        since=4,
    )
    tpu: str | None = setting(None, optional(TEXT), "TPU name, grpc:// address or local (default $TPU_NAME)")
    seed: int = setting(0, integer(0), "initialisation, data order and augmentation")
    deterministic: bool = setting(False, BOOLEAN, "deterministic ops (slower); a resumed run then equals an uninterrupted one")


@dataclasses.dataclass
class Outputs:
    output_dir: str = setting("runs/vit", TEXT, "checkpoints, logs, model.keras, history.csv and report.json", reporting=True)
    eval_every: int | None = setting(500, optional(integer(0)), "steps between evaluations (one epoch; 0 or null: at the end)", reporting=True)
    checkpoint_every: int | None = setting(500, optional(integer(0)), "steps between checkpoints (0 or null: at the end)", reporting=True)
    log_every: int = setting(50, integer(1), "steps between progress lines", reporting=True)
    cluster_timeout: float = setting(300, number(0, open_min=True), "seconds a multi-worker task waits for the others of TF_CONFIG", reporting=True)
    eval_image_sizes: list | None = setting(
        None, IMAGE_SIZES, "also evaluate the trained model at these image sizes (one model of any size; report.json top1_by_image_size)",
        reporting=True, since=3,
    )


SECTIONS = (Task, Model, Data, Augmentation, Optimization, Execution, Outputs)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting as the schema declares it."""

    name: str
    section: str
    type: str
    default: object
    rule: Rule
    help: str
    reporting: bool
    resumable: bool
    since: int


def _type_name(annotation):
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _settings():
    found = {}
    for section in SECTIONS:
        defaults = section()
        for field in dataclasses.fields(section):
            found[field.name] = Setting(
                field.name, section.__name__, _type_name(field.type), getattr(defaults, field.name), **field.metadata
            )
    return found


SETTINGS = _settings()
REPORTING_SETTINGS = tuple(name for name, s in SETTINGS.items() if s.reporting)
RESUMABLE_SETTINGS = tuple(name for name, s in SETTINGS.items() if s.resumable)


def defaults():
    """Every setting's schema default (a new dict; mutable defaults are fresh copies)."""
    return {name: value for section in SECTIONS for name, value in dataclasses.asdict(section()).items()}


# The official fine-tuning: SGD momentum 0.9, clipping at 1, batch 512, no weight decay, warmup 500, cosine, 384 px.
FINETUNE = defaults() | {"optimizer": "sgd", "image_size": 384, "weights": "augreg_in21k"}
# The seed's pre-training: Adam (0.9, 0.999), batch 4096, weight decay 0.1, 10k warmup, linear decay, dropout 0.1.
PRETRAIN = defaults() | {
    "optimizer": "adam",
    "base_lr": 1e-3,
    "batch_size": 4096,
    "weight_decay": 0.1,
    "warmup_steps": 10_000,
    "decay": "linear",
    "steps": 300_000,
    "weights": None,
    "model_overrides": {"dropout_rate": 0.1},
}
# The seed's masked patch prediction: Adam, lr 2e-4, batch 4096, 10k warmup, cosine decay, 1M steps (JFT).
PRETRAIN_SSL = defaults() | {
    "task": "masked_patch_prediction",
    "optimizer": "adam",
    "base_lr": 2e-4,
    "batch_size": 4096,
    "warmup_steps": 10_000,
    "decay": "cosine",
    "steps": 1_000_000,
    "weights": None,
}


# --- presets and overrides ---------------------------------------------------------------------------------------


def parse_value(text):
    """JSON when it parses (numbers, null, lists, dicts, true/false), else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class SettingError(ValueError):
    """A setting (or a relation between settings) is not allowed; the message is one line naming it. ``name``: the
    setting (the first one a relation names), ``value``: its value (None when not known)."""

    def __init__(self, message, name=None, value=None):
        super().__init__(message)
        self.name, self.value = name, value


# Names other trainers give some settings.
OTHER_NAMES = {"learning_rate": "base_lr", "lr": "base_lr", "epochs": "steps", "clipnorm": "grad_clip", "mixup": "mixup_alpha"}


class UnknownSettingError(SettingError):
    """A preset or override names a setting the schema does not have; ``name`` and ``suggestion`` say which."""

    def __init__(self, name, where):
        close = difflib.get_close_matches(name, SETTINGS, n=1)
        suggestion = OTHER_NAMES.get(name) or (close[0] if close else None)
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        super().__init__(f"Unknown setting {name!r} {where}.{hint} Settings: {', '.join(sorted(SETTINGS))}.", name)
        self.suggestion = suggestion


def preset_names():
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def read_preset(preset):
    """The settings of a preset: a JSON file path or a name in ``presets/``."""
    path = Path(preset)
    if not path.exists():
        path = PRESETS_DIR / f"{preset}.json"
    if not path.exists():
        raise SettingError(f"Unknown preset {preset!r}: give a JSON file or one of {', '.join(preset_names())}.")
    try:
        found = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SettingError(f"Preset {path} is not valid JSON: {error}.") from None
    if not isinstance(found, dict):
        raise SettingError(f"Preset {path} must be a JSON object of settings, got {type(found).__name__}.")
    for name in found:
        if name not in SETTINGS:
            raise UnknownSettingError(name, f"in the preset {path}")
    return found


def load_config(defaults, preset=None, overrides=()):
    """``defaults`` updated by a preset (a JSON file path or a name in ``presets/``) and ``key=value`` overrides, checked.

    ``model_overrides.NAME=VALUE`` sets one model argument. With ``model`` unset and no weights file to take the
    architecture from, ``model`` becomes ``DEFAULT_MODEL``.
    """
    config = json.loads(json.dumps(defaults))
    if preset:
        config.update(read_preset(preset))
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise SettingError(f"Overrides are key=value, got {override!r}.")
        if key.startswith("model_overrides."):
            config["model_overrides"] = {**config["model_overrides"], key.split(".", 1)[1]: parse_value(value)}
            continue
        if key not in SETTINGS:
            raise UnknownSettingError(key, "on the command line")
        config[key] = parse_value(value)
    validate(config)
    if config["model"] is None and not architecture_file(config["weights"]):
        config["model"] = DEFAULT_MODEL
    return config


def architecture_file(weights):
    """Whether ``weights`` names a file that holds an architecture: a ``.keras`` model or an official ``.npz``."""
    return isinstance(weights, str) and weights.endswith((".keras", ".npz"))


# --- validation ---------------------------------------------------------------------------------------------------


def resolve_loop(loop, backend):
    """The training loop a ``loop`` setting means on a Keras ``backend``: ``trainer`` or ``fit``."""
    if loop == "auto":
        return "trainer" if backend == "tensorflow" else "fit"
    return loop


def _relations(config, backend):
    """(setting name, message) for each broken relation between settings (``backend``: the Keras backend, when known)."""
    steps, warmup = config["steps"], config["warmup_steps"]
    if config["decay"] == "constant" and warmup > steps:
        yield "warmup_steps", f"warmup_steps={warmup} is not allowed: expected at most steps={steps}."
    if config["decay"] != "constant" and warmup >= steps:
        yield "warmup_steps", f"warmup_steps={warmup} is not allowed: expected fewer than steps={steps} (decay={config['decay']!r} needs steps after the warmup)."
    if config["batch_size"] % config["accumulation_steps"]:
        yield "accumulation_steps", (
            f"accumulation_steps={config['accumulation_steps']} is not allowed: expected a divisor of "
            f"batch_size={config['batch_size']}."
        )
    for key in ("classes", "channels"):
        if config.get(key) is not None and not config["dataset"].startswith("folder:"):
            yield key, f"{key}={config[key]!r} is not allowed with dataset={config['dataset']!r}: it is for image folders (dataset='folder:PATH')."
    if config["lora_rank"] and config["weights"] is None:
        yield "lora_rank", (f"lora_rank={config['lora_rank']} is not allowed with weights=null: LoRA fine-tunes pretrained weights (the "
               "rest stays frozen at its random initialisation); give weights, or set lora_rank=0.")
    if config["lora_rank"] and config["task"] != "classify":
        yield "lora_rank", (f"lora_rank={config['lora_rank']} is not allowed with task={config['task']!r}: pre-training learns every "
               "weight; set lora_rank=0 (LoRA is for fine-tuning the resulting model).")
    if config.get("eval_image_sizes") and config["task"] != "classify":
        yield "eval_image_sizes", f"eval_image_sizes={config['eval_image_sizes']!r} is not allowed with task={config['task']!r}: it evaluates classifiers."
    if config.get("mesh_shape") is not None and config["strategy"] not in JAX_STRATEGIES:
        yield "mesh_shape", f"mesh_shape={config['mesh_shape']!r} is not allowed with strategy={config['strategy']!r}: it is the device mesh of jax_data, jax_fsdp and jax_tensor."
    clashing = sorted({"image_size", "classes", "include_top", "weights"} & set(config["model_overrides"]))
    if clashing:
        yield "model_overrides", f"model_overrides={config['model_overrides']!r} is not allowed: set {clashing} as top-level settings."
    if backend is None:
        return
    loop = resolve_loop(config["loop"], backend)
    if loop == "trainer" and backend != "tensorflow":
        yield "loop", f"loop='trainer' is not allowed on the {backend} backend: it is a tf.distribute loop; use loop='fit' (or 'auto')."
    jax_strategy = config["strategy"] in JAX_STRATEGIES
    if jax_strategy and backend != "jax":
        yield "strategy", (
            f"strategy={config['strategy']!r} is not allowed on the {backend} backend: keras.distribution layouts "
            "run on JAX; set KERAS_BACKEND=jax, or use a tf.distribute strategy (auto, tpu, multi_worker, mirrored)."
        )
    if backend != "tensorflow" and not jax_strategy and config["strategy"] not in ("auto", "default"):
        yield "strategy", (
            f"strategy={config['strategy']!r} is not allowed on the {backend} backend: tf.distribute strategies need "
            f"KERAS_BACKEND=tensorflow; use strategy='auto'{' or jax_data, jax_fsdp, jax_tensor' if backend == 'jax' else ''}."
        )
    if loop == "fit" and config["accumulation_steps"] > 1:
        yield "accumulation_steps", (
            f"accumulation_steps={config['accumulation_steps']} is not allowed with loop='fit': Keras' fit loop "
            "updates once per batch; use loop='trainer' (TensorFlow) or a smaller batch_size."
        )


def validate(config, backend=None):
    """Raises ``SettingError`` (one line: key, value, what is allowed) for the first wrong setting; returns ``config``.

    Unknown names are an ``UnknownSettingError`` suggesting the closest setting. With ``backend`` (the Keras
    backend) the settings that depend on it (``loop``, ``strategy``) are checked too.
    """
    for name in config:
        if name not in SETTINGS:
            raise UnknownSettingError(name, "in the configuration")
    for name, described in SETTINGS.items():
        if name in config and not described.rule.check(config[name]):
            raise SettingError(f"{name}={config[name]!r} is not allowed: expected {described.rule.allowed}.", name, config[name])
    for name, message in _relations(config, backend):
        raise SettingError(message, name, config.get(name))
    return config


# --- what a run folder remembers ---------------------------------------------------------------------------------


def training_settings(config):
    """The settings that change training (not where or how often it reports): what a checkpoint folder remembers."""
    return {k: v for k, v in config.items() if k not in REPORTING_SETTINGS}


def upgrade(stored, version):
    """Training settings stored by schema ``version`` as this version has them: later settings take their default.

    A default added later behaves as the older code did, so a folder written before it resumes. Settings the
    schema no longer has are kept, so that a comparison names them.
    """
    if version > SCHEMA_VERSION:
        raise SettingError(
            f"These settings were stored by a newer keras_vit (settings schema {version}, this one reads up to "
            f"{SCHEMA_VERSION}): upgrade keras_vit to resume them."
        )
    added = {name: s.default for name, s in SETTINGS.items() if s.since > version and not s.reporting}
    return added | dict(stored)


def _local_path(text):
    """The resolved path of an existing local file or folder named by ``text``, else None."""
    if not isinstance(text, str) or "://" in text or not os.path.exists(text):
        return None
    return os.path.realpath(text)


def canonical(config):
    """``config`` with paths to local files resolved (``weights``, a ``folder:`` dataset, ``data_dir``), so that one
    file named by two paths (relative, absolute, through a link) is one setting."""
    config = dict(config)
    if _local_path(config.get("weights")):
        config["weights"] = _local_path(config["weights"])
    dataset = config.get("dataset")
    if isinstance(dataset, str) and dataset.startswith("folder:") and _local_path(dataset[len("folder:"):]):
        config["dataset"] = "folder:" + _local_path(dataset[len("folder:"):])
    if _local_path(config.get("data_dir")):
        config["data_dir"] = _local_path(config["data_dir"])
    return config


# --- docs ---------------------------------------------------------------------------------------------------------


def settings_table():
    """The Markdown table of every setting (docs/SETTINGS.md is this table; a test keeps them equal)."""
    lines = ["| setting | section | type | default | allowed | what |", "|---|---|---|---|---|---|"]
    for s in SETTINGS.values():
        cells = (f"`{s.name}`", s.section, f"`{s.type}`", f"`{json.dumps(s.default)}`", s.rule.allowed, s.help)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
