"""keras.applications-style entry points: named constructors (``ViT_B16`` ...), ``create_model``,
``from_official_checkpoint``, ``resize_model`` and ``load_weights``.

They decode a name (``keras_vit.configs``), build a ``VisionTransformer`` and load weights through
``keras_vit.pretrained`` (read -> adapt -> assign).
"""

from pathlib import Path

from keras_vit import configs
from keras_vit.architecture import token_stride
from keras_vit.arguments import unknown_arguments_error
from keras_vit.layers import to_pair
from keras_vit.layers.embedding import POSEMBS
from keras_vit.backbone import holds_codes, quantize_like
from keras_vit.models import ARGUMENTS, VisionTransformer, vision_transformer
from keras_vit.pretrained import load as loading
from keras_vit.pretrained.config import infer_config
from keras_vit.pretrained.registry import families_for
from keras_vit.pretrained.timm import TIMM_OPTIONS

_DEFAULT_IMAGE_SIZE = 224
# Builder arguments create_model sets itself or that the name decides; the rest are overrides.
_SET_BY_CREATE_MODEL = ("image_size", "include_top", "pooling", "classes", "classifier_activation",
                        "include_preprocessing", "name", "input_tensor", "dtype", "variant")
# What a weights file decides when neither the name's options nor an override did: a big_vision file (SigLIP, a
# MAP head without class token; FlexiViT, a class token without a position-embedding row) is a ViT-B_16 too.
_SET_BY_THE_WEIGHTS = ("classifier", "num_register_tokens", "posemb", "posemb_class_token")


def _file_config(source):
    """The builder arguments a weights ``Source`` describes, in ``infer_config``'s terms (``classes`` None for a
    file without a head): those a timm checkpoint states (with its input pipeline, and timm's resampling of the
    position embeddings), else those read off the arrays."""
    if source.config is None:
        return infer_config(source.arrays)
    config = dict(source.config, posemb="learn", posemb_interpolation="bicubic")
    if not config.pop("include_top"):
        config["classes"] = None
    config.pop("pooling", None)
    if source.preprocessing is not None:
        config["preprocessing"] = {key: value for key, value in source.preprocessing.items() if key != "input_size"}
    return config


def _stated_options(config):
    """What a file's config states beyond the arrays (a timm checkpoint's options and input pipeline)."""
    return [key for key in (*TIMM_OPTIONS, "preprocessing", "posemb_interpolation") if key in config]


def _input_geometry(input_shape, image_size, channels, native_size=_DEFAULT_IMAGE_SIZE):
    """``(image size, channels, native image size)`` from keras.applications' ``input_shape=(H, W, C)``, where H or
    W may be None (any size: the position embeddings are laid out for ``image_size``, default ``native_size``), or
    from ``image_size``."""
    if input_shape is None:
        size = native_size if image_size is None else image_size
        return size, channels, None
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    if len(shape) != 3 or not positive(shape[2]) or not all(v is None or positive(v) for v in shape[:2]):
        raise ValueError(
            f"input_shape must be (height, width, channels) of positive ints (None for a side of any size), "
            f"got {input_shape!r}."
        )
    if None in shape[:2]:
        native = to_pair(native_size if image_size is None else image_size, "image size")
        return shape[:2], shape[2], tuple(n if s is None else s for s, n in zip(shape[:2], native))
    if image_size is not None and to_pair(image_size, "image size") != shape[:2]:
        raise ValueError(
            f"image_size={image_size!r} and input_shape={input_shape!r} disagree: give one of them "
            "(input_shape wins in keras.applications; here neither is guessed)."
        )
    return shape[:2], shape[2], None


def _has_open_side(input_shape):
    """Whether a keras.applications ``input_shape`` leaves its height or width open (None)."""
    return isinstance(input_shape, (tuple, list)) and len(input_shape) == 3 and None in tuple(input_shape)[:2]


def _default_name(official_name):
    """The official name as a valid Keras/TensorFlow scope name: ``"R50+ViT-B_16"`` -> ``"R50_ViT-B_16"``."""
    return official_name.replace("+", "_")


def create_model(
    model_name,
    include_top=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation=None,
    include_preprocessing=False,
    name=None,
    image_size=None,
    dtype=None,
    allow_nonfinite=False,
    **overrides,
):
    """Builds a named model, e.g. ``create_model("ViT-B_16")`` or ``create_model("S/32-gap", classes=10)``.

    The arguments are those of the named constructors (``ViT_B16`` ...); ``model_name`` is an official name or
    short form (``keras_vit.list_models``). Other keyword arguments override the configuration
    (``dropout_rate``, ``stochastic_depth_rate``, ``representation_size``, ``gelu``, ``num_register_tokens``,
    ``classifier``, ``class_names``, ...); an unknown one is a ``TypeError`` naming the closest valid one.
    With ``weights`` (not a ``.weights.h5``), the file decides what neither the name nor an override sets: the
    classifier (e.g. ``"map"`` for a SigLIP image tower), register tokens and the position-embedding layout.
    ``allow_nonfinite=True`` loads weights that hold NaN or infinite values (refused by default).
    """
    unknown = set(overrides) - (set(ARGUMENTS) - set(_SET_BY_CREATE_MODEL))
    if unknown:
        raise unknown_arguments_error(unknown, set(ARGUMENTS) - set(_SET_BY_CREATE_MODEL), "create_model")
    config = configs.model_config(model_name)
    official_name, variant = config.pop("name"), config.pop("variant")
    chosen = set(overrides) | configs.options_of(model_name)
    image_size, channels, native = _input_geometry(input_shape, image_size, overrides.pop("channels", 3))
    chosen_representation = "representation_size" in overrides
    config.update(overrides)
    config.update(
        image_size=image_size,
        native_image_size=native,
        channels=channels,
        include_top=include_top,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        include_preprocessing=include_preprocessing,
        name=name or _default_name(official_name),
        dtype=dtype,
    )
    if weights is None:
        return vision_transformer(input_tensor=input_tensor, **config)
    source = None
    if not str(weights).endswith(".weights.h5"):
        source = loading.read(weights, variant, to_pair(native or image_size, "image size"),
                              allow_nonfinite=allow_nonfinite)
        found = _file_config(source)
        config.update({key: found[key] for key in (*_SET_BY_THE_WEIGHTS, *_stated_options(found)) if key not in chosen})
        if not chosen_representation:
            # The pre-logits layer stays with the head it feeds; a new head (fine-tuning) drops it, as the official code.
            keeps_head = include_top and found["classes"] == classes
            config["representation_size"] = found["representation_size"] if keeps_head else None
    model = vision_transformer(input_tensor=input_tensor, **config)
    vit = model if isinstance(model, VisionTransformer) else model.get_layer(config["name"])
    if source is None:
        source = loading.read(weights, variant, like=vit, allow_nonfinite=allow_nonfinite)
    loading.assign(vit, source)
    return model


load_weights = loading.load_weights


def from_official_checkpoint(path, image_size=None, classes=None, include_top=True, dtype=None, input_shape=None,
                             allow_nonfinite=False, **overrides):
    """Builds the model a checkpoint describes and loads it; no other argument is needed.

    ``path``: an official ``.npz`` (google-research/vision_transformer or big_vision, the image tower of a
    two-tower SigLIP file included), a keras_vit ``.keras`` file (of a quantized model: the float weights its
    layers apply) or an URL. The architecture (hidden size,
    layers, heads, MLP size, patch size, classifier, registers, position embeddings, representation size,
    classes, image size from the position-embedding grid) is inferred from the arrays. A file without a head
    (a SigLIP image tower) gives its pooled representation (``include_top=False``, ``pooling`` = its
    classifier, e.g. ``"map"``) unless ``classes`` asks for a new head. Fixed (sin-cos) position embeddings
    hold no grid: pass ``image_size``, or an ``input_shape`` with open sides (any size; its native size is then
    224 rounded to the token stride unless ``image_size`` says otherwise). ``image_size``, ``classes``, ``patch_size`` and ``channels`` may differ
    from the checkpoint's (adapted, see ``keras_vit.pretrained.adapt``). ``input_shape=(None, None, C)`` makes a
    model of any image size whose position embeddings keep the checkpoint's grid (or ``image_size``'s).
    ``allow_nonfinite=True`` loads arrays that hold NaN or infinite values (refused by default). Other keyword
    arguments are
    ``VisionTransformer`` arguments.
    """
    unknown = set(overrides) - set(ARGUMENTS)
    if unknown:
        raise unknown_arguments_error(unknown, ARGUMENTS, "from_official_checkpoint")
    source = loading.read(path, allow_nonfinite=allow_nonfinite)
    config = _file_config(source)
    if config["image_size"] is None and source.grid is not None:
        stride = token_stride(config["patch_size"], config.get("resnet_layers"))
        config["image_size"] = (source.grid[0] * stride[0], source.grid[1] * stride[1])
    native_size = config["image_size"]
    if native_size is None and not POSEMBS[config["posemb"]].learned and _has_open_side(input_shape):
        # fixed embeddings are computed for each call's grid: the native size only lays out position_embeddings()
        stride = token_stride(config["patch_size"], config.get("resnet_layers"))
        native_size = tuple(max(_DEFAULT_IMAGE_SIZE // step, 1) * step for step in stride)
    if image_size is None and native_size is None:
        raise ValueError(f"{path}: the image size cannot be read off its arrays: pass image_size=(height, width).")
    if include_top and classes is None and config["classes"] is None:
        # A file without a head describes its pooled representation (a SigLIP image tower: the MAP output).
        include_top = False
        overrides.setdefault("pooling", config["classifier"])
    if not (include_top and classes in (None, config["classes"])):
        config["representation_size"] = None  # a new head or none: the pre-logits layer goes too
    size, channels, native = _input_geometry(input_shape, image_size, config["channels"], native_size)
    config.update(
        image_size=size,
        native_image_size=native,
        channels=channels,
        classes=classes if classes is not None else config["classes"] or 1000,
        include_top=include_top,
        name=Path(str(path)).stem.replace(".", "_"),
        dtype=dtype,
    )
    config.update(overrides)
    return loading.assign(vision_transformer(**config), source)


def resize_model(model, image_size, patch_size=None):
    """The same model at another resolution (and patch size), a new ``VisionTransformer``.

    Rebuilds from the model's configuration at ``image_size`` and loads the weights through the loading
    pipeline: position embeddings interpolated the official way, the patch kernel resampled (FlexiViT) when
    ``patch_size`` is given. ``image_size=(None, None)`` (or one open side) gives the same model for any image
    size: its position embeddings keep their grid and are resampled at each call. A plain functional model
    from an older keras_vit ``.keras`` file is accepted (its configuration is read off its weights). A model
    quantized to int8 or int4 is resized from its effective weights and quantized the same way (the codes of
    layers the resizing does not touch stay). ``model`` is unchanged.
    """
    source = loading.model_source(model, f"model {model.name}")
    requantize = holds_codes(model)  # built in float, loaded, then quantized as ``model`` is
    if isinstance(model, VisionTransformer):
        config = model.vit_config
        config.update(name=model.name, dtype=model.dtype_policy.name if requantize else model.get_config()["dtype"])
    else:  # a keras_vit model saved before VisionTransformer existed
        config = infer_config(source.arrays)
        config.update(include_top=config["classes"] is not None, classes=config["classes"] or 1000, name=model.name)
    native = config.get("native_image_size") or config["image_size"]
    if isinstance(image_size, (tuple, list)) and None in image_size:
        config["image_size"], config["native_image_size"] = tuple(image_size), native
    else:
        config["image_size"] = config["native_image_size"] = to_pair(image_size, "image size")
    config["variant"] = None
    if patch_size is not None:
        config["patch_size"] = to_pair(patch_size, "patch size")
    resized = loading.assign(VisionTransformer(**config), source)
    if requantize:
        quantize_like(resized, model)
    return resized


_CONSTRUCTOR_DOC = """Instantiates the {official} architecture ({description}).

Reference: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers
for Image Recognition at Scale", ICLR 2021. {weights_note}

Args:
    include_top: whether to include the classification head.
    weights: ``None`` (random initialisation), a weights family ({families}),
        a path to an official ``.npz``, a ``.keras`` or ``.weights.h5`` file,
        or an URL. A head with another number of classes is replaced by a
        zero-initialised one, position embeddings are interpolated to the
        input size, the patch kernel is adapted to the channel count; each
        change is logged (logger ``keras_vit.pretrained.adapt``).
    input_tensor: optional Keras tensor (output of ``keras.Input()``) to use
        as the image input.
    input_shape: optional ``(height, width, channels)``, 1 to 4 channels;
        instead of ``image_size``. Each side a multiple of {stride}, or None:
        one model for any size (multiples of {stride}, or any with
        ``dynamic_padding=True``), position embeddings resampled per call.
    pooling: with ``include_top=False``: ``None`` (the token sequence
        (B, T, {hidden})), ``"token"`` (the class token), ``"avg"`` or ``"max"``
        over the patch tokens, or ``"map"`` (a new attention-pooling head)
        ((B, {hidden})). ``"gap"`` is accepted for ``"avg"``.
    classes: number of classes of the head.
    classifier_activation: activation of the head (``None``: logits,
        ``"softmax"``: probabilities).
    include_preprocessing: whether the model maps pixels in [0, 255] to
        [-1, 1] itself (``(x - 127.5) / 127.5``). Default False: inputs are
        in [-1, 1] (``keras_vit.preprocess_input``).
    name: the model's name (default ``"{official}"``).
    image_size: int or (height, width), default 224, when ``input_shape`` is not given;
        with an ``input_shape`` of open sides (None), the size the position
        embeddings are laid out for.
    dtype: dtype policy of the model (e.g. ``"mixed_bfloat16"``); default: Keras' global policy.
    **overrides: configuration overrides such as ``dropout_rate``,
        ``stochastic_depth_rate``, ``representation_size``, ``classifier``,
        ``num_register_tokens``, ``class_names``.

Returns:
    A ``keras_vit.VisionTransformer``.
"""


def _constructor(official, export_name):
    """The exported constructor ``export_name`` of the official model ``official``, with its docstring."""

    def constructor(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
                    classifier_activation=None, include_preprocessing=False, name=None, image_size=None, dtype=None,
                    **overrides):
        return create_model(official, include_top=include_top, weights=weights, input_tensor=input_tensor,
                            input_shape=input_shape, pooling=pooling, classes=classes,
                            classifier_activation=classifier_activation, include_preprocessing=include_preprocessing,
                            name=name, image_size=image_size, dtype=dtype, **overrides)

    config = configs.model_config(official)
    stem = f"ResNet stages {tuple(config['resnet_layers'])}, " if "resnet_layers" in config else ""
    families = families_for(official)
    constructor.__name__ = constructor.__qualname__ = export_name
    constructor.__module__ = "keras_vit"
    constructor.__doc__ = _CONSTRUCTOR_DOC.format(
        official=official,
        description=(
            f"{stem}hidden size {config['hidden_size']}, {config['num_layers']} layers, {config['num_heads']} heads, "
            f"MLP {config['mlp_dim']}, patch {config['patch_size']}"
        ),
        stride=token_stride(config["patch_size"], config.get("resnet_layers"))[0],
        hidden=config["hidden_size"],
        families=", ".join(f'``"{f}"``' for f in families) if families else "none released for this model",
        weights_note="" if families else "No official weights were released for it.",
    )
    return constructor


ViT_Ti16 = _constructor("ViT-Ti_16", "ViT_Ti16")
ViT_S16 = _constructor("ViT-S_16", "ViT_S16")
ViT_S32 = _constructor("ViT-S_32", "ViT_S32")
ViT_B8 = _constructor("ViT-B_8", "ViT_B8")
ViT_B16 = _constructor("ViT-B_16", "ViT_B16")
ViT_B32 = _constructor("ViT-B_32", "ViT_B32")
ViT_L16 = _constructor("ViT-L_16", "ViT_L16")
ViT_L32 = _constructor("ViT-L_32", "ViT_L32")
ViT_H14 = _constructor("ViT-H_14", "ViT_H14")
R_ViT_Ti16 = _constructor("R+ViT-Ti_16", "R_ViT_Ti16")
R26_ViT_S32 = _constructor("R26+ViT-S_32", "R26_ViT_S32")
R26_ViT_B32 = _constructor("R26+ViT-B_32", "R26_ViT_B32")
R50_ViT_B16 = _constructor("R50+ViT-B_16", "R50_ViT_B16")
R50_ViT_L32 = _constructor("R50+ViT-L_32", "R50_ViT_L32")
ViT_S14 = _constructor("ViT-S_14", "ViT_S14")
ViT_B14 = _constructor("ViT-B_14", "ViT_B14")
ViT_L14 = _constructor("ViT-L_14", "ViT_L14")
