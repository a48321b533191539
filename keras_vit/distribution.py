"""Layouts of a ViT's variables on a ``keras.distribution.DeviceMesh``: data parallel, FSDP and tensor parallel.

``layout_map(model_or_architecture, mesh, strategy)`` is a ``keras.distribution.LayoutMap`` with one entry per
variable, keyed by its exact ``variable.path`` (Keras 3.15 looks a path up as it is before trying keys as
patterns); ``keras.distribution.ModelParallel(layout_map=...)`` then creates every variable with its layout, and
the optimizer's slots (momentum, Adam's moments, EMA averages) take the layout of their variable. The strategies:

* ``"data"``: every variable replicated (``keras.distribution.DataParallel``'s layout, written out);
* ``"fsdp"``: big_vision's ``fsdp`` rule (``big_vision/sharding.py``): a variable of more than
  ``min_shard_bytes`` (default 4 MiB, big_vision's ``min_size_to_shard_mb=4``) is split along its largest
  dimension that the mesh axis divides (of equal dimensions, the last), the others replicated. The axis is the
  mesh's first (the batch axis: data and weights share it, as big_vision's ``fsdp(axis="data")``);
* ``"tensor"``: Megatron-style on the ``model`` axis: the attention's ``query``/``key``/``value`` kernels
  (D, N, dh) and biases (N, dh) split by heads, ``out`` (N, dh, D) by rows (its input heads); the MLP's
  ``Dense_0`` (D, M) by columns with its bias, ``Dense_1`` (M, D) by rows; in every encoder block and in a MAP
  head. Everything else (embeddings, norms, head, a hybrid's ResNet) is replicated. The batch is split on the
  mesh's other axis.

``model_parallel(mesh, strategy)`` is the distribution that lays out each variable by the same rule as it is
created, for code that builds a model whose architecture is known only once built (a weights file decides it).

The rule is ``variable_layout``; ``variable_shapes(architecture)`` lists the variables an ``Architecture``'s
model has (path -> shape) without building it. Nothing here sets ``keras.distribution``: the caller (an
application, a script) does.
"""

import math
import re

import keras
import numpy as np

from keras_vit.architecture import Architecture
from keras_vit.layers.tokens import PREFIX_TOKENS

STRATEGIES = ("data", "fsdp", "tensor")
MIN_SHARD_BYTES = 4 * 2**20  # big_vision's min_size_to_shard_mb=4: a variable of at most this stays whole
TENSOR_AXIS = "model"

_ATTENTION = r"(?:^|/)MultiHeadDotProductAttention_\d+/"
_MLP = r"(?:^|/)(?:encoderblock_\d+|pool)/"
# (path pattern, the dimension split on the tensor axis, or None for a replicated variable of that kind)
_TENSOR_SPLITS = (
    (re.compile(_ATTENTION + r"(?:query|key|value)/kernel$"), 1),  # (D, N, dh): heads
    (re.compile(_ATTENTION + r"(?:query|key|value)/bias$"), 0),  # (N, dh): heads
    (re.compile(_ATTENTION + r"out/kernel$"), 0),  # (N, dh, D): the input heads (rows)
    (re.compile(_MLP + r"Dense_0/kernel$"), 1),  # (D, M): columns
    (re.compile(_MLP + r"Dense_0/bias$"), 0),  # (M,)
    (re.compile(_MLP + r"Dense_1/kernel$"), 0),  # (M, D): rows
)
# The variable names of the prefix-token layers (their layer names are PREFIX_TOKENS' official names).
_PREFIX_VARIABLES = {"class": "cls", "register": "registers"}


def _check_strategy(strategy):
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")


def _axis_size(mesh, axis):
    if axis not in mesh.axis_names:
        raise ValueError(
            f"The mesh has no axis {axis!r} (its axes: {tuple(mesh.axis_names)}): name a mesh axis, e.g. "
            f"keras.distribution.DeviceMesh((1, n), ('batch', '{TENSOR_AXIS}')) for tensor parallelism."
        )
    return mesh.shape[list(mesh.axis_names).index(axis)]


def default_axis(mesh, strategy):
    """The mesh axis a strategy splits variables on: ``"model"`` for tensor, else the mesh's first (batch) axis."""
    return TENSOR_AXIS if strategy == "tensor" else mesh.axis_names[0]


def batch_axis(mesh, strategy, axis=None):
    """The mesh axis the batch is split on: the first axis, or under tensor parallelism the first other axis."""
    if strategy != "tensor":
        return mesh.axis_names[0]
    axis = axis or TENSOR_AXIS
    others = [name for name in mesh.axis_names if name != axis]
    if not others:
        raise ValueError(
            f"Tensor parallelism on {axis!r} needs a batch axis beside it: use a mesh of shape (batches, n) with "
            f"axis_names ('batch', '{axis}') (batches may be 1)."
        )
    return others[0]


def variable_layout(path, shape, mesh, strategy, axis=None, itemsize=4, min_shard_bytes=MIN_SHARD_BYTES):
    """The layout (a tuple of mesh axis names or None, one per dimension) of the variable ``path`` of ``shape``.

    See the module docstring for the strategies; ``axis`` is the mesh axis variables are split on (default
    ``default_axis``), ``itemsize`` the bytes of one element. A tensor-parallel split that the axis does not
    divide is a ``ValueError`` naming the variable.
    """
    _check_strategy(strategy)
    shape = tuple(int(side) for side in shape)
    replicated = (None,) * len(shape)
    axis = axis or default_axis(mesh, strategy)
    size = _axis_size(mesh, axis)
    if strategy == "data":
        return replicated
    if strategy == "fsdp":
        if math.prod(shape) * itemsize <= min_shard_bytes:
            return replicated
        for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
            if shape[dim] % size == 0:
                return tuple(axis if d == dim else None for d in range(len(shape)))
        return replicated
    dim = next((dim for pattern, dim in _TENSOR_SPLITS if pattern.search(path)), None)
    if dim is None:
        return replicated
    if dim >= len(shape) or shape[dim] % size:
        raise ValueError(
            f"Tensor parallelism cannot split {path} {shape} along dimension {dim} into {size} parts (mesh axis "
            f"{axis!r}): choose a {axis!r} axis size that divides the number of heads and the MLP size."
        )
    return tuple(axis if d == dim else None for d in range(len(shape)))


def variable_shapes(architecture):
    """``{variable path: shape}`` of the model ``architecture`` describes, as ``model.variables`` has them.

    Dropout's random-number generator states (int32 (2,), numbered process-wide) are left out.
    """
    arch = architecture
    hidden, heads, mlp = arch.hidden_size, arch.num_heads, arch.mlp_dim
    shapes = {}

    def norm(name, width):
        shapes.update({f"{name}/gamma": (width,), f"{name}/beta": (width,)})

    def dense(name, fan_in, fan_out):
        shapes.update({f"{name}/kernel": (fan_in, fan_out), f"{name}/bias": (fan_out,)})

    def attention(name):
        for projection in ("query", "key", "value"):
            shapes.update({f"{name}/{projection}/kernel": (hidden, heads, hidden // heads),
                           f"{name}/{projection}/bias": (heads, hidden // heads)})
        shapes.update({f"{name}/out/kernel": (heads, hidden // heads, hidden), f"{name}/out/bias": (hidden,)})

    channels = arch.channels
    if arch.resnet_layers is not None:
        width = int(64 * arch.resnet_width_factor)
        shapes["conv_root/kernel"] = (7, 7, channels, width)
        norm("gn_root", width)
        channels = width
        for stage, units in enumerate(arch.resnet_layers):
            inner = width * 2**stage
            for unit in range(units):
                scope = f"block{stage + 1}/unit{unit + 1}"
                if channels != 4 * inner or (stage > 0 and unit == 0):
                    shapes[f"{scope}/conv_proj/kernel"] = (1, 1, channels, 4 * inner)
                    norm(f"{scope}/gn_proj", 4 * inner)
                for conv, (kernel, fan_in, fan_out) in enumerate(
                    ((1, channels, inner), (3, inner, inner), (1, inner, 4 * inner)), start=1
                ):
                    shapes[f"{scope}/conv{conv}/kernel"] = (kernel, kernel, fan_in, fan_out)
                    norm(f"{scope}/gn{conv}", fan_out)
                channels = 4 * inner
    shapes["embedding/projection/kernel"] = (*arch.patch_size, channels, hidden)
    shapes["embedding/projection/bias"] = (hidden,)
    for kind, count in arch.prefix_tokens:
        shapes[f"{PREFIX_TOKENS[kind].official_name}/{_PREFIX_VARIABLES[kind]}"] = (1, count, hidden)
    if arch.posemb_shape is not None:
        shapes["posembed_input/pos_embedding"] = arch.posemb_shape
    for block in range(arch.num_layers):
        scope = f"encoderblock_{block}"
        norm(f"{scope}/LayerNorm_0", hidden)
        attention(f"{scope}/MultiHeadDotProductAttention_1")
        norm(f"{scope}/LayerNorm_2", hidden)
        dense(f"{scope}/Dense_0", hidden, mlp)
        dense(f"{scope}/Dense_1", mlp, hidden)
    norm("encoder_norm", hidden)
    features = hidden
    if arch.pooling == "map":
        shapes["pool/probe"] = (1, 1, hidden)
        attention("pool/MultiHeadDotProductAttention_0")
        norm("pool/LayerNorm_0", hidden)
        dense("pool/Dense_0", hidden, mlp)
        dense("pool/Dense_1", mlp, hidden)
    if arch.pooling is not None and arch.representation_size:
        dense("pre_logits", features, arch.representation_size)
        features = arch.representation_size
    if arch.pooling is not None and arch.classes:
        dense("head", features, arch.classes)
    return shapes


def _variables_of(model_or_architecture, dtype):
    """``{path: (shape, itemsize)}`` of a built model's variables or of an ``Architecture``'s (in ``dtype``)."""
    if isinstance(model_or_architecture, Architecture):
        itemsize = np.dtype(keras.backend.standardize_dtype(dtype)).itemsize
        return {path: (shape, itemsize) for path, shape in variable_shapes(model_or_architecture).items()}
    variables = getattr(model_or_architecture, "variables", None)
    if not variables:
        raise TypeError(
            "layout_map needs a built keras_vit model or a keras_vit.Architecture, got "
            f"{type(model_or_architecture).__name__}{' without variables' if variables == [] else ''}."
        )
    return {v.path: (tuple(v.shape), np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize) for v in variables}


def _check_mesh(mesh):
    if not isinstance(mesh, keras.distribution.DeviceMesh):
        raise TypeError(f"mesh must be a keras.distribution.DeviceMesh, got {type(mesh).__name__}.")


def layout_map(model_or_architecture, mesh, strategy, axis=None, min_shard_bytes=MIN_SHARD_BYTES, dtype="float32"):
    """A ``keras.distribution.LayoutMap`` on ``mesh`` with every variable's layout under ``strategy``.

    Args:
        model_or_architecture: a built keras_vit model (its ``variables`` are read, seed states and LoRA
            factors included) or a ``keras_vit.Architecture`` (``variable_shapes``; nothing is built).
        mesh: a ``keras.distribution.DeviceMesh``; for ``"tensor"`` with a ``"model"`` axis and a batch axis.
        strategy: ``"data"``, ``"fsdp"`` or ``"tensor"`` (module docstring).
        axis: the mesh axis variables are split on (default: the first axis; ``"model"`` for tensor).
        min_shard_bytes: FSDP leaves variables of at most this many bytes whole.
        dtype: the variables' dtype when an ``Architecture`` is given (a mixed policy's variables are float32).

    Keys are exact variable paths; a path the map does not hold (an optimizer's step counter) is replicated.
    """
    _check_mesh(mesh)
    _check_strategy(strategy)
    batch_axis(mesh, strategy, axis)
    layouts = keras.distribution.LayoutMap(mesh)
    for path, (shape, itemsize) in _variables_of(model_or_architecture, dtype).items():
        layouts[path] = variable_layout(path, shape, mesh, strategy, axis, itemsize, min_shard_bytes)
    return layouts


class _RuleDistribution(keras.distribution.ModelParallel):
    """``ModelParallel`` whose variables are laid out by ``variable_layout`` as they are created."""

    def __init__(self, mesh, strategy, axis, min_shard_bytes, auto_shard_dataset):
        super().__init__(layout_map=keras.distribution.LayoutMap(mesh), batch_dim_name=batch_axis(mesh, strategy, axis),
                         auto_shard_dataset=auto_shard_dataset)
        self.strategy, self.axis, self.min_shard_bytes = strategy, axis, min_shard_bytes

    def get_variable_layout(self, variable):
        # Keras asks only for a variable without a layout of its own (an optimizer slot has its variable's).
        itemsize = np.dtype(keras.backend.standardize_dtype(variable.dtype)).itemsize
        axes = variable_layout(variable.path, variable.shape, self.device_mesh, self.strategy, self.axis, itemsize,
                               self.min_shard_bytes)
        return keras.distribution.TensorLayout(axes, self.device_mesh)


def model_parallel(mesh, strategy, axis=None, min_shard_bytes=MIN_SHARD_BYTES, auto_shard_dataset=True):
    """A ``keras.distribution.ModelParallel`` on ``mesh`` that gives each variable, as it is created, the layout
    ``layout_map`` would give it (same arguments), and splits the batch on ``batch_axis``.

    Set it (``keras.distribution.set_distribution`` or its ``scope()``) before building the model; for a model
    whose architecture is known beforehand, ``ModelParallel(layout_map=layout_map(architecture, ...))`` is the
    same. ``auto_shard_dataset``: Keras' (a multi-process run whose pipeline is already per process sets False).
    """
    _check_mesh(mesh)
    _check_strategy(strategy)
    _axis_size(mesh, axis or default_axis(mesh, strategy))
    return _RuleDistribution(mesh, strategy, axis, min_shard_bytes, auto_shard_dataset)


def bytes_per_device(layouts, shapes, itemsize=4):
    """Bytes of the variables ``shapes`` (``{path: shape}``) that one device holds under ``layouts`` (a
    ``LayoutMap``): each variable's size divided by the sizes of the mesh axes its layout splits it on (a
    replicated variable counts whole)."""
    mesh = layouts.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    total = 0
    for path, shape in shapes.items():
        layout = layouts[path]
        parts = math.prod(sizes[a] for a in layout.axes if a is not None) if layout is not None else 1
        total += math.prod(shape) * itemsize // parts
    return total
