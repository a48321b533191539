"""Input preprocessing of the official checkpoints and ImageNet-1k class names.

``preprocess_input`` maps pixels in [0, 255] to [-1, 1] as the official input
pipeline (no mean/std normalisation). ``decode_predictions`` names the top
classes of a 1000-way ImageNet head; the class list ships with the package
(``imagenet1k_labels.tsv``: WordNet id and names, in the standard index order).
"""

import functools
from importlib import resources

import numpy as np
from keras import ops


def preprocess_input(images):
    """(..., H, W, C) pixels in [0, 255] (uint8 or float) -> float32 in [-1, 1]: ``(x - 127.5) / 127.5``."""
    return (ops.cast(images, "float32") - 127.5) / 127.5


@functools.cache
def imagenet1k_classes():
    """The 1000 ImageNet-1k classes as ``[(wordnet_id, names), ...]`` in index order."""
    text = resources.files("keras_vit").joinpath("imagenet1k_labels.tsv").read_text(encoding="utf-8")
    return [tuple(line.split("\t", 1)) for line in text.splitlines()]


def decode_predictions(predictions, top=5):
    """Top classes of (B, 1000) scores as ``[[(wordnet_id, name, score), ...], ...]``, best first.

    ``name`` is the first of the class's names (e.g. ``"goldfish"``); scores
    are returned as given (logits or probabilities).
    """
    scores = np.asarray(ops.convert_to_numpy(predictions))
    classes = imagenet1k_classes()
    if scores.ndim != 2 or scores.shape[1] != len(classes):
        raise ValueError(
            f"decode_predictions expects (batch, {len(classes)}) ImageNet-1k scores, got shape {scores.shape}."
        )
    results = []
    for row in scores:
        best = np.argsort(-row, kind="stable")[:top]
        results.append([(classes[i][0], classes[i][1].split(",")[0], float(row[i])) for i in best])
    return results
