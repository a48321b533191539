"""The ViT builder and keras.applications-style constructors.

``vision_transformer`` builds a functional ``keras.Model`` whose layer names
mirror the official module tree (``embedding``, ``cls``, ``posembed_input``,
``encoderblock_0`` ..., ``encoder_norm``, ``pre_logits``, ``head``), so
official checkpoints map one to one. ``ViT_B16`` and friends wrap it with the
signature of ``keras.applications``; ``create_model`` takes any model name.
"""

import os

import keras

from keras_vit import checkpoints, configs
from keras_vit.layers import (
    GELU_FORMS,
    LAYER_NORM_EPSILON,
    AddPositionEmbs,
    ClassToken,
    Patches,
    TokenPooling,
    TransformerBlock,
    to_pair,
)

CLASSIFIERS = ("token", "gap", "unpooled")
POOLINGS = (None, "token", "gap", "avg")


def _output_dtype():
    """float32 for the head under a mixed policy, so logits are always float32."""
    policy = keras.config.dtype_policy()
    return "float32" if policy.compute_dtype != policy.variable_dtype else None


def vision_transformer(
    image_size,
    patch_size,
    hidden_size,
    num_layers,
    num_heads,
    mlp_dim,
    classifier="token",
    representation_size=None,
    include_top=True,
    classes=1000,
    classifier_activation=None,
    pooling=None,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    stochastic_depth_rate=0.0,
    gelu="tanh",
    channels=3,
    name="vit",
):
    """Builds a Vision Transformer as a functional ``keras.Model``.

    Input: images (B, H, W, channels), float, in [-1, 1] for official weights
    (see ``keras_vit.preprocess_input``). Output:

    * ``include_top=True``: (B, classes) logits (``classifier_activation=None``,
      the default) or activations (e.g. ``"softmax"``), always float32;
    * ``include_top=False, pooling=None``: the token sequence after
      ``encoder_norm``, (B, T, hidden_size);
    * ``include_top=False, pooling="token"|"gap"``: (B, hidden_size), or
      (B, representation_size) when a representation layer is asked for.

    Args:
        image_size: int or (height, width); each a multiple of the patch size.
        patch_size: int or (height, width).
        hidden_size, num_layers, num_heads, mlp_dim: Transformer shape (D, L, N, M).
        classifier: ``"token"`` (class token, read at position 0), ``"gap"``
            (no class token, mean of all tokens) or ``"unpooled"`` (no class
            token and no pooling; needs ``include_top=False``).
        representation_size: adds the official pre-logits layer
            (Dense(representation_size) + tanh) before the head.
        include_top: whether to add the classification head ``head``.
        classes: number of head outputs.
        classifier_activation: activation of the head; ``None`` gives logits.
        pooling: with ``include_top=False``: ``None`` (token sequence),
            ``"token"``, or ``"gap"`` (alias ``"avg"``; a token model then
            averages the patch tokens, without its class token). Ignored when
            ``include_top=True`` (the classifier decides).
        dropout_rate: dropout after the position embeddings, the attention
            output and both MLP layers (official placement).
        attention_dropout_rate: dropout on the attention weights.
        stochastic_depth_rate: drop-path rate of the last block; block i uses
            ``rate * i / (num_layers - 1)``.
        gelu: ``"tanh"`` (official approximation) or ``"erf"`` (exact).
        channels: input channels.
        name: model name.
    """
    image_size = to_pair(image_size, "image size")
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}.")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    if gelu not in GELU_FORMS:
        raise ValueError(f"gelu must be one of {GELU_FORMS}, got {gelu!r}.")
    has_class_token = classifier == "token"
    if include_top:
        if classifier == "unpooled":
            raise ValueError("classifier='unpooled' has no head: build it with include_top=False.")
        pooling = classifier
    elif pooling == "avg":
        pooling = "gap"
    if pooling == "token" and not has_class_token:
        raise ValueError(f"pooling='token' needs a class token, but classifier={classifier!r} has none; use 'gap'.")
    if representation_size and pooling is None:
        raise ValueError("representation_size applies to a pooled vector: set pooling='token' or 'gap'.")

    inputs = keras.Input((*image_size, channels), name="image")
    x = Patches(patch_size, hidden_size, name="embedding")(inputs)
    if has_class_token:
        x = ClassToken(name="cls")(x)
    x = AddPositionEmbs(name="posembed_input")(x)
    x = keras.layers.Dropout(dropout_rate, name="dropout")(x)
    for i in range(num_layers):
        x = TransformerBlock(
            num_heads,
            mlp_dim,
            dropout_rate=dropout_rate,
            attention_dropout_rate=attention_dropout_rate,
            stochastic_depth_rate=stochastic_depth_rate * i / max(num_layers - 1, 1),
            gelu=gelu,
            name=f"encoderblock_{i}",
        )(x)
    x = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="encoder_norm")(x)
    if pooling is not None:
        x = TokenPooling(pooling, num_prefix_tokens=int(has_class_token), name="pool")(x)
        if representation_size:
            x = keras.layers.Dense(representation_size, activation="tanh", name="pre_logits")(x)
    if include_top:
        x = keras.layers.Dense(
            classes,
            kernel_initializer="zeros",
            activation=classifier_activation,
            dtype=_output_dtype(),
            name="head",
        )(x)
    return keras.Model(inputs, x, name=name)


def load_weights(model, weights):
    """Loads ``weights`` into ``model``: an official ``.npz`` path or a Keras ``.weights.h5`` path."""
    path = os.fspath(weights)
    if path.endswith(".npz"):
        return checkpoints.load_official_weights(model, path)
    if path.endswith(".weights.h5"):
        model.load_weights(path)
        return model
    raise ValueError(f"Unsupported weights {weights!r}: give a path to an official .npz or a Keras .weights.h5 file.")


def create_model(
    name,
    include_top=True,
    weights=None,
    image_size=224,
    pooling=None,
    classes=1000,
    classifier_activation=None,
    input_shape=None,
    **overrides,
):
    """Builds a named model, e.g. ``create_model("ViT-B_16")`` or ``create_model("S/32-gap", classes=10)``.

    ``input_shape=(H, W, C)`` overrides ``image_size`` and the channel count,
    as in ``keras.applications``. Other keyword arguments override the
    configuration (``dropout_rate``, ``stochastic_depth_rate``,
    ``representation_size``, ``gelu``, ...). See ``vision_transformer`` for
    the outputs.
    """
    config = configs.model_config(name)
    config.update(overrides)
    if input_shape is not None:
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}.")
        image_size, config["channels"] = tuple(input_shape[:2]), input_shape[2]
    config.setdefault("name", name)
    config["name"] = config["name"].replace("/", "_")
    model = vision_transformer(
        image_size=image_size,
        include_top=include_top,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        **config,
    )
    if weights is not None:
        load_weights(model, weights)
    return model


def _named_constructor(official_name, function_name):
    def constructor(
        include_top=True,
        weights=None,
        image_size=224,
        pooling=None,
        classes=1000,
        classifier_activation=None,
        input_shape=None,
        **overrides,
    ):
        return create_model(
            official_name,
            include_top=include_top,
            weights=weights,
            image_size=image_size,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            input_shape=input_shape,
            **overrides,
        )

    hidden, layers, heads, mlp = configs.VARIANTS[official_name[4:].split("_")[0]]
    constructor.__name__ = constructor.__qualname__ = function_name
    constructor.__doc__ = (
        f"{official_name}: hidden size {hidden}, {layers} layers, {heads} heads, MLP {mlp}, "
        f"patch {official_name.split('_')[1]}.\n\n"
        "Args: include_top, weights (None or a checkpoint path), image_size (int or (h, w), default 224), "
        "pooling (with include_top=False: None, 'token', 'gap'), classes (default 1000), "
        "classifier_activation (default None: logits), input_shape, and configuration overrides "
        "such as dropout_rate. See keras_vit.create_model."
    )
    return constructor


ViT_Ti16 = _named_constructor("ViT-Ti_16", "ViT_Ti16")
ViT_S16 = _named_constructor("ViT-S_16", "ViT_S16")
ViT_S32 = _named_constructor("ViT-S_32", "ViT_S32")
ViT_B8 = _named_constructor("ViT-B_8", "ViT_B8")
ViT_B16 = _named_constructor("ViT-B_16", "ViT_B16")
ViT_B32 = _named_constructor("ViT-B_32", "ViT_B32")
ViT_L16 = _named_constructor("ViT-L_16", "ViT_L16")
ViT_L32 = _named_constructor("ViT-L_32", "ViT_L32")
ViT_H14 = _named_constructor("ViT-H_14", "ViT_H14")
