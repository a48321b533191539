"""Input preprocessing of the official checkpoints and ImageNet-1k class names.

``preprocess_input`` maps pixels in [0, 255] to [-1, 1] as the official input
pipeline (no mean/std normalisation). ``decode_predictions`` names the top
classes of a 1000-way ImageNet head, whose class list ships with the package
(``imagenet1k_labels.tsv``: WordNet id and names, in the standard index order),
or of any head given its class names. ``decode_image`` decodes image files to
the channels a model takes (TensorFlow).
"""

import functools
import numbers
from importlib import resources

import numpy as np
from keras import ops


# ``preprocess_input`` and the official evaluation pipeline in the terms of other libraries' configs (timm's
# ``pretrained_cfg``): pixels / 255, minus ``mean``, over ``std`` (per channel); images resized to the model's size
# bilinearly, uncropped (crop_pct 1).
OFFICIAL_INPUT = dict(mean=0.5, std=0.5, interpolation="bilinear", crop_pct=1.0, crop_mode="center")


def pixels_to_unit(pixels):
    """The official input mapping, [0, 255] -> [-1, 1]: ``(pixels - 127.5) / 127.5`` on float pixels of any array
    kind (NumPy, a TensorFlow or Keras tensor): the one place it is written."""
    return (pixels - 127.5) / 127.5


def preprocess_input(images):
    """(..., H, W, C) pixels in [0, 255] (uint8 or float) -> float32 in [-1, 1]: ``(x - 127.5) / 127.5``.

    NumPy arrays (and lists) are checked first (``check_pixels``): values outside [0, 255] (images already
    mapped to [-1, 1], 16-bit pixels) and floats in [0, 1] are a ``ValueError`` that says what to do. Tensors are
    taken as they are (nothing is added to a graph or a ``tf.data`` pipeline).
    """
    if isinstance(images, (np.ndarray, list, tuple)):
        check_pixels(images)
    return pixels_to_unit(ops.cast(images, "float32"))


def check_pixels(images, what="preprocess_input"):
    """Refuses (``ValueError``) NumPy ``images`` that are not pixels in [0, 255]: values below 0 (already in
    [-1, 1]?) or above 255 (16-bit pixels?), or floats all in [0, 1] that are not whole numbers (images scaled to
    [0, 1]). Black and near-black pixel images pass."""
    values = np.asarray(images)
    if values.size == 0 or values.dtype == bool:
        return
    low, high = values.min(), values.max()
    if low < 0:
        raise ValueError(
            f"{what} takes pixels in [0, 255], got values down to {low:.3g}: these images look already mapped to "
            "[-1, 1] (pass them to a model without include_preprocessing, and do not preprocess them again)."
        )
    if high > 255:
        raise ValueError(
            f"{what} takes pixels in [0, 255], got values up to {high:.6g} ({values.dtype}): scale them to 8 bits "
            "first (16-bit pixels: // 257)."
        )
    if values.dtype.kind == "f" and 0 < high <= 1 and np.any(values != np.round(values)):
        raise ValueError(f"{what} takes pixels in [0, 255], got floats in [0, 1]: multiply them by 255 first.")


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


def decode_predictions(predictions, top=5, class_names=None, model=None):
    """Top classes of (B, K) scores as ``[[(class_id, name, score), ...], ...]``, best first.

    Without ``class_names``: a 1000-way ImageNet-1k head; ``class_id`` is the
    WordNet id and ``name`` the first of the class's names (e.g.
    ``"goldfish"``). With ``class_names`` (the K names in output order, e.g.
    ``report.json``'s ``"class_names"`` of a model trained on an image
    folder), or ``model=`` a model built with ``class_names`` (its
    ``model.class_names``): ``class_id`` is the output index. ``top``: a
    positive int (at most K classes are returned). Scores are returned as
    given (logits or probabilities).
    """
    if not isinstance(top, numbers.Integral) or isinstance(top, bool) or top < 1:
        raise ValueError(f"top must be a positive int (how many classes per image), got {top!r}.")
    if model is not None:
        if class_names is not None:
            raise ValueError("Give class_names or model (whose class_names are read), not both.")
        class_names = getattr(model, "class_names", None)
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
