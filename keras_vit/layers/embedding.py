"""Patch and position embeddings: ``Patches``, learned ``AddPositionEmbs`` and fixed ``SinCos2DPositionEmbs``,
and ``PadToMultiple`` for inputs of any size.

``POSEMBS`` is the registry of position embeddings: a kind is one layer and one line, ``kind: PosembKind(build,
learned, check)`` with ``build(architecture, dtype=..., name=...)``, ``learned`` whether it holds a table (weights
in checkpoints, rows for prefix tokens) and ``check(architecture)`` raising for a geometry it cannot embed. A
position-embedding layer answers ``grid_embeddings()``: the (gh * gw, D) embeddings of its native grid.

A position-embedding layer called with the patch embedding's input as its second argument (``layer(tokens,
pixels)``) takes the token grid from it at every call, so one model takes inputs of any size: the learned table
keeps its native grid and is resampled to the call's grid in the graph, with the official interpolation
(``resize_grid``); the fixed table is computed for it.

Shapes: B = batch, H x W = image (or a hybrid's feature map), C = channels, (gh, gw) = token grid,
P = prefix tokens that have a position embedding row (the official class token), D = hidden size.
"""

import collections

import keras
import numpy as np
from keras import ops

from keras_vit.arguments import ArgumentError
from keras_vit.layers.common import PACKAGE, official_weights, to_pair


@keras.saving.register_keras_serializable(package=PACKAGE)
class Patches(keras.layers.Layer):
    """Patch embedding: (B, H, W, C) -> (B, gh * gw, D), row-major grid order.

    A convolution with kernel = stride = patch size, VALID padding and a bias (none with ``use_bias=False``,
    as timm's pre-norm CLIP models), as the official ``embedding`` conv; its output grid (B, gh, gw, D) is then
    flattened row by row. Rectangular images and patches are allowed; an image
    side that is not a multiple of the patch side is a ``ValueError``.
    """

    def __init__(self, patch_size, hidden_size, kernel_initializer="lecun_normal", bias_initializer="zeros",
                 use_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = to_pair(patch_size, "patch size")
        self.hidden_size = hidden_size
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.projection = keras.layers.Conv2D(
            hidden_size,
            self.patch_size,
            strides=self.patch_size,
            padding="valid",
            data_format="channels_last",
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            use_bias=use_bias,
            dtype=self.dtype_policy,
            name="projection",
        )

    def build(self, input_shape):
        for axis, side in ((1, "height"), (2, "width")):
            size, patch = input_shape[axis], self.patch_size[axis - 1]
            if size is not None and size % patch:
                raise ValueError(
                    f"Image {side} {size} is not divisible by the patch {side} {patch}: "
                    f"use an image {side} that is a multiple of {patch} "
                    f"(for example {max(size // patch, 1) * patch} or {(size // patch + 1) * patch})."
                )
        self.projection.build(input_shape)

    @property
    def kernel(self):
        """Patch-embedding kernel, (ph, pw, C, D) (HWIO, the official layout)."""
        return self.projection.kernel

    @property
    def bias(self):
        return self.projection.bias

    def official_weights(self):
        return official_weights(self.projection)

    def call(self, images):
        grid = self.projection(images)
        gh, gw = grid.shape[1], grid.shape[2]
        if gh is None or gw is None:
            shape = ops.shape(grid)
            return ops.reshape(grid, (shape[0], shape[1] * shape[2], self.hidden_size))
        return ops.reshape(grid, (-1, gh * gw, self.hidden_size))

    def compute_output_shape(self, input_shape):
        batch, h, w, _ = input_shape
        tokens = None if h is None or w is None else (h // self.patch_size[0]) * (w // self.patch_size[1])
        return (batch, tokens, self.hidden_size)

    def get_config(self):
        config = super().get_config()
        config.update(
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            use_bias=self.use_bias,
        )
        return config


def _interpolation_matrix(new, old):
    """(new, old) weights of linear interpolation with aligned corners (scipy.ndimage.zoom(order=1)'s rule):
    output i reads input position i * (old - 1) / (new - 1); ``new`` may be a tensor."""
    new_f = ops.cast(new, "float32")
    step = ops.where(new_f > 1, (old - 1) / ops.maximum(new_f - 1, 1.0), 0.0)
    positions = ops.arange(new, dtype="float32") * step
    low = ops.clip(ops.floor(positions), 0, old - 1)
    fraction = positions - low
    high = ops.minimum(low + 1, old - 1)
    low, high = ops.cast(low, "int32"), ops.cast(high, "int32")
    return ops.one_hot(low, old) * (1.0 - fraction)[:, None] + ops.one_hot(high, old) * fraction[:, None]


def _cubic(x, a=-0.5):
    x = ops.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return ops.where(x < 1.0, near, ops.where(x < 2.0, far, 0.0))


def _antialiased_bicubic_matrix(new, old):
    """(new, old) weights of PyTorch's antialiased bicubic resize (timm's ``resample_abs_pos_embed``; the NumPy
    reference is ``keras_vit.pretrained.resample.antialiased_resize_matrix``); ``new`` may be a tensor."""
    scale = old / ops.cast(new, "float32")
    stretch = ops.maximum(scale, 1.0)
    support = 2.0 * stretch
    centres = (ops.arange(new, dtype="float32") + 0.5) * scale
    low = ops.maximum(ops.floor(centres - support + 0.5), 0.0)  # = PyTorch's truncation, clipped at 0
    high = ops.minimum(ops.floor(centres + support + 0.5), float(old))
    j = ops.arange(old, dtype="float32")[None, :]
    inside = ops.logical_and(j >= low[:, None], j < high[:, None])
    weights = ops.where(inside, _cubic((j + 0.5 - centres[:, None]) / stretch), 0.0)
    return weights / ops.sum(weights, axis=1, keepdims=True)


# How a learned table is resampled to another grid: (new, old) matrix of each axis.
POSEMB_INTERPOLATIONS = {"bilinear": _interpolation_matrix, "bicubic": _antialiased_bicubic_matrix}


def resize_grid(table, source_grid, target_grid, interpolation="bilinear"):
    """Resize of grid embeddings (gh * gw, D) to ``target_grid`` (th * tw, D), row-major grids.

    ``"bilinear"``: with aligned corners, the official loader's interpolation (``keras_vit.interpolate_posemb``,
    NumPy in float64); ``"bicubic"``: timm's ``resample_abs_pos_embed`` (PyTorch's antialiased bicubic). In the
    graph, in float32; ``target_grid`` may hold tensors.
    """
    grid = ops.reshape(ops.cast(table, "float32"), (source_grid[0], source_grid[1], -1))
    matrix = POSEMB_INTERPOLATIONS[interpolation]
    rows = matrix(target_grid[0], source_grid[0])
    columns = matrix(target_grid[1], source_grid[1])
    resized = ops.einsum("ih,hwd,jw->ijd", rows, grid, columns)
    return ops.reshape(resized, (-1, table.shape[-1]))


def _token_grid(pixels, patch_size):
    """The token grid (gh, gw) of the patch embedding's input ``pixels``: ints when static, else tensors."""
    return tuple(size // patch for size, patch in zip(ops.shape(pixels)[1:3], patch_size))


@keras.saving.register_keras_serializable(package=PACKAGE)
class AddPositionEmbs(keras.layers.Layer):
    """Adds learnable 1-D position embeddings (1, P + gh * gw, D), normal(std 0.02) init: (B, T, D) -> (B, T, D).

    The official models add them after the class token is prepended (P = 1: the class token has a row);
    big_vision's add them to the grid tokens only (P = 0), before any prefix token. With ``grid`` (the table's
    native (gh, gw)) and ``patch_size``, ``layer(tokens, pixels)`` resamples the grid rows to the grid of
    ``pixels`` (the patch embedding's input) when it differs; the prefix rows stay.
    """

    def __init__(self, initializer=None, grid=None, patch_size=None, num_prefix_tokens=0, interpolation="bilinear",
                 **kwargs):
        super().__init__(**kwargs)
        self.interpolation = interpolation
        self.initializer = keras.initializers.get(initializer or keras.initializers.RandomNormal(stddev=0.02))
        self.grid = None if grid is None else to_pair(grid, "position-embedding grid")
        self.patch_size = None if patch_size is None else to_pair(patch_size, "patch size")
        self.num_prefix_tokens = num_prefix_tokens

    def build(self, tokens_shape, pixels_shape=None):
        if self.grid is not None:
            rows = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        elif tokens_shape[1] is None:
            raise ValueError("AddPositionEmbs needs a known number of tokens: give the model a fixed image size.")
        else:
            rows = tokens_shape[1]
        self.pos_embedding = self.add_weight(
            name="pos_embedding", shape=(1, rows, tokens_shape[2]), initializer=self.initializer
        )

    def official_weights(self):
        return {"pos_embedding": self.pos_embedding}

    def grid_embeddings(self):
        """The table's grid rows, (gh * gw, D) float32 NumPy."""
        return np.asarray(ops.convert_to_numpy(self.pos_embedding)[0, self.num_prefix_tokens :], np.float32)

    def call(self, tokens, pixels=None):
        table = self.pos_embedding
        if pixels is None or self.grid is None:
            return tokens + ops.cast(table, tokens.dtype)
        target = _token_grid(pixels, self.patch_size)

        def resampled():
            prefix = self.num_prefix_tokens
            grid = resize_grid(table[0, prefix:], self.grid, target, self.interpolation)
            return ops.concatenate([ops.cast(table[0, :prefix], "float32"), grid], axis=0)[None]

        if all(isinstance(side, int) for side in target):  # a known grid: resample only another one than the table's
            table = table if target == self.grid else resampled()
        else:  # known at run time only (a graph traced for any size)
            native = ops.logical_and(ops.equal(target[0], self.grid[0]), ops.equal(target[1], self.grid[1]))
            table = ops.cond(native, lambda: ops.cast(table, "float32"), resampled)
        return tokens + ops.cast(table, tokens.dtype)

    def compute_output_spec(self, tokens, pixels=None):
        return keras.KerasTensor(tokens.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(initializer=keras.initializers.serialize(self.initializer))
        if self.grid is not None:
            config.update(grid=self.grid, patch_size=self.patch_size, num_prefix_tokens=self.num_prefix_tokens,
                          interpolation=self.interpolation)
        return config


def sincos_2d(grid, width, temperature=10_000.0):
    """big_vision's ``posemb_sincos_2d``: (1, gh * gw, width) float32, ``width`` a multiple of 4.

    For the grid cell at row y, column x (row-major), with q = width / 4 and omega_k = temperature^(-k / (q - 1)):
    the channels are [sin(x omega), cos(x omega), sin(y omega), cos(y omega)]. ``grid`` may hold tensors (then the
    result is a tensor).
    """
    if width % 4:
        raise ArgumentError("width", width, "a multiple of 4",
                            f"Sin-cos position embeddings need a hidden size that is a multiple of 4, got {width}.")
    quarter = width // 4
    omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float32) / max(quarter - 1, 1))
    if all(isinstance(side, int) for side in grid):
        y, x = np.mgrid[: grid[0], : grid[1]].astype(np.float32)
        x = np.einsum("m,d->md", x.ravel(), omega)
        y = np.einsum("m,d->md", y.ravel(), omega)
        return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)
    rows = ops.arange(grid[0], dtype="float32")
    columns = ops.arange(grid[1], dtype="float32")
    y = ops.reshape(ops.broadcast_to(rows[:, None], (grid[0], grid[1])), (-1,))[:, None] * omega
    x = ops.reshape(ops.broadcast_to(columns[None, :], (grid[0], grid[1])), (-1,))[:, None] * omega
    return ops.concatenate([ops.sin(x), ops.cos(x), ops.sin(y), ops.cos(y)], axis=1)[None]


@keras.saving.register_keras_serializable(package=PACKAGE)
class SinCos2DPositionEmbs(keras.layers.Layer):
    """Adds fixed 2-D sin-cos position embeddings (``sincos_2d``) to grid tokens: (B, gh * gw, D) -> same.

    Computed, not stored (no weights); ``grid`` is the native token grid (gh, gw). Added before any prefix
    token. With ``patch_size``, ``layer(tokens, pixels)`` computes them for the grid of ``pixels``.
    """

    def __init__(self, grid, temperature=10_000.0, patch_size=None, **kwargs):
        super().__init__(**kwargs)
        self.grid = to_pair(grid, "token grid")
        self.temperature = temperature
        self.patch_size = None if patch_size is None else to_pair(patch_size, "patch size")

    def build(self, tokens_shape, pixels_shape=None):
        tokens, self.width = tokens_shape[1], tokens_shape[2]
        if pixels_shape is None and tokens is not None and tokens != self.grid[0] * self.grid[1]:
            raise ValueError(f"{tokens} tokens do not form the {self.grid[0]}x{self.grid[1]} grid of this layer.")

    def table(self):
        """The embeddings (1, gh * gw, D) of the native grid, float32 NumPy."""
        return sincos_2d(self.grid, self.width, self.temperature)

    def grid_embeddings(self):
        """The embeddings of the native grid, (gh * gw, D) float32 NumPy."""
        return self.table()[0]

    def call(self, tokens, pixels=None):
        grid = self.grid if pixels is None or self.patch_size is None else _token_grid(pixels, self.patch_size)
        return tokens + ops.cast(sincos_2d(grid, self.width, self.temperature), tokens.dtype)

    def compute_output_spec(self, tokens, pixels=None):
        return keras.KerasTensor(tokens.shape, dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(grid=self.grid, temperature=self.temperature, patch_size=self.patch_size)
        return config


def _check_sincos(arch):
    if arch.hidden_size % 4:
        raise ArgumentError("hidden_size", arch.hidden_size, "a multiple of 4 with posemb='sincos2d'",
                            f"posemb='sincos2d' needs a hidden_size that is a multiple of 4, got {arch.hidden_size}.")


PosembKind = collections.namedtuple("PosembKind", "build learned check")
POSEMBS = {
    "learn": PosembKind(lambda arch, **kw: AddPositionEmbs(grid=arch.posemb_grid, patch_size=arch.patch_size,
                                                           num_prefix_tokens=arch.posemb_prefix_rows,
                                                           interpolation=arch.posemb_interpolation, **kw),
                        learned=True, check=None),
    "sincos2d": PosembKind(lambda arch, **kw: SinCos2DPositionEmbs(arch.posemb_grid, patch_size=arch.patch_size, **kw),
                           learned=False, check=_check_sincos),
}


def position_embedding(arch, dtype, name="posembed_input"):
    """The position-embedding layer ``arch`` describes (its ``POSEMBS`` kind, laid out for its native grid)."""
    return POSEMBS[arch.posemb].build(arch, dtype=dtype, name=name)


@keras.saving.register_keras_serializable(package=PACKAGE)
class PadToMultiple(keras.layers.Layer):
    """Pads images with zeros at the bottom and right to multiples of ``multiple`` (h, w): (B, H, W, C) ->
    (B, ceil(H / h) h, ceil(W / w) w, C). timm's ``dynamic_img_pad``; zeros are mid-grey in [-1, 1]."""

    def __init__(self, multiple, **kwargs):
        super().__init__(**kwargs)
        self.multiple = to_pair(multiple, "multiple")

    def call(self, images):
        batch, height, width = ops.shape(images)[:3]
        # (step - size % step) % step, not (-size) % step: ONNX's Mod of a negative size is not Python's
        pads = [(0, (step - size % step) % step) for size, step in zip((height, width), self.multiple)]
        padded = ops.pad(images, [(0, 0), *pads, (0, 0)])
        # the channels stay static (a padding known only at run time loses them in TensorFlow; TFLite needs them)
        return ops.reshape(padded, (batch, *ops.shape(padded)[1:3], images.shape[-1]))

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        sides = [None if size is None else -(-size // step) * step for size, step in zip((height, width), self.multiple)]
        return (batch, *sides, channels)

    def get_config(self):
        config = super().get_config()
        config.update(multiple=self.multiple)
        return config
