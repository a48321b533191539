"""The official checkpoint names of a keras_vit model's weights, in one place.

Names are the Flax module path joined with ``/`` (``Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel``).
Each layer with weights declares their names inside its scope (``official_weights()``, keras_vit's layers;
Keras' stock layers by kind: ``keras_vit.layers.official_weights``); ``official_scope`` gives a top-level
layer's scope. ``keras_vit.pretrained`` reads and writes files by these names.
"""

import re

import keras
import numpy as np

from keras_vit.backbone import dequantized_copy, holds_codes
from keras_vit.layers import official_weights as layer_official_weights

_SCOPES = {
    "posembed_input": "Transformer/posembed_input",
    "encoder_norm": "Transformer/encoder_norm",
    "pre_norm": "Transformer/pre_norm",  # timm's norm_pre (after the position embeddings)
    "fc_norm": "fc_norm",  # timm's fc_norm (after pooling)
    "pool": "",  # a pooling layer's weights are named in its own official scope
}
_BLOCK_LAYER = re.compile(r"^encoderblock_\d+$")


def official_scope(layer_name):
    """The official scope of a keras_vit model's top-level layer: ``encoderblock_3`` -> ``Transformer/encoderblock_3``.

    The scope is the layer's name except for these Transformer parts and the pooling (which names its own).
    """
    if _BLOCK_LAYER.match(layer_name):
        return f"Transformer/{layer_name}"
    return _SCOPES.get(layer_name, layer_name)


def official_weights(model):
    """``{official checkpoint name: variable}`` of a keras_vit model, by the names its layers declare.

    Also serves plain functional models saved by keras_vit before ``VisionTransformer`` existed. A layer with
    weights that has no official counterpart is a ``ValueError``.
    """
    weights = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        declared = layer_official_weights(layer)
        if declared is None:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) has no counterpart in the official checkpoints; "
                "only models built by keras_vit.vision_transformer can load them."
            )
        scope = official_scope(layer.name)
        weights.update({"/".join(p for p in (scope, name) if p): v for name, v in declared.items()})
    return weights


def official_arrays(model):
    """The weights of a keras_vit model as ``{official name: float32 array}``, ready to save as an official .npz.

    A layer quantized to integer codes (``holds_codes``) gives its effective weights, the float kernel it applies
    (``dequantized_copy``), never its codes.
    """
    if holds_codes(model):
        model = dequantized_copy(model)
    return {name: np.asarray(keras.ops.convert_to_numpy(v), np.float32) for name, v in official_weights(model).items()}
