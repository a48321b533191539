"""Few-shot linear evaluation, the seed's second metric.

"A regularized linear regression problem that maps the (frozen)
representation of a subset of training images to {-1, 1}^K target vectors",
solved in closed form. Features are the pre-logits (what the head reads).
Shapes: N = examples, D = feature size, K = classes.
"""

import logging

import keras
import numpy as np

from keras_vit.models import as_vision_transformer

DEFAULT_SHOTS = (1, 5, 10, 25)
log = logging.getLogger(__name__)


def feature_model(model):
    """``model``'s pre-logits model, (B, H, W, C) -> (B, F) (``VisionTransformer.feature_model("pre_logits")``)."""
    return as_vision_transformer(model, "the few-shot evaluation").feature_model("pre_logits")


def ridge_fit(features, labels, num_classes, l2=1.0):
    """Closed-form ridge regression to {-1, 1}^K targets: returns (weights (D, K), bias (K,), mean (D,)).

    Features are centred by their mean; ``W = (X^T X + l2 I)^-1 X^T Y`` and
    the bias is the mean target, so predictions are ``(x - mean) @ W + bias``.
    """
    x = np.asarray(features, np.float64)
    mean = x.mean(axis=0)
    x = x - mean
    targets = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
    weights = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ targets)
    return weights, targets.mean(axis=0), mean


def ridge_accuracy(train_features, train_labels, test_features, test_labels, num_classes, l2=1.0):
    """Top-1 accuracy of ``ridge_fit`` on the test set."""
    weights, bias, mean = ridge_fit(train_features, train_labels, num_classes, l2)
    scores = (np.asarray(test_features, np.float64) - mean) @ weights + bias
    return float(np.mean(scores.argmax(axis=1) == np.asarray(test_labels)))


def extract_features(model, data, batch_size=64):
    """(features (N, D), labels (N,)) from a (images, labels) pair of arrays or a dataset of batches.

    Labels may be integers or one-hot.
    """
    if isinstance(data, tuple):
        images, labels = data
        features = model.predict(np.asarray(images, "float32"), batch_size=batch_size, verbose=0)
    else:
        chunks, label_chunks = [], []
        for images, labels in data:
            chunks.append(keras.ops.convert_to_numpy(model(images, training=False)))
            label_chunks.append(keras.ops.convert_to_numpy(labels))
        features, labels = np.concatenate(chunks), np.concatenate(label_chunks)
    labels = np.asarray(labels)
    return np.asarray(features, np.float32), (labels.argmax(-1) if labels.ndim == 2 else labels).astype(int)


def fewshot(model_or_features, train, test, shots=DEFAULT_SHOTS, seeds=3, l2=1.0, num_classes=None):
    """Few-shot accuracy: ``{shots: {"mean": accuracy, "std": spread over seeds}}``.

    ``model_or_features``: a Keras model (its pre-logits are used, frozen) or
    None when ``train`` and ``test`` are already ``(features, labels)``.
    ``train``/``test``: ``(images or features, labels)`` arrays or datasets of
    batches. For each shot count and seed, ``shots`` examples per class are
    drawn from ``train`` (without replacement) and a ridge regression is fitted.
    """
    if model_or_features is None:
        (train_x, train_y), (test_x, test_y) = train, test
        train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    else:
        features = feature_model(model_or_features)
        train_x, train_y = extract_features(features, train)
        test_x, test_y = extract_features(features, test)
    num_classes = num_classes or int(max(train_y.max(), test_y.max()) + 1)
    by_class = [np.flatnonzero(train_y == k) for k in range(num_classes)]
    results = {}
    for shot in shots:
        accuracies = []
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            if min(len(indices) for indices in by_class) < shot:
                raise ValueError(f"{shot}-shot needs {shot} training examples of every class; some have fewer.")
            chosen = np.concatenate([rng.choice(indices, shot, replace=False) for indices in by_class])
            accuracies.append(ridge_accuracy(train_x[chosen], train_y[chosen], test_x, test_y, num_classes, l2))
        results[shot] = {"mean": float(np.mean(accuracies)), "std": float(np.std(accuracies))}
    return results


class FewShotCallback(keras.callbacks.Callback):
    """Few-shot accuracy every ``every_n_steps`` optimizer steps (as the seed does during pre-training).

    A plain Keras callback: works with ``model.fit`` and with ``keras_vit.train.trainer.Trainer.fit``. The
    step is the optimizer's ``iterations`` (so epochs and ``steps_per_execution`` chunks do not matter): it
    runs at the first batch end at or after each multiple of ``every_n_steps``. Results are added to the
    batch logs as ``fewshot_<k>shot``, kept in ``self.history`` as ``(step, results)`` and logged (INFO).
    """

    def __init__(self, train, test, every_n_steps=1000, shots=(5, 10), seeds=1, l2=1.0):
        super().__init__()
        self.train, self.test = train, test
        self.every_n_steps, self.shots, self.seeds, self.l2 = every_n_steps, shots, seeds, l2
        self.history = []

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        done = self.history[-1][0] if self.history else 0
        if step // self.every_n_steps <= done // self.every_n_steps:
            return
        results = fewshot(self.model, self.train, self.test, self.shots, self.seeds, self.l2)
        self.history.append((step, results))
        if logs is not None:
            logs.update({f"fewshot_{k}shot": v["mean"] for k, v in results.items()})
        log.info("step %d: %s", step, ", ".join(f"{k}-shot {v['mean']:.3f}" for k, v in results.items()))
