"""The loading pipeline: read -> adapt -> assign.

* ``read`` turns a source into ``Source(arrays, label, grid)``: a weights
  family (through the registry and the download cache), an URL, an official
  ``.npz``, a Keras ``.keras`` model or a ``.weights.h5`` file (read through
  a twin of the target model), arrays keyed by official name;
* ``keras_vit.pretrained.adapt.adapt`` fits them to the target model;
* ``assign`` checks the one-to-one match (strict: all or nothing) and
  assigns.

``load_weights`` runs the three; ``keras_vit.load_weights`` is this function.
"""

import collections
import os
from pathlib import Path

import keras
import numpy as np

from keras_vit.models import VisionTransformer, official_arrays, official_weights
from keras_vit.pretrained import adapt as adapt_lib
from keras_vit.pretrained import download, registry
from keras_vit.pretrained.config import architecture, architecture_summary, infer_config
from keras_vit.pretrained.names import CheckpointMismatchError, mismatch, normalize_names
from keras_vit.pretrained.npz import read_npz

Source = collections.namedtuple("Source", "arrays label grid")
Source.__doc__ = "Arrays keyed by official name, a label for messages, and the token grid when the source knows it."
_SUFFIXES = (".npz", ".keras", ".weights.h5")


def _suffix(path):
    name = Path(path).name
    return ".weights.h5" if name.endswith(".weights.h5") else Path(path).suffix


def _read_npz(path):
    try:
        return read_npz(path)
    except ValueError as error:
        if download.is_cached(path):
            raise ValueError(
                f"{error} This is a file in the download cache: delete it (or move it aside) and retry, "
                "which downloads it again."
            ) from None
        raise


def read(source, model_name=None, image_size=None, like=None):
    """Reads a weights source into a ``Source``.

    ``source``: a family of ``registry.FAMILIES`` (needs ``model_name`` and
    ``image_size`` to pick the file), an URL, or a path to an official
    ``.npz``, a ``.keras`` model or a ``.weights.h5`` file (needs ``like``,
    a model of the file's architecture, since the file holds none).
    """
    if isinstance(source, str) and source in registry.FAMILIES:
        if model_name is None:
            raise ValueError(
                f"A weights family ({source!r}) needs a model of an official variant (e.g. ViT-B_16, "
                "keras_vit.list_models()); this model's geometry is none of them: pass a file path or URL instead."
            )
        entry = registry.resolve(model_name, source, image_size)
        path = download.fetch(entry.url, entry.sha256)
        return Source(_read_npz(path), entry.url, None)
    source = os.fspath(source)
    path = download.fetch(source) if "://" in source else Path(source)
    kind = _suffix(path)
    if kind not in _SUFFIXES and path.is_file():
        return Source(_read_npz(path), source, None)  # says what the file is when it is not an .npz
    if kind not in _SUFFIXES:
        raise ValueError(
            f"Unknown weights {source!r}: give a weights family ({', '.join(registry.FAMILIES)}), "
            "an official .npz, a Keras .keras or .weights.h5 file, or an URL of one of those."
        )
    if not path.exists():
        raise FileNotFoundError(f"Weights file {path} does not exist.")
    if kind == ".npz":
        return Source(_read_npz(path), source, None)
    if kind == ".keras":
        return model_source(keras.models.load_model(path), source)
    if like is None:
        raise ValueError(f"{source} is a .weights.h5 file, which holds no architecture: load it into a model.")
    twin = type(like).from_config(like.get_config())
    twin.load_weights(path)
    return model_source(twin, source)


def model_source(model, label):
    """A ``Source`` of a keras_vit model's own weights (its grid known even when it is rectangular)."""
    return Source(official_arrays(model), label, model.grid if isinstance(model, VisionTransformer) else None)


def architecture_of(model):
    """The ``Architecture`` of a keras_vit model; read off the weights of a plain functional model saved before
    ``VisionTransformer`` existed."""
    if isinstance(model, VisionTransformer):
        return model.architecture
    return architecture(infer_config(official_arrays(model)), image_size=tuple(model.input.shape[1:3]))


def _shapes_only(shapes):
    """Zero-stride stand-ins of arrays with these shapes (no memory), for ``infer_config``."""
    return {name: np.broadcast_to(np.float32(0), shape) for name, shape in shapes.items()}


def _summary(arrays, shapes):
    """What the file and the model are, when their architectures differ (for a mismatch message)."""
    try:
        return architecture_summary(infer_config(arrays), infer_config(_shapes_only(shapes)))
    except (ValueError, KeyError):
        return None


def assign(model, source, adapt=True):
    """Assigns ``source`` (a ``Source``) to ``model``, through ``adapt`` first when ``adapt=True``.

    Strict: every model weight not kept by ``adapt`` gets an array and every
    array is used, with equal shapes; otherwise a ``CheckpointMismatchError``
    says what the file and the model are, and nothing is assigned. Each
    adaptation is logged once after success. Returns ``model``.
    """
    variables = official_weights(model)
    shapes = {name: tuple(variable.shape) for name, variable in variables.items()}
    arrays = normalize_names(source.arrays)
    kept, notes = set(), []
    if adapt:
        arrays, kept, notes = adapt_lib.adapt(arrays, architecture_of(model), source_grid=source.grid)
    wanted = {name: shape for name, shape in shapes.items() if name not in kept}
    missing, unexpected, mis_shaped = mismatch(wanted, arrays)
    if missing or unexpected or mis_shaped:
        summary = _summary(normalize_names(source.arrays), shapes)
        raise CheckpointMismatchError(source.label, missing, unexpected, mis_shaped, summary=summary)
    for name, shape in wanted.items():
        variables[name].assign(np.asarray(arrays[name], dtype=variables[name].dtype))
    adapt_lib.log_notes(notes, source.label)
    return model


def load_weights(model, source, adapt=True):
    """Loads ``source`` into ``model``: read -> adapt -> assign.

    ``source``: a weights family (the model's name picks the file), an URL,
    an official ``.npz``, a ``.keras`` or a ``.weights.h5`` file. With
    ``adapt=True`` (the default) a different head, a missing top, another
    resolution, patch size or number of input channels are adapted (see
    ``keras_vit.pretrained.adapt.adapt``); ``adapt=False`` is strict.
    Returns ``model``.
    """
    image_size = tuple(model.input.shape[1:3])
    variant = model.vit_config["variant"] if isinstance(model, VisionTransformer) else model.name
    return assign(model, read(source, variant, image_size, like=model), adapt=adapt)
