"""The ResNet stem of hybrid ViTs (BiT's ResNet: GroupNorm and weight-standardized convolutions).

The seed's hybrid feeds the Transformer with patches of a CNN feature map
(patch size 1x1 on the map). Root: 7x7 stride-2 ``StdConv2D`` (``conv_root``),
GroupNorm (``gn_root``), ReLU, 3x3 stride-2 max pool; then one
``ResNetStage`` per entry of ``resnet_layers`` (``block1``, ``block2``, ...).
Stage s has width ``64 * width_factor * 2**(s-1)`` and 4x that many output
channels; its first unit has stride 1 in stage 1 and 2 afterwards. All
padding is SAME with TensorFlow's rule (more after than before), which Keras'
``padding="same"`` follows. Shapes: B = batch, H x W = feature map, C = channels.
"""

import keras
from keras import ops

from keras_vit.layers.common import PACKAGE, official_weights, scoped

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPSILON = 1e-6
WEIGHT_STANDARDIZATION_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package=PACKAGE)
class StdConv2D(keras.layers.Conv2D):
    """Conv2D with weight standardization at every call, no bias: (B, H, W, C) -> (B, H', W', filters).

    For each output channel the stored kernel has its mean over (kh, kw, C)
    subtracted and is divided by its population standard deviation + 1e-5
    (epsilon added to the std, as the official code). The stored kernel stays
    the raw one, so official checkpoints load as they are.
    """

    def __init__(self, filters, kernel_size, strides=1, padding="same", use_bias=False, data_format="channels_last",
                 **kwargs):
        super().__init__(filters, kernel_size, strides=strides, padding=padding, use_bias=use_bias,
                         data_format=data_format, **kwargs)

    def convolution_op(self, inputs, kernel):
        kernel = ops.cast(kernel, "float32")
        mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
        std = ops.sqrt(ops.mean(ops.square(kernel - mean), axis=(0, 1, 2), keepdims=True))
        standardized = (kernel - mean) / (std + WEIGHT_STANDARDIZATION_EPSILON)
        return super().convolution_op(inputs, ops.cast(standardized, inputs.dtype))


def _group_norm(name, dtype):
    return keras.layers.GroupNormalization(
        groups=GROUP_NORM_GROUPS, epsilon=GROUP_NORM_EPSILON, dtype=dtype, name=name
    )


@keras.saving.register_keras_serializable(package=PACKAGE)
class BottleneckUnit(keras.layers.Layer):
    """Bottleneck unit of BiT's ResNet: (B, H, W, C) -> (B, H/stride, W/stride, 4 * width).

    ``relu(shortcut + GN3(conv3(relu(GN2(conv2(relu(GN1(conv1(x)))))))))`` with
    conv1 1x1, conv2 3x3 carrying the stride, conv3 1x1; the shortcut is ``x``
    or, when channels or stride change, ``gn_proj(conv_proj(x))`` (1x1, strided).
    """

    def __init__(self, width, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.strides = strides
        policy = self.dtype_policy
        self.conv1 = StdConv2D(width, 1, dtype=policy, name="conv1")
        self.gn1 = _group_norm("gn1", policy)
        self.conv2 = StdConv2D(width, 3, strides=strides, dtype=policy, name="conv2")
        self.gn2 = _group_norm("gn2", policy)
        self.conv3 = StdConv2D(4 * width, 1, dtype=policy, name="conv3")
        self.gn3 = _group_norm("gn3", policy)
        self.conv_proj = None
        self.gn_proj = None

    def build(self, input_shape):
        if input_shape[-1] != 4 * self.width or self.strides != 1:
            self.conv_proj = StdConv2D(4 * self.width, 1, strides=self.strides, dtype=self.dtype_policy, name="conv_proj")
            self.gn_proj = _group_norm("gn_proj", self.dtype_policy)
            self.conv_proj.build(input_shape)
            self.gn_proj.build(self.conv_proj.compute_output_shape(input_shape))
        self.conv1.build(input_shape)
        inner = self.conv1.compute_output_shape(input_shape)
        self.gn1.build(inner)
        self.conv2.build(inner)
        inner = self.conv2.compute_output_shape(inner)
        self.gn2.build(inner)
        self.conv3.build(inner)
        self.gn3.build(self.conv3.compute_output_shape(inner))

    def call(self, x):
        shortcut = x if self.conv_proj is None else self.gn_proj(self.conv_proj(x))
        y = ops.relu(self.gn1(self.conv1(x)))
        y = ops.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return ops.relu(shortcut + y)

    def compute_output_shape(self, input_shape):
        return self.conv3.compute_output_shape(self.conv2.compute_output_shape(input_shape))

    def official_weights(self):
        weights = {}
        pairs = ((self.conv1, self.gn1), (self.conv2, self.gn2), (self.conv3, self.gn3), (self.conv_proj, self.gn_proj))
        for conv, norm in pairs:
            if conv is not None:
                weights.update(scoped(conv.name, official_weights(conv)))
                weights.update(scoped(norm.name, official_weights(norm)))
        return weights

    def get_config(self):
        config = super().get_config()
        config.update(width=self.width, strides=self.strides)
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResNetStage(keras.layers.Layer):
    """A stage of ``num_units`` bottleneck units (``unit1``, ``unit2``, ...): (B, H, W, C) -> (B, H/s, W/s, 4 * width)."""

    def __init__(self, num_units, width, first_stride=1, **kwargs):
        super().__init__(**kwargs)
        self.num_units = num_units
        self.width = width
        self.first_stride = first_stride
        self.units = [
            BottleneckUnit(width, strides=first_stride if i == 0 else 1, dtype=self.dtype_policy, name=f"unit{i + 1}")
            for i in range(num_units)
        ]

    def build(self, input_shape):
        for unit in self.units:
            unit.build(input_shape)
            input_shape = unit.compute_output_shape(input_shape)

    def official_weights(self):
        return {name: v for unit in self.units for name, v in scoped(unit.name, unit.official_weights()).items()}

    def call(self, x):
        for unit in self.units:
            x = unit(x)
        return x

    def compute_output_shape(self, input_shape):
        for unit in self.units:
            input_shape = unit.compute_output_shape(input_shape)
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(num_units=self.num_units, width=self.width, first_stride=self.first_stride)
        return config


def resnet_stem(images, layers, width_factor=1, dtype=None):
    """Applies the hybrid ResNet to (B, H, W, C) images; returns the feature map (B, H/s, W/s, C').

    ``s`` = 4 (root) x 2 per stage after the first. Layer names: ``conv_root``,
    ``gn_root``, ``root_relu``, ``root_pool``, ``block1``, ``block2``, ... Every layer gets the ``dtype`` policy.
    """
    width = int(64 * width_factor)
    x = StdConv2D(width, 7, strides=2, dtype=dtype, name="conv_root")(images)
    x = _group_norm("gn_root", dtype)(x)
    x = keras.layers.ReLU(dtype=dtype, name="root_relu")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", data_format="channels_last", dtype=dtype,
                                  name="root_pool")(x)
    for stage, num_units in enumerate(layers):
        x = ResNetStage(num_units, width * 2**stage, first_stride=1 if stage == 0 else 2, dtype=dtype,
                        name=f"block{stage + 1}")(x)
    return x


def stem_stride(layers):
    """Total downsampling of ``resnet_stem``: 4 for the root, x2 for every stage after the first."""
    return 4 * 2 ** max(len(layers) - 1, 0)
