"""What each runner setting may be: one rule per key, checked before a run creates anything.

``RULES`` maps every setting of ``keras_vit.train.runner.COMMON`` to a
``Rule``: a test and the words that say what is allowed. ``validate(config)``
checks every key, then the relations between keys (``warmup_steps`` below
``steps``, the batch divisible into accumulation steps, a crop range inside
(0, 1]), and raises a ``ValueError`` of one line naming the key, the value
and what is allowed, e.g. ``steps='abc' is not allowed: expected an integer >= 1.``
"""

import dataclasses
from numbers import Real
from typing import Callable

TASKS = ("classify", "masked_patch_prediction")
DECAYS = ("cosine", "linear", "constant")
OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")


@dataclasses.dataclass(frozen=True)
class Rule:
    """``check(value) -> bool`` and ``allowed``, the words for the error message."""

    check: Callable
    allowed: str


def _integer(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value):
    return isinstance(value, Real) and not isinstance(value, bool)


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
PAIR_OF_FRACTIONS = Rule(
    lambda v: isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v) and 0 < v[0] <= v[1] <= 1,
    "null or a list [min, max] with 0 < min <= max <= 1, e.g. [0.05, 1.0]",
)
RULES = {
    "task": choice(TASKS),
    "model": optional(TEXT),
    "model_overrides": Rule(lambda v: isinstance(v, dict), 'a JSON object, e.g. {"dropout_rate": 0.1}'),
    "weights": optional(TEXT),
    "image_size": Rule(
        lambda v: (_integer(v) and v >= 1) or (isinstance(v, list) and len(v) == 2 and all(_integer(x) and x >= 1 for x in v)),
        "an integer >= 1 or a list [height, width]",
    ),
    "channels": optional(Rule(lambda v: _integer(v) and v in (1, 3), "1 or 3")),
    "classes": optional(Rule(lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v), "a list of class folder names")),
    "skip_undecodable": BOOLEAN,
    "dataset": TEXT,
    "train_split": TEXT,
    "eval_split": TEXT,
    "data_dir": optional(TEXT),
    "download": BOOLEAN,
    "batch_size": integer(1),
    "steps": integer(1),
    "warmup_steps": integer(0),
    "base_lr": number(0, open_min=True),
    "decay": choice(DECAYS),
    "linear_end": number(0),
    "optimizer": choice(OPTIMIZERS),
    "momentum": number(0, 1, open_max=True),
    "beta_1": number(0, 1, open_max=True),
    "beta_2": number(0, 1, open_max=True),
    "weight_decay": number(0),
    "grad_clip": optional(number(0, open_min=True)),
    "accumulation_steps": integer(1),
    "label_smoothing": number(0, 1, open_max=True),
    "ema_decay": optional(number(0, 1, open_min=True, open_max=True)),
    "mixup_alpha": number(0),
    "randaugment": Rule(
        lambda v: v is None or (isinstance(v, list) and len(v) == 2 and _integer(v[0]) and v[0] >= 0 and _number(v[1]) and v[1] >= 0),
        "null or a list [num_ops, magnitude], e.g. [2, 15]",
    ),
    "crop_area": Rule(lambda v: v is None or PAIR_OF_FRACTIONS.check(v), PAIR_OF_FRACTIONS.allowed),
    "flip": BOOLEAN,
    "precision": choice(PRECISIONS),
    "jit_compile": Rule(lambda v: v == "auto" or isinstance(v, bool), "'auto', true or false"),
    "steps_per_execution": integer(1),
    "strategy": choice(STRATEGIES),
    "tpu": optional(TEXT),
    "cluster_timeout": number(0, open_min=True),
    "seed": integer(0),
    "deterministic": BOOLEAN,
    "shuffle_buffer": integer(1),
    "cache": BOOLEAN,
    "eval_every": optional(integer(0)),
    "checkpoint_every": optional(integer(0)),
    "log_every": integer(1),
    "output_dir": TEXT,
}


def _relations(config):
    """(message) for each broken relation between settings."""
    steps, warmup = config["steps"], config["warmup_steps"]
    if config["decay"] == "constant" and warmup > steps:
        yield f"warmup_steps={warmup} is not allowed: expected at most steps={steps}."
    if config["decay"] != "constant" and warmup >= steps:
        yield f"warmup_steps={warmup} is not allowed: expected fewer than steps={steps} (decay={config['decay']!r} needs steps after the warmup)."
    if config["batch_size"] % config["accumulation_steps"]:
        yield (
            f"accumulation_steps={config['accumulation_steps']} is not allowed: expected a divisor of "
            f"batch_size={config['batch_size']}."
        )
    for key in ("classes", "channels"):
        if config.get(key) is not None and not config["dataset"].startswith("folder:"):
            yield f"{key}={config[key]!r} is not allowed with dataset={config['dataset']!r}: it is for image folders (dataset='folder:PATH')."


def validate(config):
    """Raises ``ValueError`` (one line: key, value, what is allowed) for the first wrong setting; returns ``config``."""
    for key, rule in RULES.items():
        if key in config and not rule.check(config[key]):
            raise ValueError(f"{key}={config[key]!r} is not allowed: expected {rule.allowed}.")
    for message in _relations(config):
        raise ValueError(message)
    return config
