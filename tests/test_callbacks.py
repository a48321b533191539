"""Trainer.fit drives Keras callbacks through the whole protocol: stock ones work unchanged; ours are callbacks."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_vit
from conftest import REPO
from keras_vit import evaluation
from keras_vit.train import callbacks, trainer as training

HELPER = Path(__file__).parent / "helpers" / "stock_callbacks.py"
CHECKS = ("check_protocol", "check_tensorboard_and_csv_logger", "check_early_stopping", "check_terminate_on_nan",
          "check_swap_ema_weights", "check_keras_tuner_callbacks")


@pytest.mark.slow
@pytest.mark.parametrize("strategy, cpus", [("default", 0), ("mirrored", 2)])
def test_stock_keras_and_keras_tuner_callbacks(tmp_path, strategy, cpus):
    """TensorBoard, CSVLogger, EarlyStopping, TerminateOnNaN, SwapEMAWeights and keras-tuner's own callbacks."""
    command = [sys.executable, str(HELPER), "--strategy", strategy, "--folder", str(tmp_path), "--logical-cpus", str(cpus)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for check in CHECKS:
        assert f"PASS {check}" in result.stdout, output[-4000:]


def _trainer(steps_per_execution=1):
    keras.utils.set_random_seed(1)
    model = keras_vit.vision_transformer(8, 4, 8, 1, 2, 16, classes=3, channels=1)
    return training.Trainer(model, keras.optimizers.SGD(0.1), tf.distribute.get_strategy(), 8,
                            steps_per_execution=steps_per_execution, jit_compile=False)


def _data():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (32, 8, 8, 1)).astype("float32")
    labels = rng.integers(0, 3, 32)
    return images, labels


def test_progress_logger_writes_a_line_per_interval(caplog):
    images, labels = _data()
    dataset = tf.data.Dataset.from_tensor_slices((images, np.eye(3, dtype="float32")[labels])).batch(8).repeat()
    with caplog.at_level(logging.INFO, logger="keras_vit.train.callbacks"):
        history = _trainer(steps_per_execution=3).fit(dataset, 9, callbacks=[callbacks.ProgressLogger(2)]).history
    lines = [r.getMessage() for r in caplog.records if r.name == "keras_vit.train.callbacks"]
    # chunks end at steps 3, 6, 9: each crosses a multiple of 2; then the epoch line
    assert [line.split(":")[0] for line in lines] == ["step 3", "step 6", "step 9", "epoch 1"]
    assert f"loss {history['loss'][0]:.4g}" in lines[-1]
    with pytest.raises(ValueError) as raised:
        callbacks.ProgressLogger(0)
    assert "every_n_steps" in str(raised.value) and "0" in str(raised.value)


def test_fewshot_callback_counts_optimizer_steps():
    images, labels = _data()
    dataset = tf.data.Dataset.from_tensor_slices((images, np.eye(3, dtype="float32")[labels])).batch(8).repeat()
    trainer = _trainer(steps_per_execution=3)
    train, test = (images[:24], labels[:24]), (images[24:], labels[24:])
    fewshot = evaluation.FewShotCallback(train, test, every_n_steps=2, shots=(2,), seeds=2)
    trainer.fit(dataset, 6, eval_every=3, callbacks=[fewshot])
    assert [step for step, _ in fewshot.history] == [3, 6]
    expected = evaluation.fewshot(trainer.model, train, test, shots=(2,), seeds=2)
    assert fewshot.history[-1][1] == expected
