"""The Vision Transformer model, its keras.applications-style constructors and loading entry points.

``VisionTransformer`` is a registered functional ``keras.Model`` subclass (the
style of keras-hub's ``Backbone``): its layer names mirror the official module
tree (``embedding``, ``cls``, ``posembed_input``, ``encoderblock_0`` ...,
``encoder_norm``, ``pre_logits``, ``head``), its config is the builder's
arguments, and it answers for itself: ``features`` (pooled pre-logits, token
sequence, every block's output and attention weights on request), ``grid``,
``num_prefix_tokens``, ``patch_embedding_model`` and ``encoder_model``.

Why a subclass and not a function over a model: the model already knows its
own structure when it is built, so the features are sub-graphs of its own
graph (no ``Lambda`` layers, no code elsewhere walking ``model.layers``); the
configuration survives ``.keras`` saving as plain builder arguments, so
``resize_model`` rebuilds from it; and a functional model keeps Keras'
summary, plotting, ``model.layers`` and weight layout (``.weights.h5`` files
written before this class existed still load). A function over a model
would have to rediscover the structure of whatever model it is given.

``.keras`` files saved before ``VisionTransformer`` existed load as plain
functional models that predict as before; the features API needs a
``VisionTransformer``: convert such a file once with
``keras_vit.from_official_checkpoint(path).save(new_path)``.
"""

import copy
import weakref
from pathlib import Path

import keras

from keras_vit import configs, resnet
from keras_vit.layers import (
    GELU_FORMS,
    LAYER_NORM_EPSILON,
    PACKAGE,
    AddPositionEmbs,
    AttentionWeights,
    ClassToken,
    Dropout,
    Patches,
    TokenPooling,
    TransformerBlock,
    to_pair,
)
from keras_vit.pretrained import load as loading
from keras_vit.pretrained.config import infer_config, token_stride
from keras_vit.pretrained.names import model_arrays, model_geometry
from keras_vit.pretrained.registry import families_for

CLASSIFIERS = ("token", "gap", "unpooled")
# keras.applications pooling names, plus the class token and the official "gap" (= "avg").
POOLINGS = (None, "token", "avg", "max", "gap")
_POOLING_METHOD = {"token": "token", "avg": "gap", "gap": "gap", "max": "max"}
_FEATURE_MODELS = weakref.WeakKeyDictionary()  # model -> {key: sub-model sharing its layers}


def _output_dtype():
    """float32 for the head under a mixed policy, so logits are always float32."""
    policy = keras.config.dtype_policy()
    return "float32" if policy.compute_dtype != policy.variable_dtype else None


def _check_arguments(classifier, pooling, gelu, include_top, representation_size):
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}.")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
    if gelu not in GELU_FORMS:
        raise ValueError(f"gelu must be one of {GELU_FORMS}, got {gelu!r}.")
    if include_top and classifier == "unpooled":
        raise ValueError("classifier='unpooled' has no head: build it with include_top=False.")
    if not include_top and pooling == "token" and classifier != "token":
        raise ValueError(f"pooling='token' needs a class token, but classifier={classifier!r} has none; use 'avg'.")
    if representation_size and not include_top and pooling is None:
        raise ValueError("representation_size applies to a pooled vector: set pooling='token', 'avg' or 'max'.")


@keras.saving.register_keras_serializable(package=PACKAGE)
class VisionTransformer(keras.Model):
    """A Vision Transformer, a functional ``keras.Model`` built from its configuration.

    Input: images (B, H, W, channels), float in [-1, 1] for official weights
    (see ``keras_vit.preprocess_input``), or pixels in [0, 255] with
    ``include_preprocessing=True``. Output:

    * ``include_top=True``: (B, classes) logits (``classifier_activation=None``)
      or activations (e.g. ``"softmax"``), always float32;
    * ``include_top=False, pooling=None``: the token sequence after
      ``encoder_norm``, (B, T, hidden_size);
    * ``include_top=False, pooling="token"|"avg"|"max"``: (B, hidden_size),
      or (B, representation_size) with a representation layer.

    Args:
        image_size: int or (height, width); each a multiple of the token stride.
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
            ``"token"`` (class token), ``"avg"`` (alias ``"gap"``) or ``"max"``
            over the patch tokens (a token model's class token left out).
            Ignored when ``include_top=True`` (the classifier decides).
        dropout_rate: dropout after the position embeddings, the attention
            output and both MLP layers (official placement).
        attention_dropout_rate: dropout on the attention weights.
        stochastic_depth_rate: drop-path rate of the last block; block i uses
            ``rate * i / (num_layers - 1)``.
        gelu: ``"tanh"`` (official approximation) or ``"erf"`` (exact).
        remat: gradient checkpointing of every Transformer block in training
            (see ``TransformerBlock``).
        channels: input channels.
        resnet_layers: units per stage of a hybrid's ResNet stem, e.g.
            ``(3, 4, 9)``; ``()`` is the root alone; ``None`` is a plain ViT.
            The patch size then applies to the feature map.
        resnet_width_factor: ResNet width = 64 x this factor.
        include_preprocessing: adds ``(x - 127.5) / 127.5`` as the first
            layer (``Rescaling``, named ``preprocessing``), so the model takes
            pixels in [0, 255]. Default False: the model takes [-1, 1].
        input_tensor: optional ``keras.Input`` to use as the model's input
            (not serialized: a reloaded model gets its own input).
        name: model name.
    """

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
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
        include_preprocessing=False,
        input_tensor=None,
        name="vit",
        **kwargs,
    ):
        image_size = to_pair(image_size, "image size")
        _check_arguments(classifier, pooling, gelu, include_top, representation_size)
        config = dict(
            image_size=image_size,
            patch_size=to_pair(patch_size, "patch size"),
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            classifier=classifier,
            representation_size=representation_size,
            include_top=include_top,
            classes=classes,
            classifier_activation=keras.activations.serialize(keras.activations.get(classifier_activation))
            if classifier_activation is not None and not isinstance(classifier_activation, str)
            else classifier_activation,
            pooling=pooling,
            dropout_rate=dropout_rate,
            attention_dropout_rate=attention_dropout_rate,
            stochastic_depth_rate=stochastic_depth_rate,
            gelu=gelu,
            remat=remat,
            channels=channels,
            resnet_layers=None if resnet_layers is None else tuple(resnet_layers),
            resnet_width_factor=resnet_width_factor,
            include_preprocessing=include_preprocessing,
        )
        has_class_token = classifier == "token"
        method = _POOLING_METHOD[classifier if include_top else pooling] if (include_top or pooling) else None

        inputs = input_tensor if input_tensor is not None else keras.Input((*image_size, channels), name="image")
        x = inputs
        if include_preprocessing:
            x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocessing")(x)
        if resnet_layers is not None:
            x = resnet.resnet_stem(x, resnet_layers, resnet_width_factor)
        x = Patches(patch_size, hidden_size, name="embedding")(x)
        if has_class_token:
            x = ClassToken(name="cls")(x)
        x = AddPositionEmbs(name="posembed_input")(x)
        x = Dropout(dropout_rate, name="dropout")(x)
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
        if method is not None:
            x = TokenPooling(method, num_prefix_tokens=int(has_class_token), name="pool")(x)
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
        super().__init__(inputs, x, name=name, **kwargs)
        self._vit_config = config

    # --- configuration and geometry -----------------------------------------------------------------------

    def get_config(self):
        return {**copy.deepcopy(dict(self._vit_config)), "name": self.name, "trainable": self.trainable}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @property
    def vit_config(self):
        """The builder arguments of this model (a copy): ``VisionTransformer(**model.vit_config)`` rebuilds it."""
        return copy.deepcopy(dict(self._vit_config))

    @property
    def token_stride(self):
        """Image pixels per token, (rows, columns): patch size x ResNet stride."""
        return token_stride(self._vit_config)

    @property
    def grid(self):
        """The token grid (gh, gw)."""
        (height, width), stride = self._vit_config["image_size"], self.token_stride
        return (height // stride[0], width // stride[1])

    @property
    def num_prefix_tokens(self):
        """Tokens before the grid tokens: 1 (class token) or 0."""
        return int(self._vit_config["classifier"] == "token")

    def _check_images(self, images):
        """A one-line ``ValueError`` naming the expected input for images of another rank or channel count."""
        shape = getattr(images, "shape", None)
        if shape is None:
            return
        try:
            rank = len(shape)
        except (TypeError, ValueError):  # a TensorFlow shape of unknown rank
            return
        channels = self._vit_config["channels"]
        if rank != 4 or shape[-1] not in (None, channels):
            height, width = self._vit_config["image_size"]
            raise ValueError(
                f"{self.name} expects images shaped (batch, {height}, {width}, {channels}), got {tuple(shape)}."
            )

    def __call__(self, *args, **kwargs):
        self._check_images(args[0] if args else kwargs.get("inputs"))
        return super().__call__(*args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        self._check_images(inputs)  # also on the JAX backend, whose trainer calls ``call`` directly
        return super().call(inputs, training=training, mask=mask)

    # --- features --------------------------------------------------------------------------------------------

    def _cached(self, key, build):
        models = _FEATURE_MODELS.setdefault(self, {})
        if key not in models:
            models[key] = build()
        return models[key]

    def _blocks(self):
        return [self.get_layer(f"encoderblock_{i}") for i in range(self._vit_config["num_layers"])]

    def _feature_tensors(self, blocks, attention):
        tokens = self.get_layer("encoder_norm").output
        config = self._vit_config
        if config["include_top"]:
            pre_logits = self.get_layer("head").input
        elif config["pooling"] is not None:
            pre_logits = self.outputs[0]
        else:
            method = "token" if config["classifier"] == "token" else "gap"
            pre_logits = TokenPooling(method, self.num_prefix_tokens, name="features_pool")(tokens)
        out = {"pre_logits": pre_logits, "tokens": tokens}
        if blocks:
            out["blocks"] = [block.output for block in self._blocks()]
        if attention:
            # A layer of its own per block: a second, two-output node of the block would trip Keras' graph
            # check, which sizes every node of a layer by its first node's outputs.
            out["attention"] = [
                AttentionWeights(block, name=f"{block.name}_attention")(block.input) for block in self._blocks()
            ]
        return out

    def feature_model(self, output=None, blocks=False, attention=False):
        """A ``keras.Model`` sharing this model's layers: images -> the features of ``features`` (a dict).

        ``output="pre_logits"`` or ``"tokens"`` makes a model with that single
        output instead. Built once per argument set and cached.
        """

        def build():
            tensors = self._feature_tensors(blocks, attention)
            outputs = tensors if output is None else tensors[output]
            return keras.Model(self.inputs[0], outputs, name=f"{self.name}_features")

        return self._cached(("features", output, blocks, attention), build)

    def features(self, images, blocks=False, attention=False, training=False):
        """Everything the model computes on ``images``, as a dict of tensors.

        * ``"pre_logits"``: (B, F), what the head reads (F = hidden size or
          representation size); for a model without pooling, the class token
          (token models) or the mean token (gap models) after ``encoder_norm``;
        * ``"tokens"``: (B, T, D), the token sequence after ``encoder_norm``
          (T = ``num_prefix_tokens`` + gh * gw);
        * ``"blocks"`` (``blocks=True``): L tensors (B, T, D), each block's output;
        * ``"attention"`` (``attention=True``): L tensors (B, N, T, T) float32,
          each block's attention weights.
        """
        return self.feature_model(blocks=blocks, attention=attention)(images, training=training)

    def patch_embedding_model(self):
        """images (B, H, W, C) -> patch embeddings (B, gh * gw, D) (after a hybrid's ResNet), sharing layers."""
        return self._cached(
            ("patches",), lambda: keras.Model(self.inputs[0], self.get_layer("embedding").output, name=f"{self.name}_patches")
        )

    def encoder_model(self):
        """patch embeddings (B, gh * gw, D) -> tokens after ``encoder_norm`` (B, T, D), sharing layers.

        Runs class token, position embeddings, dropout, the blocks and the
        final norm; ``training`` reaches the dropout and the blocks.
        """

        def build():
            embeddings = keras.Input((self.grid[0] * self.grid[1], self._vit_config["hidden_size"]), name="embeddings")
            x = embeddings
            names = ["cls"] if self.num_prefix_tokens else []
            names += ["posembed_input", "dropout"] + [f"encoderblock_{i}" for i in range(self._vit_config["num_layers"])]
            for name in names + ["encoder_norm"]:
                x = self.get_layer(name)(x)
            return keras.Model(embeddings, x, name=f"{self.name}_encoder")

        return self._cached(("encoder",), build)


_BUILDER_ARGUMENTS = ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim")


def as_vision_transformer(model, what="this function"):
    """``model`` itself when it is a ``VisionTransformer``; otherwise a ``TypeError`` saying how to convert it."""
    if isinstance(model, VisionTransformer):
        return model
    raise TypeError(
        f"{what} needs a keras_vit.VisionTransformer, got a {type(model).__name__}. A model loaded from a .keras "
        "file saved by keras_vit before VisionTransformer existed is a plain functional model: convert the file "
        "once with keras_vit.from_official_checkpoint('old.keras').save('new.keras')."
    )


def vision_transformer(*args, input_tensor=None, **config):
    """Builds a ``VisionTransformer`` (see its arguments); ``input_tensor`` as in ``keras.applications``.

    An ``input_tensor`` that is a ``keras.Input`` becomes the model's input.
    One computed by other layers is connected through a wrapping functional
    model whose inputs are the tensor's sources; the ViT is then its layer
    named ``config["name"]`` (``model.get_layer(name)`` for the features API).
    """
    if input_tensor is None:
        return VisionTransformer(*args, **config)
    config = {**dict(zip(_BUILDER_ARGUMENTS, args)), **config}
    if not keras.backend.is_keras_tensor(input_tensor):
        raise TypeError(f"input_tensor must be a Keras tensor (e.g. keras.Input(...)), got {type(input_tensor).__name__}.")
    shape = tuple(input_tensor.shape[1:])
    if len(shape) != 3 or None in shape[:2]:
        raise ValueError(f"input_tensor must be shaped (batch, height, width, channels) with a fixed size, got {input_tensor.shape}.")
    config.update(image_size=shape[:2], channels=shape[2])
    sources = keras.utils.get_source_inputs(input_tensor)
    if len(sources) == 1 and sources[0] is input_tensor:
        return VisionTransformer(input_tensor=input_tensor, **config)
    vit = VisionTransformer(**config)
    return keras.Model(sources, vit(input_tensor), name=f"{vit.name}_on_input_tensor")


def _input_geometry(input_shape, image_size, channels):
    """``(image_size, channels)`` from keras.applications' ``input_shape=(H, W, C)`` when given."""
    if input_shape is None:
        return image_size, channels
    if len(input_shape) != 3 or not all(isinstance(v, int) and v > 0 for v in input_shape):
        raise ValueError(f"input_shape must be (height, width, channels) of positive ints, got {input_shape!r}.")
    return tuple(input_shape[:2]), input_shape[2]


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
    image_size=224,
    **overrides,
):
    """Builds a named model, e.g. ``create_model("ViT-B_16")`` or ``create_model("S/32-gap", classes=10)``.

    The arguments are those of the named constructors (``ViT_B16`` ...);
    ``model_name`` is an official name or short form (``keras_vit.list_models``).
    Other keyword arguments override the configuration (``dropout_rate``,
    ``stochastic_depth_rate``, ``representation_size``, ``gelu``, ...).
    """
    config = configs.model_config(model_name)
    official_name = config.pop("name")
    image_size, channels = _input_geometry(input_shape, image_size, overrides.pop("channels", 3))
    chosen_representation = "representation_size" in overrides
    config.update(overrides)
    config.update(
        image_size=image_size,
        channels=channels,
        include_top=include_top,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        include_preprocessing=include_preprocessing,
        name=name or _default_name(official_name),
    )
    if weights is None:
        return vision_transformer(input_tensor=input_tensor, **config)
    source = None
    if not str(weights).endswith(".weights.h5"):
        source = loading.read(weights, official_name, to_pair(image_size, "image size"))
        if not chosen_representation:
            # The pre-logits layer stays with the head it feeds; a new head (fine-tuning) drops it, as the official code.
            found = infer_config(source.arrays)
            keeps_head = include_top and found["classes"] == classes
            config["representation_size"] = found["representation_size"] if keeps_head else None
    model = vision_transformer(input_tensor=input_tensor, **config)
    vit = model if isinstance(model, VisionTransformer) else model.get_layer(config["name"])
    if source is None:
        source = loading.read(weights, official_name, like=vit)
    loading.assign(vit, source)
    return model


load_weights = loading.load_weights


def from_official_checkpoint(path, image_size=None, classes=None, include_top=True, **overrides):
    """Builds the model a checkpoint describes and loads it; no other argument is needed.

    ``path``: an official ``.npz``, a keras_vit ``.keras`` file or an URL.
    The architecture (hidden size, layers, heads, MLP size, patch size,
    classifier, representation size, classes, image size from the
    position-embedding grid) is inferred from the arrays. ``image_size``,
    ``classes``, ``patch_size`` and ``channels`` may differ from the
    checkpoint's (adapted, see ``keras_vit.pretrained.adapt``). Other keyword
    arguments are ``VisionTransformer`` arguments.
    """
    source = loading.read(path)
    config = infer_config(source.arrays)
    if config["image_size"] is None and source.grid is not None:
        stride = token_stride(config)
        config["image_size"] = (source.grid[0] * stride[0], source.grid[1] * stride[1])
    if image_size is None and config["image_size"] is None:
        raise ValueError(f"{path} has a rectangular position-embedding grid: pass image_size=(height, width).")
    if include_top and classes is None and config["classes"] is None:
        raise ValueError(f"{path} has no head: pass classes=K for a new head, or include_top=False.")
    if not (include_top and classes in (None, config["classes"])):
        config["representation_size"] = None  # a new head or none: the pre-logits layer goes too
    config.update(
        image_size=image_size or config["image_size"],
        classes=classes or config["classes"] or 1000,
        include_top=include_top,
        name=Path(str(path)).stem.replace(".", "_"),
    )
    config.update(overrides)
    return loading.assign(vision_transformer(**config), source)


def resize_model(model, image_size, patch_size=None):
    """The same model at another resolution (and patch size), a new ``VisionTransformer``.

    Rebuilds from the model's configuration at ``image_size`` and loads the
    weights through the loading pipeline: position embeddings interpolated the
    official way, the patch kernel resampled (FlexiViT) when ``patch_size`` is
    given. A plain functional model from an older keras_vit ``.keras`` file is
    accepted (its configuration is read off its weights). ``model`` is unchanged.
    """
    if isinstance(model, VisionTransformer):
        config = model.vit_config
        config["name"] = model.name
    else:  # a keras_vit model saved before VisionTransformer existed
        config = infer_config(model_arrays(model))
        config.update(include_top=config["classes"] is not None, classes=config["classes"] or 1000, name=model.name)
    config["image_size"] = to_pair(image_size, "image size")
    if patch_size is not None:
        config["patch_size"] = to_pair(patch_size, "patch size")
    source = loading.Source(model_arrays(model), f"model {model.name}", model_geometry(model)[0])
    return loading.assign(VisionTransformer(**config), source)


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
        overrides ``image_size``. Each side a multiple of {stride}.
    pooling: with ``include_top=False``: ``None`` (the token sequence
        (B, T, {hidden})), ``"token"`` (the class token), ``"avg"`` or ``"max"``
        over the patch tokens ((B, {hidden})). ``"gap"`` is accepted for ``"avg"``.
    classes: number of classes of the head.
    classifier_activation: activation of the head (``None``: logits,
        ``"softmax"``: probabilities).
    include_preprocessing: whether the model maps pixels in [0, 255] to
        [-1, 1] itself (``(x - 127.5) / 127.5``). Default False: inputs are
        in [-1, 1] (``keras_vit.preprocess_input``).
    name: the model's name (default ``"{official}"``).
    image_size: int or (height, width), default 224, when ``input_shape`` is not given.
    **overrides: configuration overrides such as ``dropout_rate``,
        ``stochastic_depth_rate``, ``representation_size``, ``classifier``.

Returns:
    A ``keras_vit.VisionTransformer``.
"""


def _document(function, official):
    config = configs.model_config(official)
    stem = f"ResNet stages {tuple(config['resnet_layers'])}, " if "resnet_layers" in config else ""
    description = (
        f"{stem}hidden size {config['hidden_size']}, {config['num_layers']} layers, {config['num_heads']} heads, "
        f"MLP {config['mlp_dim']}, patch {config['patch_size']}"
    )
    stride = token_stride(config)[0]
    families = families_for(official)
    function.__doc__ = _CONSTRUCTOR_DOC.format(
        official=official,
        description=description,
        stride=stride,
        hidden=config["hidden_size"],
        families=", ".join(f'``"{f}"``' for f in families) if families else "none released for this model",
        weights_note="" if families else "No official weights were released for it.",
    )
    return function


def ViT_Ti16(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
             classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("ViT-Ti_16", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def ViT_S16(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
            classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("ViT-S_16", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def ViT_S32(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
            classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("ViT-S_32", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def ViT_B8(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
           classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("ViT-B_8", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def ViT_B16(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
            classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("ViT-B_16", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def ViT_B32(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
            classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("ViT-B_32", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def ViT_L16(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
            classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("ViT-L_16", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def ViT_L32(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
            classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("ViT-L_32", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def ViT_H14(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
            classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("ViT-H_14", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def R_ViT_Ti16(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
               classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("R+ViT-Ti_16", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def R26_ViT_S32(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
                classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("R26+ViT-S_32", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def R26_ViT_B32(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
                classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("R26+ViT-B_32", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def R50_ViT_B16(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
                classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("R50+ViT-B_16", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


def R50_ViT_L32(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=1000,
                classifier_activation=None, include_preprocessing=False, name=None, image_size=224, **overrides):
    return create_model("R50+ViT-L_32", include_top, weights, input_tensor, input_shape, pooling, classes,
                        classifier_activation, include_preprocessing, name, image_size, **overrides)


for _function, _official in (
    (ViT_Ti16, "ViT-Ti_16"), (ViT_S16, "ViT-S_16"), (ViT_S32, "ViT-S_32"), (ViT_B8, "ViT-B_8"),
    (ViT_B16, "ViT-B_16"), (ViT_B32, "ViT-B_32"), (ViT_L16, "ViT-L_16"), (ViT_L32, "ViT-L_32"),
    (ViT_H14, "ViT-H_14"), (R_ViT_Ti16, "R+ViT-Ti_16"), (R26_ViT_S32, "R26+ViT-S_32"),
    (R26_ViT_B32, "R26+ViT-B_32"), (R50_ViT_B16, "R50+ViT-B_16"), (R50_ViT_L32, "R50+ViT-L_32"),
):
    _document(_function, _official)
del _function, _official
