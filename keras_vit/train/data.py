"""Input pipelines: sources (TFDS, image folders, arrays, scikit-learn digits) and the official pre-processing.

A source is a ``Source`` holding a ``tf.data.Dataset`` of ``(image uint8
(H, W, C), label int32)``, the number of classes and examples. ``pipeline``
turns it into batches of ``(images float32 (B, h, w, C) in [-1, 1],
one-hot labels float32 (B, K))``:

* train: inception crop (area 5% to 100%, aspect 3/4 to 4/3), random
  horizontal flip, resize to the model size; optional mixup and RandAugment;
* eval: resize to the model size;
* pixels to [-1, 1] with ``(x - 127.5) / 127.5``, as the official pipeline.

Training randomness is stateless and keyed by (seed, position in the
stream), and every iterator of a pipeline starts its shuffle from the seed,
so a pipeline is deterministic for a seed however often it is iterated, and
a resumed run can skip the batches already seen and get exactly the same stream.
"""

import dataclasses
import logging
import os
import re
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_vit.preprocessing import decode_image, pixels_to_unit

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Source:
    """A labelled image dataset: ``dataset`` yields (uint8 (H, W, C), int32 label)."""

    dataset: tf.data.Dataset
    num_classes: int
    num_examples: int | None  # None when unknown
    class_names: list | None = None


class ArraysError(ValueError):
    """Arrays ``from_arrays`` refuses: ``name`` (``"images"``, ``"labels"`` or ``"class_names"``), ``found`` (what
    is wrong: a range, values or a shape) and ``expected``."""

    def __init__(self, name, found, expected, advice=""):
        self.name, self.found, self.expected = name, found, expected
        super().__init__(f"from_arrays: {name} {found}; expected {expected}.{' ' + advice if advice else ''}")


class ClassListError(ValueError):
    """A class list that does not fit an image folder: ``root``, ``class_names``, ``repeated`` (names listed more
    than once) and ``unknown`` (class folders the list lacks), each sorted."""

    def __init__(self, root, class_names, repeated=(), unknown=()):
        self.root, self.class_names, self.repeated, self.unknown = Path(root), list(class_names), sorted(repeated), sorted(unknown)
        if self.repeated:
            message = (f"The class list {self.class_names} names {self.repeated} more than once: each class is one "
                       "label; list it once.")
        else:
            message = (f"{root} has class folders that are not in the class list {self.class_names}: {self.unknown}. "
                       "Add them to classes= (in the train split too), or move them out.")
        super().__init__(message)


class UndecodableImagesError(ValueError):
    """Files of an image folder that TensorFlow cannot decode: ``files``, ``[(path, reason), ...]`` (the reason
    in words: not an image, truncated, a broken link)."""

    def __init__(self, files):
        self.files = list(files)
        (first, reason), more = self.files[0], len(self.files) - 1
        also = f"; {more} more file(s) cannot be decoded either" if more else ""
        super().__init__(
            f"{first} {reason}{also}. Remove or replace such files, or pass skip_undecodable=True to leave them out."
        )


def _pixels(images):
    """``images`` as uint8, refusing what would silently become other pixels (``ArraysError``)."""
    if images.dtype == np.uint8 or images.size == 0:
        return images.astype("uint8")
    if images.dtype == bool or not np.issubdtype(images.dtype, np.number):
        raise ArraysError("images", f"of dtype {images.dtype}", "pixels in [0, 255]")
    low, high = images.min(), images.max()
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise ArraysError("images", "hold NaN or infinite values", "pixels in [0, 255]")
    if low < 0 or high > 255:
        raise ArraysError("images", f"range from {low:g} to {high:g}", "pixels in [0, 255]",
                          "Map them to [0, 255] (e.g. from [-1, 1]: (x + 1) * 127.5; 16-bit: x / 257).")
    if np.issubdtype(images.dtype, np.floating) and 0 < high <= 1:
        raise ArraysError("images", f"are floats in [{low:g}, {high:g}]", "pixels in [0, 255]",
                          "Images in [0, 1] would round to black: pass images * 255.")
    return np.round(images).astype("uint8")


def _class_ids(labels, num_classes):
    """``labels`` as int32 class ids below ``num_classes`` (None: the largest id + 1), refusing others."""
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.number):
        raise ArraysError("labels", f"of dtype {labels.dtype}", "integer class ids")
    if labels.size and np.issubdtype(labels.dtype, np.floating) and not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
        wrong = labels[~(np.isfinite(labels) & (labels == np.round(labels)))]
        raise ArraysError("labels", f"hold values that are not whole numbers, e.g. {wrong[0]:g}", "integer class ids",
                          "Pass class ids, not scores or one-hot rows.")
    labels = labels.astype("int64")
    if labels.size and labels.min() < 0:
        raise ArraysError("labels", f"hold negative ids, e.g. {labels.min()}", "class ids >= 0")
    if num_classes is not None and (not isinstance(num_classes, (int, np.integer)) or num_classes < 1):
        raise ArraysError("num_classes", f"is {num_classes!r}", "an integer >= 1")
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        raise ArraysError("labels", f"hold id {labels.max()}", f"ids below num_classes={num_classes}",
                          "Pass the right num_classes, or drop the examples of other classes.")
    return labels.astype("int32"), int(num_classes if num_classes is not None else (labels.max() + 1 if labels.size else 0))


def from_arrays(images, labels, num_classes=None, class_names=None):
    """Source from arrays: images (N, H, W, C) of pixels in [0, 255] (uint8, other integers or floats, rounded), labels
    (N,) integer class ids below ``num_classes`` (None: the largest id + 1).

    Refused (``ArraysError``, naming the array, what was found and what is expected): pixels outside [0, 255],
    float images in [0, 1] (they would round to black: pass ``images * 255``), NaN, labels that are negative, not
    whole numbers or not below ``num_classes``, and ``class_names`` of another length than ``num_classes``.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
        raise ArraysError("images and labels", f"have shapes {images.shape} and {labels.shape}", "(N, H, W, C) and (N,)")
    labels, num_classes = _class_ids(labels, num_classes)
    if class_names is not None and len(class_names) != num_classes:
        raise ArraysError("class_names", f"name {len(class_names)} classes", f"{num_classes} (num_classes)")
    dataset = tf.data.Dataset.from_tensor_slices((_pixels(images), labels))
    return Source(dataset, num_classes, len(labels), class_names)


def digits(split="train", test_fraction=0.2, seed=0):
    """scikit-learn's handwritten digits: 1,797 real 8x8 grayscale images, 10 classes; no download.

    Pixels (0..16) are scaled to uint8 0..255, shape (8, 8, 1). ``split`` is
    ``"train"``, ``"test"`` or ``"all"``; the split is stratified and fixed by ``seed``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images * (255.0 / 16.0))[..., None]
    if split == "all":
        return from_arrays(images, data.target, 10)
    train_x, test_x, train_y, test_y = train_test_split(
        images, data.target, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train', 'test' or 'all', got {split!r}.")
    return from_arrays(train_x, train_y, 10) if split == "train" else from_arrays(test_x, test_y, 10)


# What tf.io.decode_image decodes (TensorFlow 2.21): each format's extensions and first bytes.
IMAGE_FORMATS = {
    "JPEG": ((".jpg", ".jpeg", ".jpe", ".jfif"), (b"\xff\xd8\xff",)),
    "PNG": ((".png",), (b"\x89PNG\r\n\x1a\n",)),
    "GIF": ((".gif",), (b"GIF87a", b"GIF89a")),
    "BMP": ((".bmp",), (b"BM",)),
    "WebP": ((".webp",), (b"RIFF",)),  # and "WEBP" at byte 8
    "JPEG XL": ((".jxl",), (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")),
}
IMAGE_EXTENSIONS = tuple(extension for extensions, _ in IMAGE_FORMATS.values() for extension in extensions)
_FORMAT_NAMES = ", ".join(IMAGE_FORMATS)
_ENDINGS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}  # the last bytes of a complete file
_IGNORED_FOLDERS = ("__MACOSX",)  # macOS zip metadata


def _image_format(head):
    """The format whose first bytes ``head`` (16 bytes) are, or None."""
    for name, (_, signatures) in IMAGE_FORMATS.items():
        if head.startswith(signatures) and (name != "WebP" or head[8:12] == b"WEBP"):
            return name
    return None


def _looks_complete(image_format, head, tail, size):
    """Whether a file (first bytes ``head``, last bytes ``tail``, ``size`` bytes) ends as a complete file of its
    format does; True when the format tells nothing."""
    if image_format in _ENDINGS:
        return tail.rstrip(b"\0\r\n").endswith(_ENDINGS[image_format])
    if image_format == "BMP":  # the header's file size (0 when the writer left it out)
        declared = int.from_bytes(head[2:6], "little")
        return declared == 0 or declared <= size
    if image_format == "WebP":  # the RIFF chunk's size
        return int.from_bytes(head[4:8], "little") + 8 <= size
    return True


def _decode_error(path):
    """TensorFlow's reason (one line) why ``path`` does not decode, or None when it does."""
    try:
        tf.io.decode_image(tf.io.read_file(str(path)), expand_animations=False)
    except tf.errors.OpError as error:
        message = error.message.strip().splitlines()[-1]
        message = re.sub(r"^\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$", "", message)  # TensorFlow's wrapping
        return message or type(error).__name__
    return None


def undecodable_reason(path):
    """Why TensorFlow cannot decode image file ``path`` (a phrase to follow its name), or None when it can.

    Cheap for whole files: the first bytes name the format and the last bytes
    show a complete file; only a file that does not end as its format does
    (truncated, or with data appended) is decoded to decide.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY)
        try:  # unbuffered: two small reads of a file of any size
            head = os.read(descriptor, 16)
            size = os.lseek(descriptor, 0, os.SEEK_END)
            os.lseek(descriptor, max(0, size - 64), os.SEEK_SET)
            tail = os.read(descriptor, 64)
        finally:
            os.close(descriptor)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
        return "was removed while the folder was read"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    image_format = _image_format(head)
    if image_format is None:
        return f"is not an image TensorFlow decodes (its first bytes are not those of {_FORMAT_NAMES})"
    if not _looks_complete(image_format, head, tail, size):
        error = _decode_error(path)
        if error is not None:
            return f"is a truncated or corrupt {image_format} file (TensorFlow: {error})"
    return None


def _visible(path):
    """Whether a folder entry is data: not hidden (``.DS_Store``, ``._x.jpg``) nor macOS zip metadata."""
    return not path.name.startswith(".") and path.name not in _IGNORED_FOLDERS


def folder_classes(path):
    """The sorted class sub-folder names of an image folder split (``path/<class>/``); hidden folders and
    ``__MACOSX`` are not classes."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"Image folder {root} does not exist.")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))


def _list_images(root, class_names):
    """``(files, labels, undecodable [(path, reason)], other [paths], empty [class names])`` of an image folder."""
    files, labels, undecodable, other, empty = [], [], [], [], []
    for label, name in enumerate(class_names):
        folder = root / name
        entries = sorted(p for p in folder.iterdir() if _visible(p)) if folder.is_dir() else []
        images = [p for p in entries if p.suffix.lower() in IMAGE_EXTENSIONS]
        other += [p for p in entries if p.suffix.lower() not in IMAGE_EXTENSIONS and not p.is_dir()]
        if not images:
            empty.append(name)
        for file in images:
            reason = undecodable_reason(file)
            if reason is None:
                files.append(str(file))
                labels.append(label)
            else:
                undecodable.append((file, reason))
    return files, labels, undecodable, other, empty


def from_folder(path, seed=0, classes=None, channels=3, skip_undecodable=False):
    """Source from an image folder: one sub-folder per class, images in any format ``tf.io.decode_image``
    decodes (JPEG, PNG, GIF, BMP, WebP, JPEG XL: ``IMAGE_EXTENSIONS``), decoded to (H, W, ``channels``).

    ``classes``: the class names in label order, shared by every split of a
    dataset (e.g. the train split's ``class_names`` for the test split); None:
    this folder's sorted sub-folder names. A listed class without a folder or
    images here is a logged warning (its label stays its index in ``classes``);
    a sub-folder not in ``classes`` is an error. Hidden entries (``.DS_Store``,
    ``._x.jpg``) and ``__MACOSX`` folders are ignored; other files that are not
    images by their extension are left out, named in a logged warning.
    ``channels``: 1 (grayscale) or 3 (RGB), whatever the files hold.

    Each image must be one TensorFlow decodes (``undecodable_reason``: its
    first bytes, a complete file; a broken symbolic link is not one):
    otherwise a ``ValueError`` names the file and says why, or with
    ``skip_undecodable=True`` such files are left out, counted and named in a
    logged warning, and a file that still fails to decode in the pipeline is
    dropped there (TensorFlow logs it).

    The file list is shuffled once with ``seed``, so that a shuffle buffer smaller than the dataset still
    mixes the classes (files are listed class by class).
    """
    root = Path(path)
    found = folder_classes(root)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}.")
    class_names = list(found if classes is None else classes)
    repeated = sorted({name for name in class_names if class_names.count(name) > 1})
    if repeated:
        raise ClassListError(root, class_names, repeated=repeated)
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ClassListError(root, class_names, unknown=unknown)
    files, labels, undecodable, other, empty = _list_images(root, class_names)
    if undecodable and not skip_undecodable:
        raise UndecodableImagesError(undecodable)
    if undecodable:
        log.warning(
            "Skipped %d file(s) of %s that cannot be decoded, e.g. %s %s.", len(undecodable), root, *undecodable[0]
        )
    if other:
        log.warning(
            "Left out %d file(s) of %s that are not images (extensions %s), e.g. %s; the image formats read are %s.",
            len(other), root, ", ".join(sorted({p.suffix.lower() or "(none)" for p in other})), other[0], _FORMAT_NAMES,
        )
    if not files:
        raise ValueError(f"{root} has no class sub-folders with images (expected {root}/<class>/<image>, formats {_FORMAT_NAMES}).")
    if empty:
        log.warning(
            "%s has no images of class(es) %s; the labels of the other classes keep their index in the class list.",
            root, ", ".join(map(repr, empty)),
        )

    def decode(file, label):
        return decode_image(tf.io.read_file(file), channels), label

    order = np.random.default_rng(seed).permutation(len(files))
    files, labels = np.asarray(files)[order], np.asarray(labels, "int32")[order]
    dataset = tf.data.Dataset.from_tensor_slices((files, labels)).map(decode)
    if skip_undecodable:
        dataset = dataset.ignore_errors(log_warning=True)
    return Source(dataset, len(class_names), len(files), class_names)


def from_tfds(name, split="train", data_dir=None, download=False):
    """Source from a TensorFlow Datasets name, e.g. ``"cifar10"``.

    Without ``download=True`` the dataset must already be prepared in
    ``data_dir``; otherwise this raises at once with the command that prepares
    it (instead of minutes of network retries).
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Prepare it with "
                f"`tfds build {name} --data_dir {data_dir or '~/tensorflow_datasets'}` (or pass download=True), "
                "or use an image folder or the offline 'digits' data."
            )
        builder.download_and_prepare()
    info = builder.info
    dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    label = info.features["label"]
    dataset = dataset.map(lambda image, y: (image, tf.cast(y, tf.int32)))
    num_examples = info.splits[split].num_examples if info.splits else None  # None for mocked datasets
    return Source(dataset, label.num_classes, num_examples, list(label.names))


def load_source(spec, split="train", data_dir=None, download=False, **folder_options):
    """A source from a string: ``"digits"``, ``"folder:PATH"`` (classes in ``PATH/<split>/<class>/``) or a
    TFDS name (``"tfds:NAME"`` or ``"NAME"``). ``folder_options`` go to ``from_folder`` (``classes``,
    ``channels``, ``skip_undecodable``) for image folders."""
    if spec == "digits":
        return digits(split)
    if spec.startswith("folder:"):
        return from_folder(os.path.join(spec[len("folder:") :], split), **folder_options)
    return from_tfds(spec.removeprefix("tfds:"), split, data_dir, download)


def _inception_crop(image, seed, area_range=(0.05, 1.0)):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros((1, 0, 4)),
        seed=seed,
        area_range=area_range,
        aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0.0,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, size)
    crop.set_shape([None, None, image.shape[-1]])  # the channel count survives the dynamic crop
    return crop


def to_unit_range(images):
    """uint8 (or float) pixels in [0, 255] -> float32 in [-1, 1]."""
    return pixels_to_unit(tf.cast(images, tf.float32))


def train_transform(image, seed, image_size, crop_area=(0.05, 1.0), flip=True):
    """Inception crop, random flip and resize of one uint8 image; stateless given ``seed`` (2 ints)."""
    seeds = tf.random.experimental.stateless_split(seed, 2)
    if crop_area:
        image = _inception_crop(image, seeds[0], crop_area)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    return tf.image.resize(image, image_size)


def eval_transform(image, image_size):
    return tf.image.resize(image, image_size)


def _mixup(images, labels, seed, alpha):
    """Mixes each batch with itself rolled by one, weight ~ Beta(alpha, alpha) per batch (big_vision's mixup)."""
    gamma = [tf.random.stateless_gamma((), s, alpha) for s in tf.unstack(tf.random.experimental.stateless_split(seed, 2))]
    weight = gamma[0] / (gamma[0] + gamma[1])
    mixed_images = weight * images + (1 - weight) * tf.roll(images, 1, axis=0)
    mixed_labels = weight * labels + (1 - weight) * tf.roll(labels, 1, axis=0)
    return mixed_images, mixed_labels


def pipeline(
    source,
    image_size,
    batch_size,
    training,
    seed=0,
    mixup_alpha=0.0,
    randaugment=None,
    cache=True,
    shuffle_buffer=10_000,
    skip_batches=0,
    crop_area=(0.05, 1.0),
    flip=True,
    shard=(0, 1),
    whole_batches=False,
):
    """Batches of (images (B, h, w, C) in [-1, 1], one-hot labels (B, K)) from a ``Source``.

    ``training=True``: repeated forever, shuffled, augmented (see the module
    docstring), ``drop_remainder`` so every step has ``batch_size`` images;
    ``skip_batches`` resumes the stream after that many batches. ``training=False``:
    one pass, in order, last batch kept. ``randaugment`` is None or
    ``(num_ops, magnitude)`` (magnitude 0 to 10) for Keras' ``RandAugment`` (not covered by the
    determinism guarantee). ``crop_area`` (min, max fraction of the image; None:
    no crop) and ``flip`` tune the augmentation for data such as digits, where
    small crops and mirror images destroy the label. ``batch_size`` is the global batch; a
    ``tf.distribute`` strategy splits it across replicas.

    ``shard=(index, count)``: this process's part of every global batch, rows ``index * b`` to
    ``(index + 1) * b`` with b = ``batch_size / count`` (a multi-process JAX run: the processes' parts make up
    the very batches of a single-process run; each process reads the whole source and augments its own rows;
    mixup pairs images within a part). ``whole_batches`` (evaluation): the last batch is filled up to
    ``batch_size`` with zero images and batches are ``(images, labels, weights (B,))``, weights 0 for the filling,
    so that a mesh's batch axis divides every batch and weighted metrics count the real examples only.
    """
    index, count = shard
    if batch_size % count:
        raise ValueError(f"batch_size {batch_size} is not divisible into {count} process parts.")
    part = batch_size // count
    image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    num_classes = source.num_classes
    dataset = source.dataset.cache() if cache else source.dataset
    one_hot = lambda y: tf.one_hot(y, num_classes, dtype=tf.float32)  # noqa: E731
    if not training:
        dataset = dataset.map(lambda x, y: (to_unit_range(eval_transform(x, image_size)), one_hot(y)))
        dataset = dataset.batch(batch_size)
        if whole_batches:
            dataset = dataset.map(lambda x, y: _filled(x, y, batch_size))
        if count > 1:
            dataset = dataset.map(lambda *batch: tuple(t[index * part : (index + 1) * part] for t in batch))
        return dataset.prefetch(tf.data.AUTOTUNE)

    buffer = min(shuffle_buffer, source.num_examples or shuffle_buffer)
    source_dataset = dataset
    # A new order every pass. Made inside flat_map, the shuffle starts from its seed in every iterator, so the
    # stream is a function of the position alone however often it is iterated (model.fit looks at a batch first).
    dataset = tf.data.Dataset.from_tensors(0).flat_map(
        lambda _: source_dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True).repeat()
    ).enumerate()
    if skip_batches:
        dataset = dataset.skip(skip_batches * batch_size)  # before augmentation: positions keep their seeds
    if count > 1:
        dataset = dataset.filter(lambda position, _: (position % batch_size) // part == index)

    def augment(index, example):
        image, label = example
        element_seed = tf.stack([tf.cast(seed, tf.int64), index])
        return train_transform(image, element_seed, image_size, crop_area, flip), one_hot(label), index

    def finish(images, labels, indices):
        if randaugment:
            images = randaugment_layer(images)
        if mixup_alpha:
            step = indices[0] // batch_size  # the batch's position in the stream, also after a resume
            images, labels = _mixup(images, labels, tf.stack([tf.cast(seed, tf.int64) + 1, step]), mixup_alpha)
        return to_unit_range(images), labels

    randaugment_layer = _randaugment_layer(*randaugment, seed) if randaugment else None
    dataset = dataset.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(part, drop_remainder=True).map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _filled(images, labels, batch_size):
    """A batch filled up to ``batch_size`` rows with zeros, and its weights (1 real, 0 filling)."""
    missing = batch_size - tf.shape(images)[0]
    fill = lambda t: tf.pad(t, [[0, missing]] + [[0, 0]] * (len(t.shape) - 1))  # noqa: E731
    weights = tf.concat([tf.ones_like(labels[:, 0]), tf.zeros([missing], labels.dtype)], axis=0)
    return fill(images), fill(labels), weights


def _randaugment_layer(num_ops, magnitude, seed):
    import keras

    if not 0 <= magnitude <= 10:
        raise ValueError(f"randaugment magnitude {magnitude} is not in [0, 10]: Keras' RandAugment factor is magnitude / 10.")
    return keras.layers.RandAugment(
        value_range=(0, 255), num_ops=num_ops, factor=magnitude / 10.0, seed=seed
    )


def require_examples(dataset, name="the evaluation dataset"):
    """Raises ``ValueError`` naming ``name`` when the finite ``dataset`` yields nothing (an accuracy would be 0/0).

    Reads the cardinality; when it is unknown, takes one element.
    """
    cardinality = int(dataset.cardinality())
    empty = cardinality == 0 or (
        cardinality == tf.data.UNKNOWN_CARDINALITY and not any(True for _ in dataset.take(1))
    )
    if empty:
        raise ValueError(f"{name} holds no examples: its accuracy would be 0/0. Give one with examples.")
