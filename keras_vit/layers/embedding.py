"""Patch and position embeddings: ``Patches``, learned ``AddPositionEmbs`` and fixed ``SinCos2DPositionEmbs``.

Shapes: B = batch, H x W = image (or a hybrid's feature map), C = channels, (gh, gw) = token grid,
P = prefix tokens that have a position embedding row (the official class token), D = hidden size.
"""

import keras
import numpy as np
from keras import ops

from keras_vit.layers.common import PACKAGE, to_pair


@keras.saving.register_keras_serializable(package=PACKAGE)
class Patches(keras.layers.Layer):
    """Patch embedding: (B, H, W, C) -> (B, gh * gw, D), row-major grid order.

    A convolution with kernel = stride = patch size, VALID padding and a bias,
    as the official ``embedding`` conv; its output grid (B, gh, gw, D) is then
    flattened row by row. Rectangular images and patches are allowed; an image
    side that is not a multiple of the patch side is a ``ValueError``.
    """

    def __init__(self, patch_size, hidden_size, kernel_initializer="lecun_normal", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        self.patch_size = to_pair(patch_size, "patch size")
        self.hidden_size = hidden_size
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
        return {"kernel": self.projection.kernel, "bias": self.projection.bias}

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
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class AddPositionEmbs(keras.layers.Layer):
    """Adds learnable 1-D position embeddings (1, P + gh * gw, D), normal(std 0.02) init: (B, T, D) -> (B, T, D).

    The official models add them after the class token is prepended (P = 1: the class token has a row);
    big_vision's add them to the grid tokens only (P = 0), before any prefix token.
    """

    def __init__(self, initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.initializer = keras.initializers.get(initializer or keras.initializers.RandomNormal(stddev=0.02))

    def build(self, input_shape):
        if input_shape[1] is None:
            raise ValueError("AddPositionEmbs needs a known number of tokens: give the model a fixed image size.")
        self.pos_embedding = self.add_weight(
            name="pos_embedding", shape=(1, input_shape[1], input_shape[2]), initializer=self.initializer
        )

    def official_weights(self):
        return {"pos_embedding": self.pos_embedding}

    def call(self, tokens):
        return tokens + ops.cast(self.pos_embedding, tokens.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(initializer=keras.initializers.serialize(self.initializer))
        return config


def sincos_2d(grid, width, temperature=10_000.0):
    """big_vision's ``posemb_sincos_2d``: (1, gh * gw, width) float32, ``width`` a multiple of 4.

    For the grid cell at row y, column x (row-major), with q = width / 4 and omega_k = temperature^(-k / (q - 1)):
    the channels are [sin(x omega), cos(x omega), sin(y omega), cos(y omega)].
    """
    if width % 4:
        raise ValueError(f"Sin-cos position embeddings need a hidden size that is a multiple of 4, got {width}.")
    quarter = width // 4
    omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float32) / max(quarter - 1, 1))
    y, x = np.mgrid[: grid[0], : grid[1]].astype(np.float32)
    x = np.einsum("m,d->md", x.ravel(), omega)
    y = np.einsum("m,d->md", y.ravel(), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(np.float32)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SinCos2DPositionEmbs(keras.layers.Layer):
    """Adds fixed 2-D sin-cos position embeddings (``sincos_2d``) to grid tokens: (B, gh * gw, D) -> same.

    Computed, not stored (no weights); ``grid`` is the token grid (gh, gw). Added before any prefix token.
    """

    def __init__(self, grid, temperature=10_000.0, **kwargs):
        super().__init__(**kwargs)
        self.grid = to_pair(grid, "token grid")
        self.temperature = temperature

    def build(self, input_shape):
        tokens, self.width = input_shape[1], input_shape[2]
        if tokens is not None and tokens != self.grid[0] * self.grid[1]:
            raise ValueError(f"{tokens} tokens do not form the {self.grid[0]}x{self.grid[1]} grid of this layer.")

    def table(self):
        """The embeddings (1, gh * gw, D) float32 NumPy."""
        return sincos_2d(self.grid, self.width, self.temperature)

    def call(self, tokens):
        return tokens + ops.cast(self.table(), tokens.dtype)

    def get_config(self):
        config = super().get_config()
        config.update(grid=self.grid, temperature=self.temperature)
        return config


def position_embedding(kind, grid, dtype, name="posembed_input"):
    """The position-embedding layer of ``kind`` ("learn" or "sincos2d") for the token ``grid`` (gh, gw)."""
    if kind == "learn":
        return AddPositionEmbs(dtype=dtype, name=name)
    return SinCos2DPositionEmbs(grid, dtype=dtype, name=name)
