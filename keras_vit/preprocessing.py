"""Input preprocessing of the pretrained weights and ImageNet-1k class names.

``preprocess_input`` maps pixels in [0, 255] to [-1, 1] as the official input
pipeline (no mean/std normalisation), or as a model's weights expect (``input_settings``: the mean, std,
interpolation and crop of timm's ``pretrained_cfg``, which a model loaded from timm weights stores). ``decode_predictions`` names the top
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


# The official input pipeline in the terms of timm's ``pretrained_cfg`` (the vocabulary of ``input_settings``):
# pixels / 255, minus ``mean``, over ``std`` (per channel), so (pixels - 127.5) / 127.5; images resized to the
# model's size bilinearly, the whole image (timm's crop_mode "squash", crop_pct 1: nothing cut off).
OFFICIAL_INPUT = dict(mean=0.5, std=0.5, interpolation="bilinear", crop_pct=1.0, crop_mode="squash")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic")
CROP_MODES = ("center", "squash", "border")  # timm's: shorter side to size / crop_pct then a central crop; both
# sides to size / crop_pct then a central crop; the longer side to size, then padded (as "center" here)


def pixels_to_unit(pixels):
    """The official input mapping, [0, 255] -> [-1, 1]: ``(pixels - 127.5) / 127.5`` on float pixels of any array
    kind (NumPy, a TensorFlow or Keras tensor): the one place it is written."""
    return (pixels - 127.5) / 127.5


def _per_channel(name, value):
    """``value`` (a number or a sequence of numbers) as a tuple of floats; ``ValueError`` naming ``name``."""
    values = (value,) if isinstance(value, numbers.Real) else tuple(value) if isinstance(value, (list, tuple)) else None
    if not values or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) for v in values):
        raise ValueError(f"preprocessing[{name!r}] must be a number or one number per channel, got {value!r}.")
    return tuple(float(v) for v in values)


def input_settings(preprocessing=None):
    """The full input pipeline of a model: ``OFFICIAL_INPUT`` updated by ``preprocessing`` (a dict with any of
    ``mean``, ``std`` (of pixels / 255, one number or one per channel), ``interpolation``, ``crop_pct``,
    ``crop_mode``, as timm's ``pretrained_cfg`` has them; None: the official pipeline). ``mean`` and ``std`` come
    back as tuples. A key or a value it cannot take is a ``ValueError`` naming it."""
    given = dict(preprocessing or {})
    unknown = set(given) - set(OFFICIAL_INPUT)
    if unknown:
        raise ValueError(f"preprocessing has unknown keys {sorted(unknown)}; it takes {', '.join(OFFICIAL_INPUT)}.")
    settings = {**OFFICIAL_INPUT, **given}
    settings["mean"] = _per_channel("mean", settings["mean"])
    settings["std"] = _per_channel("std", settings["std"])
    if min(settings["std"]) <= 0:
        raise ValueError(f"preprocessing['std'] must be positive, got {settings['std']}.")
    if settings["interpolation"] not in INTERPOLATIONS:
        raise ValueError(f"preprocessing['interpolation'] must be one of {INTERPOLATIONS}, got {settings['interpolation']!r}.")
    crop = settings["crop_pct"]
    if not isinstance(crop, numbers.Real) or isinstance(crop, bool) or not 0 < crop <= 1:
        raise ValueError(f"preprocessing['crop_pct'] must be in (0, 1], got {crop!r}.")
    settings["crop_pct"] = float(crop)
    if settings["crop_mode"] not in CROP_MODES:
        raise ValueError(f"preprocessing['crop_mode'] must be one of {CROP_MODES}, got {settings['crop_mode']!r}.")
    return settings


def normalization(preprocessing=None, channels=3):
    """``(scale, offset)`` with ``pixels * scale + offset == (pixels / 255 - mean) / std``: floats when every
    channel has the same mean and std (the official pipeline: 1 / 127.5 and -1), else tuples of ``channels``
    values. A mean or std with another number of values than 1 or ``channels`` is a ``ValueError``."""
    settings = input_settings(preprocessing)
    mean, std = settings["mean"], settings["std"]
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise ValueError(f"preprocessing[{name!r}] has {len(values)} values for a model of {channels} channels.")
    if len(set(mean)) == 1 and len(set(std)) == 1:
        return 1.0 / (255.0 * std[0]), -mean[0] / std[0]
    mean, std = np.broadcast_to(mean, channels), np.broadcast_to(std, channels)
    return tuple(float(v) for v in 1.0 / (255.0 * std)), tuple(float(v) for v in -mean / std)


def preprocess_input(images, model=None):
    """(..., H, W, C) pixels in [0, 255] (uint8 or float) -> float32 model inputs.

    Without ``model`` (or for a model of the official weights): ``(x - 127.5) / 127.5``, in [-1, 1]. With a
    model whose weights expect another normalization (timm and Hugging Face Hub weights carry theirs, e.g.
    ImageNet's or CLIP's mean and std; ``model.preprocessing``): ``(x / 255 - mean) / std`` per channel.

    NumPy arrays (and lists) are checked first (``check_pixels``): values outside [0, 255] (images already
    mapped to [-1, 1], 16-bit pixels) and floats in [0, 1] are a ``ValueError`` that says what to do. Tensors are
    taken as they are (nothing is added to a graph or a ``tf.data`` pipeline).
    """
    if isinstance(images, (np.ndarray, list, tuple)):
        check_pixels(images)
    channels = images.shape[-1] if hasattr(images, "shape") else np.shape(images)[-1]
    scale, offset = normalization(getattr(model, "preprocessing", None), channels)
    if (scale, offset) == normalization():
        return pixels_to_unit(ops.cast(images, "float32"))
    return ops.cast(images, "float32") * np.asarray(scale, "float32") + np.asarray(offset, "float32")


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


def resize_and_crop(image, image_size, preprocessing=None):
    """One (h, w, C) image -> float32 (H, W, C) ``image_size`` as an evaluation pipeline of ``preprocessing``
    (``input_settings``) prepares it: the official one resizes the whole image bilinearly (crop_pct 1, "squash",
    no antialiasing); timm's resize to ``image_size / crop_pct`` (both sides for "squash", else keeping the aspect ratio so that both sides
    reach it) with its interpolation (antialiased), then cut out the centre. TensorFlow."""
    import tensorflow as tf

    settings = input_settings(preprocessing)
    size = np.asarray(image_size)
    scaled = np.floor(size / settings["crop_pct"]).astype(int)
    if settings["crop_mode"] != "squash":
        shape = np.asarray(image.shape[:2])
        scaled = np.maximum(np.round(shape * np.max(scaled / shape)).astype(int), size)
    antialias = preprocessing is not None  # timm's resizes (PIL's, torchvision's) are; the official one is not
    resized = tf.image.resize(image, tuple(scaled), method=settings["interpolation"], antialias=antialias)
    top, left = (scaled - size) // 2
    return resized[top : top + size[0], left : left + size[1]]


def load_images(paths, image_size, channels=3, model=None):
    """Image files -> float32 (N, H, W, ``channels``) model inputs: decoded (``decode_image``), resized and cropped
    to ``image_size`` (H, W) as ``model``'s weights expect (``resize_and_crop``; without ``model``: the official
    bilinear resize of the whole image) and normalized by ``preprocess_input(..., model=model)``. TensorFlow."""
    import tensorflow as tf

    settings = getattr(model, "preprocessing", None)
    pixels = [resize_and_crop(decode_image(tf.io.read_file(str(path)), channels), image_size, settings)
              for path in paths]
    pixels = np.clip(np.stack(pixels), 0, 255)  # bicubic and Lanczos overshoot
    return np.asarray(ops.convert_to_numpy(preprocess_input(pixels, model=model)))


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
