"""Runs stock Keras and keras-tuner callbacks through ``Trainer.fit`` on one strategy, in a fresh process.

``stock_callbacks.py --strategy default|mirrored --folder DIR [--logical-cpus N]``: prints ``PASS <check>``
for each check that held (an ``AssertionError`` with a traceback otherwise). ``--logical-cpus`` splits the CPU
into N devices before TensorFlow starts, for ``MirroredStrategy``.
"""

import argparse
import csv
import glob
import os

parser = argparse.ArgumentParser()
parser.add_argument("--strategy", default="default")
parser.add_argument("--folder", required=True)
parser.add_argument("--logical-cpus", type=int, default=0)
args = parser.parse_args()

import keras  # noqa: E402
import keras_tuner  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

if args.logical_cpus:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus)

import keras_vit  # noqa: E402
from keras_vit.train import trainer as training  # noqa: E402

STRATEGY = (
    tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    if args.strategy == "mirrored"
    else tf.distribute.get_strategy()
)
assert STRATEGY.num_replicas_in_sync == (args.logical_cpus or 1), STRATEGY.num_replicas_in_sync
RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(-1, 1, (32, 8, 8, 1)).astype("float32")
LABELS = np.eye(3, dtype="float32")[RNG.integers(0, 3, 32)]


def train_data(images=IMAGES):
    return tf.data.Dataset.from_tensor_slices((images, LABELS)).batch(8).repeat()


EVAL = tf.data.Dataset.from_tensor_slices((IMAGES[:16], LABELS[:16])).batch(8)


def make_trainer(ema_momentum=None, steps_per_execution=1, lr=0.1):
    keras.utils.set_random_seed(1)
    with STRATEGY.scope():
        model = keras_vit.vision_transformer(8, 4, 8, 1, 2, 16, classes=3, channels=1)
        optimizer = keras.optimizers.SGD(lr, use_ema=ema_momentum is not None, ema_momentum=ema_momentum or 0.99)
    return training.Trainer(model, optimizer, STRATEGY, 8, steps_per_execution=steps_per_execution, jit_compile=False)


def steps_done(trainer):
    return int(keras.ops.convert_to_numpy(trainer.optimizer.iterations))


def weights(model):
    return [keras.ops.convert_to_numpy(v).copy() for v in model.trainable_variables]


class Recorder(keras.callbacks.Callback):
    """Every call with its argument; the weights after each step and during each evaluation."""

    def __init__(self, stop_at=None):
        super().__init__()
        self.events, self.after_step, self.during_test, self.stop_at = [], [], [], stop_at

    def on_train_begin(self, logs=None):
        self.events.append(("train_begin",))

    def on_train_end(self, logs=None):
        self.events.append(("train_end",))

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(("epoch_begin", epoch))

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(("epoch_end", epoch, tuple(sorted(logs))))

    def on_train_batch_begin(self, batch, logs=None):
        self.events.append(("batch_begin", batch))

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(("batch_end", batch, tuple(sorted(logs))))
        self.after_step.append(weights(self.model))
        if self.stop_at and batch + 1 >= self.stop_at:
            self.model.stop_training = True

    def on_test_begin(self, logs=None):
        self.events.append(("test_begin",))

    def on_test_batch_begin(self, batch, logs=None):
        self.events.append(("test_batch_begin", batch))
        if batch == 0:
            self.during_test.append(weights(self.model))

    def on_test_batch_end(self, batch, logs=None):
        self.events.append(("test_batch_end", batch))

    def on_test_end(self, logs=None):
        self.events.append(("test_end", tuple(sorted(logs))))


def close(a, b, atol=1e-6):
    return all(np.allclose(x, y, atol=atol) for x, y in zip(a, b))


def check_protocol():
    trainer = make_trainer(steps_per_execution=2)
    recorder = Recorder()
    history = trainer.fit(train_data(), 6, eval_dataset=EVAL, eval_every=3, callbacks=[recorder])
    batch_keys = ("accuracy", "grad_norm", "loss", "step")
    epoch_keys = ("accuracy", "grad_norm", "images_per_second", "learning_rate", "loss", "step", "val_accuracy")
    test = [("test_begin",), ("test_batch_begin", 0), ("test_batch_end", 0), ("test_batch_begin", 1),
            ("test_batch_end", 1), ("test_end", ("accuracy",))]
    expected = [("train_begin",), ("epoch_begin", 0), ("batch_begin", 0), ("batch_end", 1, batch_keys),
                ("batch_begin", 2), ("batch_end", 2, batch_keys), *test, ("epoch_end", 0, epoch_keys),
                ("epoch_begin", 1), ("batch_begin", 3), ("batch_end", 4, batch_keys), ("batch_begin", 5),
                ("batch_end", 5, batch_keys), *test, ("epoch_end", 1, epoch_keys), ("train_end",)]
    assert recorder.events == expected, recorder.events
    assert history.history["step"] == [3, 6] and len(history.history["loss"]) == 2
    stopper = Recorder(stop_at=4)
    trainer = make_trainer()
    history = trainer.fit(train_data(), 6, eval_dataset=EVAL, eval_every=3, callbacks=[stopper])
    assert steps_done(trainer) == 4 and history.history["step"] == [3, 4], history.history["step"]
    assert stopper.events[-1] == ("train_end",) and stopper.events[-2][:2] == ("epoch_end", 1)


def events(folder, tag):
    values = []
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            values += [float(tf.make_ndarray(v.tensor)) for v in event.summary.value if v.tag == tag]
    return values


def check_tensorboard_and_csv_logger():
    logdir, table = os.path.join(args.folder, "logs"), os.path.join(args.folder, "history.csv")
    trainer = make_trainer()
    callbacks = [keras.callbacks.TensorBoard(logdir, update_freq=1), keras.callbacks.CSVLogger(table)]
    history = trainer.fit(train_data(), 6, eval_dataset=EVAL, eval_every=3, callbacks=callbacks).history
    assert np.allclose(events(os.path.join(logdir, "train"), "epoch_loss"), history["loss"])
    assert np.allclose(events(os.path.join(logdir, "validation"), "epoch_accuracy"), history["val_accuracy"])
    assert len(events(os.path.join(logdir, "train"), "batch_loss")) == 6
    with open(table) as file:
        rows = list(csv.DictReader(file))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert np.allclose([float(r["loss"]) for r in rows], history["loss"])
    assert np.allclose([float(r["val_accuracy"]) for r in rows], history["val_accuracy"])


def check_early_stopping():
    trainer = make_trainer()
    stop = keras.callbacks.EarlyStopping(monitor="loss", min_delta=1e9, patience=1)  # never improves after epoch 1
    history = trainer.fit(train_data(), 8, eval_dataset=EVAL, eval_every=2, callbacks=[stop]).history
    assert history["step"] == [2, 4] and steps_done(trainer) == 4 and stop.stopped_epoch == 1


def check_terminate_on_nan():
    poisoned = IMAGES.copy()
    poisoned[16] = np.nan  # the third batch: step 3
    trainer = make_trainer()
    history = trainer.fit(train_data(poisoned), 8, eval_every=4, callbacks=[keras.callbacks.TerminateOnNaN()]).history
    assert steps_done(trainer) == 3 and history["step"] == [3] and np.isnan(history["loss"][-1])
    try:
        make_trainer().fit(train_data(poisoned), 8, eval_every=4)
    except FloatingPointError as error:
        assert "step 3" in str(error), error
    else:
        raise AssertionError("a NaN loss without TerminateOnNaN did not stop training")


def numpy_ema(steps, momentum):
    """Keras' EMA: the average is the weights after the first step, then m * average + (1 - m) * weights."""
    average = steps[0]
    for current in steps[1:]:
        average = [momentum * a + (1 - momentum) * w for a, w in zip(average, current)]
    return average


def check_swap_ema_weights():
    results = []
    for explicit in (True, False):
        trainer = make_trainer(ema_momentum=0.5)
        recorder = Recorder()
        callbacks = [keras.callbacks.SwapEMAWeights(), recorder] if explicit else [recorder]
        history = trainer.fit(train_data(), 6, eval_dataset=EVAL, eval_every=3, callbacks=callbacks).history
        raw = recorder.after_step
        for index, end in enumerate((3, 6)):
            assert close(recorder.during_test[index], numpy_ema(raw[:end], 0.5)), f"evaluated weights at step {end}"
        assert not close(recorder.during_test[0], raw[2])
        # finalize_variable_values: the model keeps the averages after fit
        assert close(weights(trainer.model), numpy_ema(raw, 0.5))
        results.append((history["val_accuracy"], weights(trainer.model)))
    assert results[0][0] == results[1][0] and close(results[0][1], results[1][1], atol=0)


class TinyHyperModel(keras_tuner.HyperModel):
    def build(self, hp):
        self.trainer = make_trainer(lr=hp.Choice("lr", [0.1]))
        return self.trainer.model

    def fit(self, hp, model, callbacks=(), **kwargs):
        assert model is self.trainer.model
        self.recorder = Recorder()
        callbacks = [self.recorder, *callbacks]
        self.history = self.trainer.fit(train_data(), 4, eval_dataset=EVAL, eval_every=2, callbacks=callbacks).history
        return {name: values[-1] for name, values in self.history.items()}


class RecordingSearch(keras_tuner.RandomSearch):
    """keras-tuner's TunerCallback forwards epoch and batch ends to these tuner hooks."""

    seen = []

    def on_epoch_end(self, trial, model, epoch, logs=None):
        self.seen.append(("epoch", epoch, logs["val_accuracy"]))

    def on_batch_end(self, trial, model, batch, logs=None):
        self.seen.append(("batch", batch, logs["loss"]))


def check_keras_tuner_callbacks():
    hypermodel = TinyHyperModel()
    tuner = RecordingSearch(
        hypermodel, objective=keras_tuner.Objective("val_accuracy", "max"), max_trials=1,
        directory=args.folder, project_name="tuner", distribution_strategy=STRATEGY,
    )
    tuner.search()
    (trial,) = tuner.oracle.trials.values()
    assert trial.status == "COMPLETED", trial.status
    assert trial.score == hypermodel.history["val_accuracy"][-1]
    epochs = [(epoch, value) for kind, epoch, value in tuner.seen if kind == "epoch"]
    assert epochs == list(enumerate(hypermodel.history["val_accuracy"])), tuner.seen
    assert [batch for kind, batch, _ in tuner.seen if kind == "batch"] == [0, 1, 2, 3]
    # SaveBestEpoch saved the weights at the end of the best epoch; get_best_models loads them into a new build
    best_epoch = int(np.argmax(hypermodel.history["val_accuracy"]))  # the first best: later ties are not saved
    assert close(weights(tuner.get_best_models(1)[0]), hypermodel.recorder.after_step[2 * best_epoch + 1], atol=0)


for check in (check_protocol, check_tensorboard_and_csv_logger, check_early_stopping, check_terminate_on_nan,
              check_swap_ema_weights, check_keras_tuner_callbacks):
    check()
    print(f"PASS {check.__name__}", flush=True)
