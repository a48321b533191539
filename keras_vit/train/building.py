"""What a run is made of: its environment (backend, loop, strategy, precision), its data, its model and its loop.

``setup(config)`` seeds, picks the ``tf.distribute`` strategy (TensorFlow) or
the ``keras.distribution`` of a JAX strategy (``keras_vit.train.jax_distribute``,
set by ``Environment.distributed()`` for the whole run, so before the model is
built) and the precision policy and resolves ``loop``; ``assemble(config, environment)``
returns the training loop (``Trainer`` or ``FitLoop``) around the model and the
prepared data. ``build_model`` is the one function that creates a run's model
(with its weights); a ``.keras`` or official ``.npz`` weights file without a
``model`` setting gives the architecture and is read once.
"""

import contextlib
import dataclasses
import json
import logging
import os
from typing import Callable

import keras
import tensorflow as tf

import keras_vit
from keras_vit import ssl
from keras_vit.train import data, distribute, engines, jax_distribute, settings, trainer
from keras_vit.train.fit_loop import FitLoop
from keras_vit.train.optimization import WarmupDecay, make_optimizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Environment:
    """Where and how a run trains: the Keras ``backend``, the ``loop`` (``"trainer"`` or ``"fit"``), the
    ``tf.distribute`` ``strategy`` (TensorFlow; None on other backends), the ``precision`` policy name and the
    ``keras.distribution`` of a JAX strategy (``distribution``; None otherwise) and the ``engines.Choice`` of the
    ``engine`` setting (why this backend)."""

    backend: str
    loop: str
    strategy: object
    precision: str
    distribution: object = None
    engine: engines.Choice = None

    @property
    def replicas(self):
        if self.distribution is not None:
            return jax_distribute.batch_parts(self.distribution)
        return self.strategy.num_replicas_in_sync if self.strategy is not None else 1

    @property
    def chief(self):
        """Whether this process writes the run's outputs (always, without a multi-worker cluster)."""
        if self.distribution is not None:
            return jax_distribute.process()[0] == 0
        return self.strategy is None or distribute.is_chief(self.strategy)

    def scope(self):
        """Where variables are created: the strategy's scope, the JAX strategy's ``keras.distribution``
        (``distributed``), or a context that does nothing."""
        return self.strategy.scope() if self.strategy is not None else self.distributed()

    def distributed(self):
        """The run's ``keras.distribution`` set for the ``with`` block (JAX strategies), or a context that does nothing."""
        return self.distribution.scope() if self.distribution is not None else contextlib.nullcontext()


def _accelerator(backend):
    """``"tpu"``, ``"gpu"`` or ``"cpu"``: the first device of a JAX or PyTorch backend."""
    if backend == "jax":
        import jax

        return jax.devices()[0].platform
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu"


# Backends that reach a CPU's native bfloat16 products (AMX, AVX-512 BF16) through oneDNN, where mixed_bfloat16
# trains and infers faster than float32 on such CPUs. JAX's XLA computes bfloat16 products on CPUs in float32 and
# is slower in mixed_bfloat16 than in float32 (benchmarks/RESULTS.md, "precision=auto").
CPU_BFLOAT16_BACKENDS = ("tensorflow", "torch")


def engine_choice(config, can_switch=False):
    """The ``engines.Choice`` of ``config["engine"]`` for this process (its Keras backend, CPU and devices);
    ``can_switch``: whether the caller can start the run under another backend (the recipes' launcher)."""
    backend = keras.backend.backend()
    accelerator = _accelerator(backend)
    if backend == "tensorflow" and tf.config.list_logical_devices("GPU"):
        accelerator = "gpu"
    return engines.choose(config, backend, distribute.cpu_flags(), accelerator,
                          backend_named="KERAS_BACKEND" in os.environ, can_switch=can_switch)


def default_precision(backend, strategy=None):
    """What ``precision=auto`` picks: the policy measured fastest on these devices (benchmarks/RESULTS.md).

    bfloat16 on TPUs, float16 on GPUs; on a CPU mixed_bfloat16 where the CPU multiplies bfloat16 natively
    (``distribute.cpu_has_bfloat16``) and the backend is one of ``CPU_BFLOAT16_BACKENDS``, else float32. On
    TensorFlow as ``keras_vit.train.distribute.default_precision`` for ``strategy``.
    """
    if backend == "tensorflow":
        return distribute.default_precision(strategy)
    device = _accelerator(backend)
    if device == "tpu":
        return "mixed_bfloat16"
    if device == "gpu":
        return "mixed_float16"
    native = backend in CPU_BFLOAT16_BACKENDS and distribute.cpu_has_bfloat16()
    return "mixed_bfloat16" if native else "float32"


def _deterministic_ops(backend):
    if backend == "tensorflow":
        tf.config.experimental.enable_op_determinism()
    elif backend == "torch":
        import torch

        torch.use_deterministic_algorithms(True)
    # JAX: deterministic on CPUs as it is.


def setup(config):
    """Checks ``config`` against the backend, seeds every generator and returns the run's ``Environment``.

    The precision is applied to the model only (``build_model``), not to Keras' global dtype policy.
    """
    backend = keras.backend.backend()
    settings.validate(config, backend)
    engine = engine_choice(config)
    engines.check_running(engine, backend)
    distribution = None
    if config["strategy"] in jax_distribute.STRATEGIES:
        jax_distribute.initialize_processes()  # before anything runs on a device
        distribution = jax_distribute.distribution(config["strategy"], config["mesh_shape"])
        _check_distributed(config, distribution)
    keras.utils.set_random_seed(config["seed"])
    if config["deterministic"]:
        _deterministic_ops(backend)
    strategy = None
    if backend == "tensorflow":
        strategy = distribute.get_strategy(config["strategy"], config["tpu"], cluster_timeout=config["cluster_timeout"])
    loop = settings.resolve_loop(config["loop"], backend)
    if loop == "fit" and strategy is not None and strategy.num_replicas_in_sync > 1:
        raise ValueError(
            f"loop='fit' is not allowed with {strategy.num_replicas_in_sync} replicas: Keras' fit loop clips each "
            "replica's gradient before they are summed; use loop='trainer'."
        )
    precision = default_precision(backend, strategy) if config["precision"] == "auto" else config["precision"]
    return Environment(backend, loop, strategy, precision, distribution, engine)


def _check_distributed(config, distribution):
    """Refuses (one line) what a JAX strategy's mesh cannot run: a batch its batch axis does not divide, and
    evaluation at other image sizes in a run of several processes."""
    parts = jax_distribute.batch_parts(distribution)
    processes = jax_distribute.process()[1]
    if config["batch_size"] % parts:
        raise settings.SettingError(
            f"batch_size={config['batch_size']} is not allowed with strategy={config['strategy']!r}: expected a "
            f"multiple of {parts}, the devices its batch is split across.",
            "batch_size", config["batch_size"],
        )
    if config["eval_image_sizes"] and processes > 1:
        raise settings.SettingError(
            f"eval_image_sizes={config['eval_image_sizes']!r} is not allowed in a run of {processes} processes: "
            "evaluate the saved model.keras at other sizes afterwards.",
            "eval_image_sizes", config["eval_image_sizes"],
        )


def architecture_from_file(config):
    """Whether the model's architecture is its weights file's: ``model`` unset, ``weights`` a .keras or .npz file."""
    return config["model"] is None and settings.architecture_file(config["weights"])


def build_model(config, num_classes, environment, class_names=None):
    """The model ``config`` describes, with its weights, in ``environment``'s scope and precision.

    With ``model`` unset and a ``.keras`` or official ``.npz`` file as ``weights``, the architecture is the
    file's (``keras_vit.from_official_checkpoint``); otherwise ``keras_vit.create_model(model)``. The only
    place a run creates its model. The precision is the model's own dtype policy (stored in its ``.keras``
    file); ``class_names`` (an image folder's) are stored with it; ``lora_rank`` > 0 leaves only LoRA factors
    of the attention's query and value projections and the head trainable.
    """
    arguments = dict(
        image_size=config["image_size"],
        classes=num_classes,
        include_top=config["task"] != "masked_patch_prediction",
        dtype=environment.precision,
        **config["model_overrides"],
    )
    if class_names is not None and arguments["include_top"]:
        arguments["class_names"] = class_names
    with environment.scope():
        if architecture_from_file(config):
            log.info("Architecture from %s (no model setting given).", config["weights"])
            model = keras_vit.from_official_checkpoint(config["weights"], **arguments)
        else:
            model = keras_vit.create_model(
                config["model"] or settings.DEFAULT_MODEL, weights=config["weights"], **arguments
            )
        if config["lora_rank"]:
            model.enable_lora(config["lora_rank"])
    return model


def build_loop(config, environment, model):
    """The training loop of ``config`` around ``model``: ``Trainer`` (``loop="trainer"``) or ``FitLoop``.

    For ``task="masked_patch_prediction"`` the trained model is a ``keras_vit.ssl.MaskedPatchPrediction``
    around ``model`` (an encoder without head); ``loop.model.encoder`` is what the run saves.
    """
    self_supervised = config["task"] == "masked_patch_prediction"
    with environment.scope():
        if self_supervised:
            model = ssl.MaskedPatchPrediction(model, seed=config["seed"])
        schedule = WarmupDecay(
            config["base_lr"], config["steps"], config["warmup_steps"], config["decay"], config["linear_end"]
        )
        optimizer = make_optimizer(
            config["optimizer"],
            schedule,
            momentum=config["momentum"],
            beta_1=config["beta_1"],
            beta_2=config["beta_2"],
            weight_decay=config["weight_decay"],
            ema_decay=config["ema_decay"],
            loss_scale=environment.precision == "mixed_float16",
            global_clipnorm=config["grad_clip"] if environment.loop == "fit" else None,
        )
    # XLA on TensorFlow and JAX; on PyTorch Keras' jit_compile is torch.compile, which recompiles Keras' training
    # step again and again (Keras 3.15): that loop runs eagerly.
    jit_compile = config["jit_compile"] if environment.backend != "torch" else False
    if environment.backend == "tensorflow":
        if jit_compile == "auto":
            jit_compile = trainer.default_jit_compile(environment.strategy, model, environment.precision)
        if environment.loop == "trainer":
            return trainer.Trainer(
                model,
                optimizer,
                environment.strategy,
                config["batch_size"],
                grad_clip=config["grad_clip"],
                accumulation_steps=config["accumulation_steps"],
                label_smoothing=config["label_smoothing"],
                steps_per_execution=config["steps_per_execution"],
                jit_compile=jit_compile,
                loss_fn=model.loss_and_accuracy if self_supervised else None,
            )
    classify = not self_supervised
    return FitLoop(
        model,
        optimizer,
        config["batch_size"],
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config["label_smoothing"]) if classify else None,
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")] if classify else None,
        steps_per_execution=config["steps_per_execution"],
        jit_compile=jit_compile,
        scope=environment.scope if environment.strategy is not None or environment.distribution is not None else None,
    )


@dataclasses.dataclass
class Prepared:
    """A run's data: the train and eval ``data.Source``, ``train_dataset(skip_batches)`` and ``eval_dataset``."""

    train: data.Source
    eval: data.Source
    train_dataset: Callable
    eval_dataset: object

    @property
    def num_classes(self):
        return self.train.num_classes


def prepare_data(config, channels=None):
    """The ``Prepared`` data of ``config``; image folders decode to ``channels`` and label every split from one
    class list (``classes``, else the train split's). An evaluation split without examples is refused."""
    folder = {}
    if config["dataset"].startswith("folder:"):
        folder = dict(classes=config["classes"], channels=channels or 3, skip_undecodable=config["skip_undecodable"])
    source = lambda split: data.load_source(config["dataset"], split, config["data_dir"], config["download"], **folder)  # noqa: E731
    train_source = source(config["train_split"])
    if config["task"] == "classify" and train_source.num_classes < 2:
        names = f" ({', '.join(map(repr, train_source.class_names))})" if train_source.class_names else ""
        raise settings.SettingError(
            f"dataset={config['dataset']!r} has {train_source.num_classes} class{names}: classifying needs at least 2 "
            "(one class gives top-1 1.0 and learns nothing); add the other classes' folders.",
            "dataset", config["dataset"],
        )
    if folder:
        folder["classes"] = train_source.class_names
    eval_source = source(config["eval_split"])
    if eval_source.num_examples == 0:
        raise settings.SettingError(
            f"eval_split={config['eval_split']!r} of dataset={config['dataset']!r} holds no examples: "
            "give an evaluation split with examples.",
            "eval_split", config["eval_split"],
        )

    distributed = config["strategy"] in jax_distribute.STRATEGIES  # per process, every batch split on a mesh
    shard = jax_distribute.process() if distributed else (0, 1)

    def train_dataset(skip_batches=0):
        return data.pipeline(
            train_source,
            config["image_size"],
            config["batch_size"],
            True,
            config["seed"],
            mixup_alpha=config["mixup_alpha"],
            randaugment=config["randaugment"],
            crop_area=config["crop_area"],
            flip=config["flip"],
            cache=config["cache"],
            shuffle_buffer=config["shuffle_buffer"],
            skip_batches=skip_batches,
            shard=shard,
        )

    eval_dataset = data.pipeline(eval_source, config["image_size"], config["batch_size"], False, cache=config["cache"],
                                 shard=shard, whole_batches=distributed)
    return Prepared(train_source, eval_source, train_dataset, eval_dataset)


def _folder_class_names(config):
    folder = os.path.join(config["dataset"][len("folder:"):], config["train_split"])
    return list(config["classes"] or data.folder_classes(folder))


def assemble(config, environment, prepared=None):
    """``(loop, data)``: the training loop around the run's model and its ``Prepared`` data.

    Image folders decode to ``channels``, else the model's channel count: given in ``model_overrides``, or,
    when the architecture comes from a weights file, the file's (the model is then built first, so the file
    is read once). ``prepared``: a dict caching ``Prepared`` data by image size and channels (the tuner's trials).
    """
    model = None
    channels = config["channels"] or config["model_overrides"].get("channels")
    if config["dataset"].startswith("folder:") and channels is None and architecture_from_file(config):
        names = _folder_class_names(config)
        model = build_model(config, len(names), environment, names)
        channels = model.input_shape[-1]
    key = (json.dumps(config["image_size"]), channels)
    cache = prepared if prepared is not None else {}
    if key not in cache:
        cache[key] = prepare_data(config, channels)
    found = cache[key]
    model = model or build_model(config, found.num_classes, environment, found.train.class_names)
    return build_loop(config, environment, model), found
