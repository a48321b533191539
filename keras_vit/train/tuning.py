"""Hyperparameter search with keras-tuner over the seed's fine-tuning grid and over ViT shapes.

``ViTHyperModel`` maps keras-tuner hyperparameters onto a recipe configuration
(``keras_vit.train.settings``) and trains each trial with the same data pipelines,
environment and training loop as the recipes (``keras_vit.train.building``:
``Trainer`` on TensorFlow, Keras' fit loop on JAX and PyTorch), with keras-tuner's
own callbacks (a trial is one epoch: its evaluation gives ``val_accuracy``); the
objective is the held-out top-1 (``val_accuracy``) or any number the trial reports
(``TRIAL_METRICS``). A diverging trial (non-finite loss) fails. Two search spaces:

* ``"finetune"``: from pretrained weights: learning rate (the seed's grid
  {0.001, 0.003, 0.01, 0.03}), steps, resolution, dropout, classifier head
  (token / gap where the checkpoint allows; a model whose architecture comes
  from its weights file keeps the file's head unless ``classifier`` is in the
  space overrides), EMA on/off;
* ``"architecture"``: from scratch: depth, width, heads (only divisors of the
  width, through conditional scopes), MLP ratio, patch size (only divisors of
  the image size), dropout, stochastic depth, weight decay, learning rate.

A space is narrowed or extended with ``space_overrides``: ``{name: value}``
fixes a hyperparameter, ``{name: [a, b]}`` makes it a choice and
``{name: {"min": a, "max": b}}`` a range.
"""

import contextlib
import copy
import time

import keras_tuner

from keras_vit import configs
from keras_vit.train import building

FINETUNE_LEARNING_RATES = [0.001, 0.003, 0.01, 0.03]
SPACES = ("finetune", "architecture")
TRIAL_METRICS = ("val_accuracy", "train_accuracy", "train_loss")


def _divisors(value, candidates):
    return [c for c in candidates if value % c == 0]


class ViTHyperModel(keras_tuner.HyperModel):
    """A keras-tuner ``HyperModel`` whose trials are recipe runs of ``base_config`` with tuned settings.

    ``environment``: the run's ``building.Environment`` (``building.setup(base_config)``; its
    ``tf.distribute`` strategy, if any, is the tuner's ``distribution_strategy``; None: set up from
    ``base_config`` when the first trial is built). ``steps_per_epoch``: Hyperband's epochs are
    this many steps; other tuners train ``config["steps"]`` steps (or the tuned ``steps``).
    ``time_budget_s``: no trial starts after this many seconds (``keras_tuner.errors.FatalError``).
    """

    def __init__(self, base_config, space="finetune", space_overrides=None, environment=None, steps_per_epoch=None,
                 time_budget_s=None):
        super().__init__(name=f"vit_{space}")
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}.")
        self.base_config = copy.deepcopy(base_config)
        self.space = space
        self.space_overrides = dict(space_overrides or {})
        self.environment = environment
        self.steps_per_epoch = steps_per_epoch
        self.deadline = time.monotonic() + time_budget_s if time_budget_s else None
        self._prepared = {}  # data per image size and channels (trials may tune the resolution)
        self._loop = self._data = None  # the training loop and data of the model the last build() returned
        self._space_only = False

    @property
    def strategy(self):
        """The ``tf.distribute`` strategy the trials train under (None off TensorFlow)."""
        return self.environment.strategy if self.environment is not None else None

    # --- the search space ----------------------------------------------------------------------------------------

    def _value(self, hp, name, kind, default):
        """A hyperparameter named ``name``: ``default`` unless ``space_overrides`` changes it.

        ``kind`` is "choice" (default: list), "float" or "int" (default: (min, max)), or "bool".
        """
        spec = self.space_overrides.get(name, default)
        if isinstance(spec, dict):
            low, high = spec["min"], spec["max"]
            if kind == "int" or all(isinstance(v, int) for v in (low, high)):
                return hp.Int(name, low, high)
            return hp.Float(name, low, high)
        if isinstance(spec, tuple) and kind in ("float", "int"):
            return (hp.Int if kind == "int" else hp.Float)(name, spec[0], spec[1])
        if isinstance(spec, (list, tuple)):
            return hp.Choice(name, list(spec))
        if kind == "bool" and name not in self.space_overrides:
            return hp.Boolean(name)
        return hp.Fixed(name, spec)

    def config_for(self, hp):
        """The recipe configuration of a trial (also what ``write_best_config`` writes)."""
        config = copy.deepcopy(self.base_config)
        overrides = config["model_overrides"]
        if self.steps_per_epoch and "tuner/epochs" in hp.values:
            config["steps"] = hp.values["tuner/epochs"] * self.steps_per_epoch  # Hyperband: the schedule spans the trial
        if self.space == "finetune":
            config["base_lr"] = self._value(hp, "learning_rate", "choice", FINETUNE_LEARNING_RATES)
            config["steps"] = self._value(hp, "steps", "choice", [config["steps"]])
            config["image_size"] = self._value(hp, "image_size", "choice", [config["image_size"]])
            overrides["dropout_rate"] = self._value(hp, "dropout_rate", "choice", [0.0, 0.1])
            if config["model"] is not None or "classifier" in self.space_overrides:
                named = configs.model_config(config["model"])["classifier"] if config["model"] else None
                overrides["classifier"] = self._value(hp, "classifier", "choice", [overrides.get("classifier", named)])
            config["ema_decay"] = 0.9999 if self._value(hp, "ema", "bool", False) else None
        else:
            image_size = config["image_size"]
            width = self._value(hp, "hidden_size", "choice", [64, 128, 192])
            widths = self.space_overrides.get("hidden_size", [64, 128, 192])
            heads = None
            for candidate in widths if isinstance(widths, list) else [width]:
                # Heads are a choice among the divisors of each width, active only with that width.
                with hp.conditional_scope("hidden_size", [candidate]):
                    value = self._value(
                        hp, f"num_heads_w{candidate}", "choice", _divisors(candidate, [1, 2, 3, 4, 6, 8, 12, 16])
                    )
                if candidate == width:
                    heads = value
            overrides.update(
                hidden_size=width,
                num_heads=heads,
                num_layers=self._value(hp, "num_layers", "int", (2, 8)),
                mlp_dim=width * self._value(hp, "mlp_ratio", "choice", [2, 4]),
                patch_size=self._value(hp, "patch_size", "choice", _divisors(image_size, [1, 2, 4, 8, 16, 32])),
                dropout_rate=self._value(hp, "dropout_rate", "choice", [0.0, 0.1]),
                stochastic_depth_rate=self._value(hp, "stochastic_depth_rate", "choice", [0.0, 0.1]),
            )
            config["weights"] = None
            config["weight_decay"] = self._value(hp, "weight_decay", "choice", [0.0, 0.03, 0.1])
            config["base_lr"] = self._value(hp, "learning_rate", "choice", [3e-4, 1e-3, 3e-3])
        return config

    # --- keras-tuner hooks ---------------------------------------------------------------------------------------

    def declare_hyperparameters(self, hp):
        """Declares the whole space, every conditional scope included, without building anything."""
        self.config_for(hp)

    @contextlib.contextmanager
    def space_only(self):
        """Inside the context ``build`` declares the trial's hyperparameters and builds nothing.

        keras-tuner calls ``build`` while a tuner is constructed, to explore the conditional scopes of
        the space; ``make_tuner`` constructs the tuner inside this context.
        """
        self._space_only = True
        try:
            yield self
        finally:
            self._space_only = False

    def build(self, hp):
        """The trial's model, built with its training loop and data (kept for ``fit``) as the recipes build them."""
        if self._space_only:
            self.config_for(hp)
            return None
        if self.deadline and time.monotonic() > self.deadline:
            raise keras_tuner.errors.FatalError("The search's time budget is spent.")
        config = self.config_for(hp)
        if self.environment is None:
            self.environment = building.setup(config)
        self._loop, self._data = building.assemble(config, self.environment, self._prepared)
        return self._loop.model

    def fit(self, hp, model, *args, epochs=None, initial_epoch=0, callbacks=(), **kwargs):
        """Trains a trial; Hyperband's ``epochs`` are ``steps_per_epoch`` steps, a promoted trial continues
        from its parent's weights (loaded by keras-tuner) for the remaining epochs."""
        config = self.config_for(hp)
        steps = config["steps"]
        if epochs is not None and self.steps_per_epoch:
            steps = (epochs - initial_epoch) * self.steps_per_epoch
        if self._loop is None or self._loop.model is not model:
            raise ValueError("ViTHyperModel.fit trains the model its last build() returned.")
        started = time.perf_counter()
        try:
            # One epoch: the evaluation at its end gives keras-tuner's callbacks (e.g. SaveBestEpoch) val_accuracy.
            history = self._loop.fit(
                self._data.train_dataset, steps, eval_dataset=self._data.eval_dataset, callbacks=list(callbacks)
            )
        except FloatingPointError as error:
            raise keras_tuner.errors.FailedTrialError(f"The training loss diverged: {error}") from None
        last = {name: values[-1] for name, values in history.history.items()}
        return {
            "val_accuracy": last["val_accuracy"],
            "train_accuracy": last["accuracy"],
            "train_loss": last["loss"],
            "seconds": time.perf_counter() - started,
        }


TUNERS = {
    "random": keras_tuner.RandomSearch,
    "bayesian": keras_tuner.BayesianOptimization,
    "hyperband": keras_tuner.Hyperband,
}


def make_tuner(kind, hypermodel, objective="val_accuracy", max_trials=10, max_epochs=4, directory="tuning",
               project_name="vit", seed=0, overwrite=False):
    """A keras-tuner tuner (``random``, ``bayesian`` or ``hyperband``) that resumes from ``directory/project_name``."""
    if kind not in TUNERS:
        raise ValueError(f"tuner must be one of {sorted(TUNERS)}, got {kind!r}.")
    direction = "min" if "loss" in objective else "max"
    common = dict(
        hypermodel=hypermodel,
        objective=keras_tuner.Objective(objective, direction),
        directory=directory,
        project_name=project_name,
        seed=seed,
        overwrite=overwrite,
        distribution_strategy=hypermodel.strategy,  # None off TensorFlow
        max_consecutive_failed_trials=max(max_trials, 3),
    )
    with hypermodel.space_only():
        if kind == "hyperband":
            return keras_tuner.Hyperband(max_epochs=max_epochs, factor=2, hyperband_iterations=1, **common)
        return TUNERS[kind](max_trials=max_trials, **common)


def trial_table(tuner):
    """Rows ``{trial, status, <hyperparameters>, <metrics>}`` for every trial, in trial order."""
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        row = {"trial": trial_id, "status": trial.status, "score": trial.score}
        row.update(trial.hyperparameters.values)
        for name, history in trial.metrics.metrics.items():
            row[name] = history.get_best_value()
        rows.append(row)
    return rows


def failures(tuner):
    """``[(trial_id, message)]`` of failed or invalid trials, with the last line of their traceback."""
    failed = []
    for trial_id, trial in sorted(tuner.oracle.trials.items()):
        if trial.status in ("FAILED", "INVALID"):
            lines = [line for line in (trial.message or "").strip().splitlines() if line.strip()]
            failed.append((trial_id, lines[-1] if lines else "no message"))
    return failed
