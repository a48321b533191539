"""keras_vit: Vision Transformers (Dosovitskiy et al., 2020) for Keras 3.

Layers, a builder, keras.applications-style constructors and official
checkpoint loading and writing (``save_weights``). Models are written with ``keras.ops`` and run on the
TensorFlow, JAX and PyTorch backends.
"""

from keras_vit import analysis, distribution, evaluation
from keras_vit._speed import reference_ops
from keras_vit.analysis import attention_maps, attention_rollout
from keras_vit.errors import CheckpointMismatchError
from keras_vit.pretrained.resample import interpolate_posemb, resample_patch_kernel
from keras_vit.pretrained.save import LayoutError, save_weights
from keras_vit.configs import list_models, model_config
from keras_vit.architecture import Architecture
from keras_vit.distribution import layout_map
from keras_vit.layers import (
    AddPositionEmbs,
    ClassToken,
    MAPHead,
    MultiHeadSelfAttention,
    Patches,
    RegisterTokens,
    SinCos2DPositionEmbs,
    TokenPooling,
    TransformerBlock,
)
from keras_vit.resnet import BottleneckUnit, ResNetStage, StdConv2D
from keras_vit.preprocessing import decode_predictions, preprocess_input
from keras_vit.models import VisionTransformer, vision_transformer
from keras_vit.applications import (
    R26_ViT_B32,
    R26_ViT_S32,
    R50_ViT_B16,
    R50_ViT_L32,
    R_ViT_Ti16,
    ViT_B8,
    ViT_B14,
    ViT_B16,
    ViT_B32,
    ViT_H14,
    ViT_L14,
    ViT_L16,
    ViT_L32,
    ViT_S14,
    ViT_S16,
    ViT_S32,
    ViT_Ti16,
    create_model,
    from_official_checkpoint,
    load_weights,
    resize_model,
)

__version__ = "0.1.0"
__all__ = [
    "AddPositionEmbs",
    "Architecture",
    "BottleneckUnit",
    "CheckpointMismatchError",
    "LayoutError",
    "ClassToken",
    "MAPHead",
    "MultiHeadSelfAttention",
    "Patches",
    "R26_ViT_B32",
    "R26_ViT_S32",
    "R50_ViT_B16",
    "R50_ViT_L32",
    "R_ViT_Ti16",
    "RegisterTokens",
    "ResNetStage",
    "SinCos2DPositionEmbs",
    "StdConv2D",
    "TokenPooling",
    "TransformerBlock",
    "ViT_B14",
    "ViT_B16",
    "ViT_B32",
    "ViT_B8",
    "ViT_H14",
    "ViT_L14",
    "ViT_L16",
    "ViT_L32",
    "ViT_S14",
    "ViT_S16",
    "ViT_S32",
    "ViT_Ti16",
    "VisionTransformer",
    "analysis",
    "attention_maps",
    "attention_rollout",
    "create_model",
    "decode_predictions",
    "distribution",
    "evaluation",
    "from_official_checkpoint",
    "interpolate_posemb",
    "layout_map",
    "list_models",
    "load_weights",
    "model_config",
    "preprocess_input",
    "reference_ops",
    "resample_patch_kernel",
    "resize_model",
    "save_weights",
    "vision_transformer",
]
