"""Keras layers of the Vision Transformer (Dosovitskiy et al., 2020) and its big_vision descendants.

Every layer is written with ``keras.ops`` only, so it runs unchanged on the TensorFlow, JAX and PyTorch Keras
backends, and is registered for ``.keras`` serialization (no ``Lambda`` layers: files load with
``safe_mode``). Each layer with weights declares their official names (``official_weights()``).

Modules: ``common`` (LayerNorm, Dropout, the MLP), ``embedding`` (patches, position embeddings), ``tokens``
(class and register tokens), ``attention``, ``block`` (the encoder block), ``heads`` (poolings, MAP head, the
classifier). The training-speed machinery the block uses lives in ``keras_vit._speed``.
"""

from keras_vit.layers.attention import AttentionWeights, MultiHeadSelfAttention, Projection
from keras_vit.layers.block import TransformerBlock
from keras_vit.layers.common import (
    GELU_FORMS,
    LAYER_NORM_EPSILON,
    PACKAGE,
    Dropout,
    LayerNorm,
    gelu,
    official_weights,
    to_pair,
)
from keras_vit.layers.embedding import AddPositionEmbs, Patches, SinCos2DPositionEmbs, sincos_2d
from keras_vit.layers.heads import POOLINGS, MAPHead, TokenPooling
from keras_vit.layers.tokens import PREFIX_TOKENS, ClassToken, RegisterTokens

__all__ = [
    "AddPositionEmbs",
    "AttentionWeights",
    "ClassToken",
    "Dropout",
    "GELU_FORMS",
    "LAYER_NORM_EPSILON",
    "LayerNorm",
    "MAPHead",
    "MultiHeadSelfAttention",
    "PACKAGE",
    "POOLINGS",
    "PREFIX_TOKENS",
    "Patches",
    "Projection",
    "RegisterTokens",
    "SinCos2DPositionEmbs",
    "TokenPooling",
    "TransformerBlock",
    "gelu",
    "official_weights",
    "sincos_2d",
    "to_pair",
]
