"""Input preprocessing of the official checkpoints and ImageNet-1k class names.

``preprocess_input`` maps pixels in [0, 255] to [-1, 1] as the official input
pipeline (no mean/std normalisation). ``decode_predictions`` names the top
classes of a 1000-way ImageNet head, whose class list ships with the package
(``imagenet1k_labels.tsv``: WordNet id and names, in the standard index order),
or of any head given its class names. ``decode_image`` decodes image files to
the channels a model takes (TensorFlow).
"""

import functools
from importlib import resources

import numpy as np
from keras import ops


def preprocess_input(images):
    """(..., H, W, C) pixels in [0, 255] (uint8 or float) -> float32 in [-1, 1]: ``(x - 127.5) / 127.5``."""
    return (ops.cast(images, "float32") - 127.5) / 127.5


def decode_image(data, channels):
    """Encoded image bytes (any format ``tf.io.decode_image`` reads) -> uint8 (H, W, ``channels``) tensor.

    ``channels``: 1 (grey) or 3 (RGB), whatever the file holds; another count
    is decoded as ``tf.io.decode_image(channels=...)`` does. GIF, BMP, WebP
    and JPEG XL decoders give no grey output: those files are decoded in
    colour and converted (ITU-R 601 luma, as the JPEG and PNG decoders).
    Works in a ``tf.function`` and a ``tf.data`` pipeline.
    """
    import tensorflow as tf

    if channels != 1:
        return tf.io.decode_image(data, channels=channels, expand_animations=False)
    head = tf.strings.substr(data, 0, 2)
    colour_only = tf.reduce_any(tf.equal(head, [b"GI", b"BM", b"RI", b"\xff\x0a", b"\x00\x00"]))  # GIF BMP WebP JXL
    return tf.cond(
        colour_only,
        lambda: tf.image.rgb_to_grayscale(tf.io.decode_image(data, channels=3, expand_animations=False)),
        lambda: tf.io.decode_image(data, channels=1, expand_animations=False),
    )


def load_images(paths, image_size, channels=3):
    """Image files -> float32 (N, H, W, ``channels``) in [-1, 1]: decoded (``decode_image``), resized to
    ``image_size`` (H, W) (bilinear) and mapped by ``preprocess_input``. TensorFlow."""
    import tensorflow as tf

    pixels = [tf.image.resize(decode_image(tf.io.read_file(str(path)), channels), image_size) for path in paths]
    return np.asarray(ops.convert_to_numpy(preprocess_input(np.stack(pixels))))


@functools.cache
def imagenet1k_classes():
    """The 1000 ImageNet-1k classes as ``[(wordnet_id, names), ...]`` in index order."""
    text = resources.files("keras_vit").joinpath("imagenet1k_labels.tsv").read_text(encoding="utf-8")
    return [tuple(line.split("\t", 1)) for line in text.splitlines()]


def decode_predictions(predictions, top=5, class_names=None):
    """Top classes of (B, K) scores as ``[[(class_id, name, score), ...], ...]``, best first.

    Without ``class_names``: a 1000-way ImageNet-1k head; ``class_id`` is the
    WordNet id and ``name`` the first of the class's names (e.g.
    ``"goldfish"``). With ``class_names`` (the K names in output order, e.g.
    ``report.json``'s ``"class_names"`` of a model trained on an image
    folder): ``class_id`` is the output index. Scores are returned as given
    (logits or probabilities).
    """
    scores = np.asarray(ops.convert_to_numpy(predictions))
    if class_names is None:
        classes = [(wordnet_id, names.split(",")[0]) for wordnet_id, names in imagenet1k_classes()]
        expected = f"{len(classes)}) ImageNet-1k scores (pass class_names= for another head)"
    else:
        classes = list(enumerate(map(str, class_names)))
        expected = f"{len(classes)}) scores, one per class name"
    if scores.ndim != 2 or scores.shape[1] != len(classes):
        raise ValueError(f"decode_predictions expects (batch, {expected}, got shape {scores.shape}.")
    results = []
    for row in scores:
        best = np.argsort(-row, kind="stable")[:top]
        results.append([(*classes[i], float(row[i])) for i in best])
    return results
