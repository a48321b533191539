"""Keras' own loop (``loop="fit"``): the same steps as the Trainer, resume, masked patch prediction, every backend.

CI runs this file on the JAX and PyTorch backends too (``KERAS_BACKEND=jax``); tests that compare with the
TensorFlow ``Trainer`` run on TensorFlow only.
"""

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit import ssl
from keras_vit.train import data, optimization, settings
from keras_vit.train.fit_loop import FitLoop

ON_TENSORFLOW = keras.backend.backend() == "tensorflow"
n = keras.ops.convert_to_numpy


def _source(count=64, seed=0):
    rng = np.random.default_rng(seed)
    return data.from_arrays(rng.integers(0, 256, (count, 8, 8, 1)), rng.integers(0, 3, count), 3)


def _classifier(seed=1, dropout_rate=0.0):
    keras.utils.set_random_seed(seed)
    return keras_vit.vision_transformer(8, 4, 8, 1, 2, 16, classes=3, channels=1, dropout_rate=dropout_rate)


def _fit_loop(model, lr=0.1, clip=None, label_smoothing=0.0, steps_per_execution=1, ema=None):
    optimizer = optimization.make_optimizer("sgd", lr, global_clipnorm=clip, ema_decay=ema)
    return FitLoop(
        model, optimizer, 8,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        steps_per_execution=steps_per_execution,
    )


def _weights(model):
    return [n(v).copy() for v in model.trainable_variables]


def _train(skip=0):
    return data.pipeline(_source(), 8, 8, True, seed=3, skip_batches=skip, crop_area=(0.6, 1.0))


def _eval():
    return data.pipeline(_source(24, seed=1), 8, 8, False)


@pytest.mark.skipif(not ON_TENSORFLOW, reason="the Trainer is TensorFlow's")
def test_fit_loop_steps_equal_the_trainer_s():
    import tensorflow as tf

    from keras_vit.train.trainer import Trainer

    fitted = _classifier()
    loop = _fit_loop(fitted, clip=0.05, label_smoothing=0.1, steps_per_execution=2)  # a clip that bites
    history = loop.fit(_train, 6, eval_dataset=_eval(), eval_every=3).history
    reference = _classifier()
    trainer = Trainer(reference, optimization.make_optimizer("sgd", 0.1), tf.distribute.get_strategy(), 8,
                      grad_clip=0.05, label_smoothing=0.1, jit_compile=False)
    expected = trainer.fit(_train, 6, eval_dataset=_eval(), eval_every=3).history
    for a, b in zip(_weights(fitted), _weights(reference)):
        np.testing.assert_allclose(a, b, atol=2e-6)
    assert history["step"] == expected["step"] == [3, 6]
    np.testing.assert_allclose(history["loss"], expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(history["val_accuracy"], expected["val_accuracy"])
    assert loop.evaluate(_eval()) == pytest.approx(trainer.evaluate(_eval()))


class _StopAfter(keras.callbacks.Callback):
    """Fails the process's run at the start of interval ``epoch`` (as a kill after the checkpoint before it)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_a_resumed_fit_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    uninterrupted = _classifier(dropout_rate=0.2)
    history = _fit_loop(uninterrupted, ema=0.5).fit(_train, 8, eval_dataset=_eval(), eval_every=2,
                                                    checkpoint_dir=tmp_path / "a", checkpoint_every=2, run_id="r")
    assert history.history["step"] == [2, 4, 6, 8]
    with pytest.raises(KeyboardInterrupt):
        _fit_loop(_classifier(dropout_rate=0.2), ema=0.5).fit(
            _train, 8, eval_dataset=_eval(), eval_every=2, callbacks=[_StopAfter(2)],
            checkpoint_dir=tmp_path / "b", checkpoint_every=4, run_id="r",
        )
    assert (tmp_path / "b" / "checkpoint").read_text() == "ckpt-4"
    resumed = _classifier(seed=7, dropout_rate=0.2)  # another initialisation: the checkpoint replaces it
    keras.utils.set_random_seed(1)  # the process seed a re-run starts with (tf.data's shuffle reads it)
    history = _fit_loop(resumed, ema=0.5).fit(_train, 8, eval_dataset=_eval(), eval_every=2,
                                              checkpoint_dir=tmp_path / "b", checkpoint_every=4, run_id="r")
    assert history.history["step"] == [6, 8]
    for a, b in zip(_weights(resumed), _weights(uninterrupted)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    finished = _classifier(seed=9, dropout_rate=0.2)
    assert _fit_loop(finished, ema=0.5).fit(_train, 8, checkpoint_dir=tmp_path / "a", run_id="r").history == {}  # nothing left to do


def test_intervals_that_do_not_divide_the_steps_stop_at_the_last_step(tmp_path):
    model = _classifier()
    loop = _fit_loop(model, steps_per_execution=4)
    history = loop.fit(_train, 10, eval_dataset=_eval(), eval_every=4, checkpoint_dir=tmp_path, checkpoint_every=4)
    assert history.history["step"] == [4, 8, 10] and len(history.history["val_accuracy"]) == 3
    assert int(n(model.optimizer.iterations)) == 10 and sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-10", "ckpt-8"]


def test_an_empty_evaluation_dataset_is_refused_before_the_first_step():
    model = _classifier()
    loop = _fit_loop(model)
    empty = data.pipeline(data.from_arrays(np.zeros((0, 8, 8, 1)), np.zeros((0,)), 3), 8, 8, False)
    with pytest.raises(ValueError) as raised:
        loop.fit(_train, 4, eval_dataset=empty)
    assert "eval_dataset holds no examples" in str(raised.value)
    assert int(n(model.optimizer.iterations)) == 0
    with pytest.raises(ValueError):
        loop.evaluate(empty.filter(lambda images, labels: True))  # unknown cardinality: looked into


def test_a_non_finite_loss_stops_with_the_step():
    model = _classifier()
    loop = _fit_loop(model, lr=1e30)
    with pytest.raises(FloatingPointError) as raised:
        loop.fit(_train, 6, eval_every=6)
    step = int(str(raised.value).split("at step ")[1].split(";")[0])
    assert 1 <= step <= 6 and int(n(model.optimizer.iterations)) == step


def _numpy_masked_loss(logits, targets, corrupted):
    """Per image: cross-entropy averaged over the corrupted positions (all positions where none is); batch mean."""
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    weights = np.where(corrupted.any(1, keepdims=True), corrupted, True).astype("float64")
    return float(((nll * weights).sum(1) / weights.sum(1)).mean())


def test_masked_patch_prediction_computes_its_own_loss():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 5, 7)).astype("float32")
    targets = rng.integers(0, 7, (3, 5)).astype("int32")
    corrupted = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    encoder = keras_vit.vision_transformer(8, 2, 12, 1, 2, 24, include_top=False, channels=1)
    model = ssl.MaskedPatchPrediction(encoder, seed=0)
    loss = model.compute_loss(y_pred=(logits, targets, corrupted))
    assert float(n(loss)) == pytest.approx(_numpy_masked_loss(logits, targets, corrupted), rel=1e-5)


def test_masked_patch_prediction_trains_through_keras_fit():
    keras.utils.set_random_seed(0)
    encoder = keras_vit.vision_transformer(8, 2, 16, 1, 2, 32, include_top=False, channels=1)
    model = ssl.MaskedPatchPrediction(encoder, seed=0)
    loop = FitLoop(model, optimization.make_optimizer("adam", 3e-3), 32)
    source = data.digits("train")
    train = lambda skip: data.pipeline(source, 8, 32, True, seed=0, skip_batches=skip, crop_area=None, flip=False)  # noqa: E731
    history = loop.fit(train, 40, eval_dataset=data.pipeline(data.digits("test"), 8, 64, False), eval_every=20).history
    assert history["loss"][1] < history["loss"][0] and np.isfinite(history["loss"]).all()
    # the mean colours of digits patches are mostly background: after 40 steps the head predicts it at least
    images = np.concatenate([x for x, _ in data.pipeline(data.digits("test"), 8, 360, False).as_numpy_iterator()])
    targets = n(ssl.mean_colour_targets(images, 2))
    background = np.mean(targets == np.bincount(targets.ravel()).argmax())
    assert loop.evaluate(data.pipeline(data.digits("test"), 8, 64, False)) >= background - 0.01
    assert set(history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "step"}


def test_the_runner_s_loop_on_this_backend_trains_a_tuner_trial(tmp_path):
    import keras_tuner

    from keras_vit.train import building, tuning

    config = settings.load_config(settings.PRETRAIN, "pretrain_digits", [
        "loop=fit", "steps=4", "warmup_steps=1", "batch_size=16", "eval_every=0", "steps_per_execution=1"])
    hypermodel = tuning.ViTHyperModel(config, "architecture", {"hidden_size": 16, "num_layers": 1, "mlp_ratio": 2}, building.setup(config))
    tuner = tuning.make_tuner("random", hypermodel, max_trials=1, directory=tmp_path, project_name="p")
    tuner.search()
    (trial,) = tuner.oracle.trials.values()
    assert trial.status == "COMPLETED" and np.isfinite(trial.metrics.get_last_value("train_loss"))
    assert type(hypermodel._loop).__name__ == "FitLoop"
