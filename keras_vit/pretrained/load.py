"""The loading pipeline: read -> adapt -> assign.

* ``read`` turns a source into a ``Source`` (arrays keyed by official name, ...): a weights
  family (through the registry and the download cache), an URL, an official
  ``.npz``, a Keras ``.keras`` model, a ``.weights.h5`` file (read through
  a twin of the target model), or a timm checkpoint (``keras_vit.pretrained.timm``: a Hugging Face Hub folder,
  a ``.safetensors`` file, an id ``hf-hub:timm/<architecture>.<tag>``), which also states its architecture and
  input preprocessing;
* ``keras_vit.pretrained.adapt.adapt`` fits them to the target model;
* ``assign`` checks the one-to-one match (strict: all or nothing) and
  assigns.

``load_weights`` runs the three; ``keras_vit.load_weights`` is this function.
"""

import collections
import contextlib
import os
import urllib.parse
from pathlib import Path

import keras
import numpy as np

from keras_vit.backbone import dequantized_copy, holds_codes, quantize_like
from keras_vit.models import VisionTransformer, as_vision_transformer
from keras_vit.official_names import official_arrays, official_weights
from keras_vit.pretrained import adapt as adapt_lib
from keras_vit.pretrained import checks, download, hub, registry
from keras_vit.pretrained.config import architecture, architecture_summary, infer_config
from keras_vit.pretrained.names import CheckpointMismatchError, mismatch, model_arrays, normalize_names
from keras_vit.pretrained.npz import READ_ANYWAY_BYTES, read_npz, stand_ins
from keras_vit.pretrained.safetensors_file import PICKLE_SUFFIXES, refuse_pickle
from keras_vit.pretrained.timm import UnsupportedArchitectureError, read_timm

Source = collections.namedtuple("Source", "arrays label grid config preprocessing", defaults=(None, None))
Source.__doc__ = (
    "Arrays keyed by official name, a label for messages, the token grid when the source knows it, the builder "
    "arguments the source states (a timm checkpoint's; None: read off the arrays, ``infer_config``) and the input "
    "preprocessing its weights expect (``keras_vit.preprocessing.input_settings`` keys; None: the official one)."
)
_SUFFIXES = (".npz", ".keras", ".weights.h5")
_TIMM_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)  # read by the timm reader (which refuses the pickles unread)
_MAX_VALUES_PER_WEIGHT = 16  # checkpoint values per model weight: an Adam checkpoint holds 3, an in21k head on Ti ~2


def _read_npz(path, label, like=None):
    """The arrays of an official ``.npz``, its headers checked before anything is read: the file
    (``npz.array_headers``), its arrays against each other (``checks.check_consistent``) and, with ``like``,
    its size against that model."""
    def check(headers):
        checks.check_consistent({name: header.shape for name, header in headers.items()}, label)
        if like is not None:
            _check_size(headers, like, label)

    with _cache_hint(path):
        return read_npz(path, check=check)


@contextlib.contextmanager
def _cache_hint(path):
    """Adds to a ``ValueError`` about a file in the download cache that deleting it downloads it again."""
    try:
        yield
    except (CheckpointMismatchError, UnsupportedArchitectureError):
        raise
    except ValueError as error:
        if path is not None and download.is_cached(path):
            raise ValueError(
                f"{error} This is a file in the download cache: delete it (or move it aside) and retry, "
                "which downloads it again."
            ) from None
        raise


def is_timm_source(source):
    """Whether ``source`` is read by the timm reader: a Hub id, a folder (a Hub repository's files), a
    ``.safetensors`` file, or a PyTorch pickle (refused, unread)."""
    if hub.is_hub_id(source):
        return True
    if not isinstance(source, (str, os.PathLike)) or "://" in os.fspath(source):
        return False
    return Path(source).is_dir() or Path(source).suffix in _TIMM_SUFFIXES


def _read_timm(source, label, like=None, path=None):
    """A ``Source`` of a timm checkpoint (``timm.read_timm``), its size checked against ``like`` before reading."""
    def check(headers):
        if like is not None:
            _check_size(headers, like, label)

    with _cache_hint(path):
        checkpoint = read_timm(source, check=check, allow_nonfinite=True)  # ``read`` checks the values
    arguments = checkpoint.arguments
    grid = tuple(size // patch for size, patch in zip(arguments["image_size"], arguments["patch_size"]))
    return Source(checkpoint.arrays, checkpoint.label, grid, arguments, checkpoint.preprocessing)


def _check_size(headers, model, label):
    """Refuses, before reading, a file with far more values than ``model`` has weights: it is another model's."""
    values = sum(int(np.prod(header.shape, dtype=np.int64)) for header in headers.values())
    weights = sum(int(np.prod(weight.shape)) for weight in model.weights)
    nbytes = sum(header.nbytes for header in headers.values())
    if values <= _MAX_VALUES_PER_WEIGHT * weights or nbytes <= READ_ANYWAY_BYTES:
        return
    try:
        shapes = {name: tuple(variable.shape) for name, variable in official_weights(model).items()}
        summary = _summary(stand_ins({name: header.shape for name, header in headers.items()}), shapes)
    except ValueError:
        summary = None
    raise CheckpointMismatchError(
        label,
        summary=(f"{summary}; " if summary else "")
        + f"its arrays hold {values:,} values, {values / weights:.0f} times the model's {weights:,} weights, "
        "so it was not read",
    )


def _read_weights_h5(path, like, label):
    """The official arrays of a ``.weights.h5`` file, read through a twin of ``like`` (the file holds no architecture)."""
    twin = type(like).from_config(like.get_config())
    try:
        twin.load_weights(path)
    except ValueError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first = next((line for line in lines if line.startswith("Layer ")), lines[0] if lines else type(error).__name__)
        raise CheckpointMismatchError(
            label,
            summary=f"its weights are not those of this model's architecture (Keras: {first})",
            advice="A .weights.h5 file holds no architecture: load it into a model built exactly as the one that "
            "saved it (the same builder arguments), or have that model saved as .keras, which carries it.",
        ) from None
    return official_arrays(twin)


def read(source, model_name=None, image_size=None, like=None, allow_nonfinite=False):
    """Reads a weights source into a ``Source``.

    ``source``: a family of ``registry.FAMILIES`` (needs ``model_name`` and
    ``image_size`` to pick the file), an URL, or a path to an official
    ``.npz``, a ``.keras`` model or a ``.weights.h5`` file (needs ``like``,
    a model of the file's architecture, since the file holds none), or a timm checkpoint: a Hugging Face Hub
    folder (``model.safetensors`` + ``config.json``), a ``.safetensors`` file beside its ``config.json``, an id
    ``hf-hub:timm/<architecture>.<tag>`` (``keras_vit.pretrained.timm.read_timm``); a PyTorch pickle
    (``pytorch_model.bin``, ``.pth``) is refused unread, by path or URL. With
    ``like``, an ``.npz`` or ``.safetensors`` file far larger than that model is refused before it is
    read. Arrays a model reads (``names.model_arrays``: not optimizer state, not the text tower of a two-tower
    file) with NaN or infinite values are a ``ValueError`` naming them unless ``allow_nonfinite=True``.
    """
    result = _read(source, model_name, image_size, like)
    if not allow_nonfinite:
        checks.check_finite(model_arrays(result.arrays), result.label)
    return result


def _read(source, model_name, image_size, like):
    """``read`` without the check of the values."""
    if isinstance(source, str) and source in registry.FAMILIES:
        if model_name is None:
            raise ValueError(
                f"A weights family ({source!r}) needs a model of an official variant (e.g. ViT-B_16, "
                "keras_vit.list_models()); this model's geometry is none of them: pass a file path or URL instead."
            )
        entry = registry.resolve(model_name, source, image_size)
        if hub.is_hub_id(entry.url):
            return _read_timm(entry.url, entry.url, like)
        path = download.fetch(entry.url, entry.sha256)
        return Source(_read_npz(path, entry.url, like), entry.url, None)
    if is_timm_source(source):
        return _read_timm(source, str(source), like)
    source = os.fspath(source)
    if "://" in source and urllib.parse.urlsplit(source).path.endswith(PICKLE_SUFFIXES):
        refuse_pickle(urllib.parse.urlsplit(source).path)  # by its name, before downloading it
    path = download.fetch(source) if "://" in source else Path(source)
    if path.suffix in _TIMM_SUFFIXES:  # a downloaded .safetensors file
        return _read_timm(path, source, like, path)
    kind = download.file_suffix(Path(path).name)
    if kind not in _SUFFIXES and path.is_file():
        return Source(_read_npz(path, source, like), source, None)  # says what the file is when it is not an .npz
    if kind not in _SUFFIXES:
        raise ValueError(
            f"Unknown weights {source!r}: give a weights family ({', '.join(registry.FAMILIES)}), "
            "an official .npz, a Keras .keras or .weights.h5 file, a timm checkpoint (a Hugging Face Hub folder, a "
            ".safetensors file or hf-hub:timm/<architecture>.<tag>), or an URL of a file."
        )
    if not path.exists():
        raise FileNotFoundError(f"Weights file {path} does not exist.")
    if kind == ".npz":
        return Source(_read_npz(path, source, like), source, None)
    if kind == ".keras":
        return model_source(keras.models.load_model(path), source)
    if like is None:
        raise ValueError(f"{source} is a .weights.h5 file, which holds no architecture: load it into a model.")
    return Source(_read_weights_h5(path, like, source), source, _grid(like))


def _grid(model):
    """The grid of a model's learned position-embedding table (its native grid for a model of any size)."""
    return model.architecture.posemb_grid if isinstance(model, VisionTransformer) else None


def model_source(model, label):
    """A ``Source`` of a keras_vit model's own weights (the grid of its table known even when it is rectangular)."""
    return Source(official_arrays(model), label, _grid(model))


def architecture_of(model):
    """The ``Architecture`` of a keras_vit model; read off the weights of a plain functional model saved before
    ``VisionTransformer`` existed."""
    if isinstance(model, VisionTransformer):
        return model.architecture
    return architecture(infer_config(official_arrays(model)), image_size=tuple(model.input.shape[1:3]))


def _summary(arrays, shapes):
    """What the file and the model are, when their architectures differ (for a mismatch message)."""
    try:
        return architecture_summary(infer_config(arrays), infer_config(stand_ins(shapes)))
    except (ValueError, KeyError):
        return None


def assign(model, source, adapt=True):
    """Assigns ``source`` (a ``Source``) to ``model``, through ``adapt`` first when ``adapt=True``.

    Strict: every model weight not kept by ``adapt`` gets an array and every
    array is used, with equal shapes; otherwise a ``CheckpointMismatchError``
    says what the file and the model are, and nothing is assigned. Each
    adaptation is logged once after success. A model quantized to integer codes (int8, int4) gets them through
    its float twin: the arrays are assigned to ``dequantized_copy(model)``, which is quantized as ``model`` is
    (``quantize_like``), and its weights are copied. Returns ``model``.
    """
    if holds_codes(model):
        twin = dequantized_copy(as_vision_transformer(model, "Loading weights into a quantized model"))
        assign(twin, source, adapt)
        quantize_like(twin, model)
        weights = {weight.path: weight for weight in twin.weights}
        for weight in model.weights:
            if weight.path in weights:  # LoRA factors of the model (not in the twin) stay
                weight.assign(weights[weight.path])
        return model
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


def load_weights(model, source, adapt=True, allow_nonfinite=False):
    """Loads ``source`` into ``model``: read -> adapt -> assign.

    ``source``: a weights family (the model's name picks the file), an URL,
    an official ``.npz``, a ``.keras`` or a ``.weights.h5`` file, or a timm checkpoint (a Hugging Face Hub
    folder, a ``.safetensors`` file, ``hf-hub:timm/<architecture>.<tag>``). With
    ``adapt=True`` (the default) a different head, a missing top, another
    resolution, patch size or number of input channels are adapted (see
    ``keras_vit.pretrained.adapt.adapt``); ``adapt=False`` is strict. Arrays
    with NaN or infinite values are refused unless ``allow_nonfinite=True``.
    Returns ``model``.
    """
    image_size = tuple(model.input.shape[1:3])
    variant = model.vit_config["variant"] if isinstance(model, VisionTransformer) else model.name
    source = read(source, variant, image_size, like=model, allow_nonfinite=allow_nonfinite)
    _check_computation(source, architecture_of(model))
    return assign(model, source, adapt=adapt)


_COMPUTATION = ("gelu", "layer_norm_epsilon")  # what a timm file's config states and no array shows


def _check_computation(source, arch):
    """Refuses (``CheckpointMismatchError``) a file whose config computes otherwise than the model in what its
    arrays cannot show (the GELU form, the norm epsilon): the weights would load and give other outputs."""
    stated = source.config or {}
    differing = [key for key in _COMPUTATION if key in stated and stated[key] != getattr(arch, key)]
    if differing:
        raise CheckpointMismatchError(
            source.label,
            summary="its config computes " + ", ".join(f"{key}={stated[key]!r}" for key in differing)
            + ", the model " + ", ".join(f"{key}={getattr(arch, key)!r}" for key in differing),
            advice="Build the model from the file (keras_vit.from_official_checkpoint(source)), or pass "
            + ", ".join(f"{key}={stated[key]!r}" for key in differing) + " to its constructor.",
        )
