"""The ViT builder and keras.applications-style constructors.

``vision_transformer`` builds a functional ``keras.Model`` whose layer names
mirror the official module tree (``embedding``, ``cls``, ``posembed_input``,
``encoderblock_0`` ..., ``encoder_norm``, ``pre_logits``, ``head``), so
official checkpoints map one to one. ``ViT_B16`` and friends wrap it with the
signature of ``keras.applications``; ``create_model`` takes any model name.
"""

import inspect
import logging
import os
from pathlib import Path

import keras

from keras_vit import checkpoints, configs, resnet
from keras_vit import weights as weights_lib
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

log = logging.getLogger("keras_vit")
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
    remat=False,
    channels=3,
    resnet_layers=None,
    resnet_width_factor=1,
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
        remat: gradient checkpointing of every Transformer block in training
            (see ``TransformerBlock``): only each block's input is kept for the
            backward pass, which recomputes the rest, for about a third more
            compute per training step.
        channels: input channels.
        resnet_layers: units per stage of a hybrid's ResNet stem, e.g.
            ``(3, 4, 9)``; ``()`` is the root alone; ``None`` (default) is a
            plain ViT. The patch size then applies to the feature map.
        resnet_width_factor: ResNet width = 64 x this factor.
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
    x = inputs if resnet_layers is None else resnet.resnet_stem(inputs, resnet_layers, resnet_width_factor)
    x = Patches(patch_size, hidden_size, name="embedding")(x)
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
            remat=remat,
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


def _is_url(weights):
    return isinstance(weights, str) and "://" in weights


def _source_arrays(source):
    """``(arrays, path, grid)`` from an official ``.npz`` or a ``.keras`` model file (local or URL).

    ``arrays`` are keyed by official name; ``grid`` is the token grid of a ``.keras`` model (None for an
    ``.npz``, whose grid is read off the arrays when it is square).
    """
    path = weights_lib.fetch(source) if _is_url(source) else Path(source)
    if path.suffix == ".npz":
        return checkpoints.read_npz(path), str(path), None
    if path.suffix == ".keras":
        if not path.exists():
            raise FileNotFoundError(f"Model file {path} does not exist.")
        loaded = keras.models.load_model(path)
        return checkpoints.model_arrays(loaded), str(path), checkpoints.model_grid(loaded)
    raise ValueError(
        f"Unsupported weights {source!r}: give a weights family, an official .npz, a Keras .keras or "
        ".weights.h5 file, or an URL of one of those."
    )


def _pretrained_arrays(weights, model_name, image_size):
    """Resolves ``weights`` (family, path or URL) to ``(arrays, path, grid)``; arrays None for ``.weights.h5``."""
    if isinstance(weights, str) and weights in weights_lib.FAMILIES:
        entry = weights_lib.resolve_weights(model_name, weights, image_size)
        return checkpoints.read_npz(weights_lib.fetch(entry.url, entry.sha256)), entry.url, None
    if os.fspath(weights).endswith(".weights.h5"):
        return None, str(weights_lib.fetch(weights) if _is_url(weights) else weights), None
    return _source_arrays(os.fspath(weights))


def load_weights(model, weights, adapt=True):
    """Loads a checkpoint path or URL (official ``.npz``, ``.keras``, ``.weights.h5``) into ``model``.

    With ``adapt=True`` (the default) a different head, a missing top or
    another resolution are adapted as described in
    ``keras_vit.checkpoints.adapt_arrays``; ``.weights.h5`` files must match
    exactly. Returns ``model``.
    """
    arrays, source, grid = _pretrained_arrays(weights, model.name, tuple(model.input.shape[1:3]))
    if arrays is None:
        model.load_weights(source)
        return model
    return checkpoints.load_arrays(model, arrays, adapt=adapt, source=source, log=log.info, source_grid=grid)


def _load_pretrained(weights, model_name, config):
    """Builds ``vision_transformer(**config)`` and loads ``weights`` into it, fitting the top to them."""
    arrays, source, grid = _pretrained_arrays(weights, model_name, config["image_size"])
    if arrays is None:
        model = vision_transformer(**config)
        model.load_weights(source)
        return model
    if "representation_size" not in config:
        # The pre-logits layer stays with the head it feeds; a new head (fine-tuning) drops it, as the official code.
        found = checkpoints.infer_config(arrays)
        keeps_head = config["include_top"] and found["classes"] == config["classes"]
        config["representation_size"] = found["representation_size"] if keeps_head else None
    model = vision_transformer(**config)
    return checkpoints.load_arrays(model, arrays, adapt=True, source=source, log=log.info, source_grid=grid)


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

    ``weights``: ``None`` (random init), a family (``"imagenet21k"``,
    ``"imagenet21k+imagenet2012"``, ``"augreg_in21k"``, ``"augreg_in21k_ft_in1k"``,
    ``"augreg_in1k"``, ``"sam"``; see ``keras_vit.weights``), a local path
    (official ``.npz``, ``.keras``, ``.weights.h5``) or an URL. A head with
    another number of classes is replaced by a zero-initialised one, the top is
    dropped for ``include_top=False``, and position embeddings are
    interpolated to ``image_size``; each adaptation is logged.

    ``input_shape=(H, W, C)`` overrides ``image_size`` and the channel count,
    as in ``keras.applications``. Other keyword arguments override the
    configuration (``dropout_rate``, ``stochastic_depth_rate``,
    ``representation_size``, ``gelu``, ...). See ``vision_transformer`` for
    the outputs.
    """
    config = configs.model_config(name)
    model_name = config.pop("name")
    if input_shape is not None:
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}.")
        image_size, overrides["channels"] = tuple(input_shape[:2]), input_shape[2]
    config.update(overrides)
    config.update(
        image_size=image_size,
        include_top=include_top,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        name=model_name,
    )
    if weights is None:
        return vision_transformer(**config)
    if "representation_size" not in overrides:  # the user's choice wins over the checkpoint's
        config.pop("representation_size")
    return _load_pretrained(weights, model_name, config)


def from_official_checkpoint(path, image_size=None, classes=None, include_top=True, **overrides):
    """Builds the model an official checkpoint describes and loads it; no other argument is needed.

    The architecture (hidden size, layers, heads, MLP size, patch size,
    classifier, representation size, classes, image size from the
    position-embedding grid) is inferred from the arrays. ``image_size`` and
    ``classes`` may differ from the checkpoint's (position embeddings are
    interpolated; a new zero-initialised head is made). ``path`` may be an URL.
    """
    arrays, source, grid = _source_arrays(os.fspath(path))
    return model_from_arrays(arrays, source, image_size, classes, include_top, source_grid=grid, **overrides)


def model_from_arrays(arrays, source, image_size=None, classes=None, include_top=True, source_grid=None, **overrides):
    """``from_official_checkpoint`` for arrays already read (``{official name: array}``).

    ``source_grid``: the checkpoint's token grid when known (a ``.keras`` source), needed for rectangular grids.
    """
    config = checkpoints.infer_config(arrays)
    if config["image_size"] is None and source_grid is not None:
        stride = checkpoints.token_stride(config)
        config["image_size"] = (source_grid[0] * stride[0], source_grid[1] * stride[1])
    if image_size is None and config["image_size"] is None:
        raise ValueError(f"{source} has a rectangular position-embedding grid: pass image_size=(height, width).")
    if include_top and classes is None and config["classes"] is None:
        raise ValueError(f"{source} has no head: pass classes=K for a new head, or include_top=False.")
    if not (include_top and classes in (None, config["classes"])):
        config["representation_size"] = None  # a new head or none: the pre-logits layer goes too
    config.update(
        image_size=image_size or config["image_size"],
        classes=classes or config["classes"] or 1000,
        include_top=include_top,
        name=Path(source).stem.replace(".", "_"),
    )
    config.update(overrides)
    model = vision_transformer(**config)
    return checkpoints.load_arrays(model, arrays, adapt=True, source=source, log=log.info, source_grid=source_grid)


def resize_model(model, image_size):
    """The same model at another resolution, position embeddings interpolated the official way.

    Works on any model built by ``vision_transformer`` (fine-tuned at 384,
    serve at 224 or 512). Returns a new model; ``model`` is unchanged.
    """
    config = model.get_config()
    height, width = to_pair(image_size, "image size")
    for layer in config["layers"]:
        layer.pop("build_config", None)  # rebuilt from the new input shape
        if layer["class_name"] == "InputLayer":
            layer["config"]["batch_shape"] = [None, height, width, layer["config"]["batch_shape"][-1]]
    resized = keras.Model.from_config(config)
    arrays = checkpoints.model_arrays(model)
    return checkpoints.load_arrays(
        resized, arrays, adapt=True, source=f"model {model.name}", log=log.info, source_grid=checkpoints.model_grid(model)
    )


def _named_constructor(official_name, function_name):
    """A keras.applications-style constructor: ``create_model(official_name, ...)`` with its signature."""

    def constructor(*args, **kwargs):
        return create_model(official_name, *args, **kwargs)

    signature = inspect.signature(create_model)
    constructor.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    config = configs.model_config(official_name)
    stem = f"ResNet stages {config['resnet_layers']}, " if "resnet_layers" in config else ""
    constructor.__name__ = constructor.__qualname__ = function_name
    constructor.__doc__ = (
        f"{official_name}: {stem}hidden size {config['hidden_size']}, {config['num_layers']} layers, "
        f"{config['num_heads']} heads, MLP {config['mlp_dim']}, patch {config['patch_size']}.\n\n"
        "Args: include_top, weights (None, a family such as 'augreg_in21k', a checkpoint path or an URL), "
        "image_size (int or (h, w), default 224), pooling (with include_top=False: None, 'token', 'gap'), "
        "classes (default 1000), classifier_activation (default None: logits), input_shape, and "
        "configuration overrides such as dropout_rate. See keras_vit.create_model."
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
R_ViT_Ti16 = _named_constructor("R+ViT-Ti_16", "R_ViT_Ti16")
R26_ViT_S32 = _named_constructor("R26+ViT-S_32", "R26_ViT_S32")
R26_ViT_B32 = _named_constructor("R26+ViT-B_32", "R26_ViT_B32")
R50_ViT_B16 = _named_constructor("R50+ViT-B_16", "R50_ViT_B16")
R50_ViT_L32 = _named_constructor("R50+ViT-L_32", "R50_ViT_L32")
