"""One description of a ViT's architecture, ``Architecture``: what the builder builds, what a checkpoint must
hold, how position embeddings and heads are laid out. The model builder, ``keras_vit.pretrained`` (inference
from files, adaptation), the command-line tools and the tuner all read it; none re-derives any of it.

Its fields are the builder's structural arguments, each declared once (``keras_vit.arguments.argument``: default,
documentation, check); ``ModelOptions`` declares the others (regularization, remat, the head's activation,
preprocessing, labels). The builder's signature, config, unknown-argument suggestions and documentation derive
from these two declarations. Every argument is checked here, once, with an error that names it.
"""

import dataclasses
import numbers

import keras

from keras_vit import arguments as args
from keras_vit import configs
from keras_vit.arguments import ArgumentError, argument
from keras_vit.layers.common import GELU_FORMS, LAYER_NORM_EPSILON, to_pair
from keras_vit.layers.embedding import POSEMB_INTERPOLATIONS
from keras_vit.layers.embedding import POSEMBS as POSEMB_KINDS
from keras_vit.layers.heads import POOLINGS as POOLING_KINDS
from keras_vit.layers.tokens import PREFIX_TOKENS
from keras_vit.preprocessing import input_settings
from keras_vit.resnet import stem_stride


def classifiers():
    """Every pooling kind is a classifier (only "token" has a class token); "unpooled" has neither pooling nor head."""
    return (*POOLING_KINDS, "unpooled")


def poolings():
    """keras.applications pooling names ("avg" = the official "gap"), plus every pooling kind."""
    return (None, "avg", *POOLING_KINDS)


def posembs():
    """The position-embedding kinds (``keras_vit.layers.embedding.POSEMBS``)."""
    return tuple(POSEMB_KINDS)


def _size(name, value):
    _pair(name, value, dynamic=True)


def _resnet_layers(name, value):
    if value is not None:
        for units in value:
            args.positive_int("units per ResNet stage")(name, units)


def _positive_number(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise ArgumentError(name, value, "a positive number")


def _width_factor(name, value):
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value <= 0:
        raise ArgumentError(name, value, "a positive number")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A ViT's structure, made from the builder's structural arguments (its fields, each declared once).

    Resolved on creation: sizes as (height, width) pairs; ``pooling`` as the pooling kind the model applies
    (the classifier's with a head, None for the token sequence; "avg" is "gap"); ``classes`` None without a
    head; ``posemb_class_token`` True where it has no meaning (so that equal models compare equal);
    ``native_image_size`` the image size of a fixed-size model. Tokens are laid out as ``prefix_tokens``
    (``((kind, count), ...)`` of ``keras_vit.layers.PREFIX_TOKENS``, derived from the registry), then the grid.
    """

    image_size: tuple = argument(224, "int or (height, width); each a multiple of the token stride (None for a "
                                 "side of any size, with native_image_size).", check=_size)
    patch_size: tuple = argument(16, "int or (height, width).", check=lambda name, value: _pair(name, value))
    hidden_size: int = argument(768, "D, the width of the tokens.", check=args.positive)
    num_layers: int = argument(12, "L, the number of Transformer blocks.", check=args.positive)
    num_heads: int = argument(12, "N, attention heads (dividing D).", check=args.positive)
    mlp_dim: int = argument(3072, "M, the hidden size of each block's MLP.", check=args.positive)
    classifier: str = argument("token", "`\"token\"` (class token, read at position 0), `\"gap\"` (mean of the grid "
                               "tokens), `\"max\"`, `\"map\"` (big_vision's attention pooling) or `\"unpooled\"` (no "
                               "pooling; needs include_top=False).", check=args.choice(classifiers), given=True,
                               compare=False)  # its effect: prefix_tokens and pooling
    representation_size: int = argument(None, "adds the official pre-logits layer (Dense + tanh) of this size "
                                        "before the head.", given=True)
    include_top: bool = argument(True, "whether to add the classification head `head`.", check=args.boolean,
                                 compare=False)  # its effect: classes
    classes: int = argument(1000, "number of head outputs.", given=True)
    pooling: str = argument(None, "with include_top=False: None (token sequence), `\"token\"`, `\"avg\"` (alias "
                            "`\"gap\"`), `\"max\"` or `\"map\"`; the classifier decides with a head.",
                            check=args.choice(poolings), given=True)
    num_register_tokens: int = argument(0, "K learned register tokens after the class token (no position "
                                        "embedding; no head reads them).", check=args.count,
                                        compare=False)  # its effect: prefix_tokens
    posemb: str = argument("learn", "`\"learn\"` (learned table, the 2020 models) or `\"sincos2d\"` (fixed 2-D "
                           "sin-cos, big_vision's).", check=args.choice(posembs))
    posemb_class_token: bool = argument(True, "with a learned table and a class token: whether the class token has "
                                        "a row (the 2020 models) or the table covers the grid only (big_vision).",
                                        check=args.boolean, given=True)
    gelu: str = argument("tanh", "`\"tanh\"` (official approximation), `\"erf\"` (exact) or `\"quick\"` (OpenAI "
                         "CLIP's x * sigmoid(1.702 x)).", check=args.choice(lambda: GELU_FORMS))
    channels: int = argument(3, "input channels.", check=args.positive)
    resnet_layers: tuple = argument(None, "units per stage of a hybrid's ResNet stem, e.g. (3, 4, 9); () the root "
                                    "alone; None a plain ViT (the patch size then applies to the feature map).",
                                    check=_resnet_layers)
    resnet_width_factor: float = argument(1, "ResNet width = 64 x this factor.", check=_width_factor)
    native_image_size: tuple = argument(None, "the (height, width) the learned position embeddings are laid out "
                                        "for, when image_size leaves a side open.")
    dynamic_padding: bool = argument(False, "pad inputs whose sides are not multiples of the token stride (zeros at "
                                     "the bottom and right, timm's dynamic_img_pad) instead of refusing them.",
                                     check=args.boolean)
    pre_norm: bool = argument(False, "a LayerNorm `pre_norm` on the tokens before the first block (timm's norm_pre, "
                              "CLIP's ln_pre); the patch embedding then has no bias, as in timm.", check=args.boolean)
    fc_norm: bool = argument(False, "the final LayerNorm after pooling (`fc_norm`, timm's) in place of the one on "
                             "the tokens (`encoder_norm`): features()[\"tokens\"] are then un-normed.",
                             check=args.boolean)
    layer_scale: float = argument(None, "LayerScale's initial value (timm's init_values; DINOv2's 1e-5): each block "
                                  "scales its two branches per channel (`LayerScale_0`, `LayerScale_1`); None: none.",
                                  check=args.optional(_positive_number))
    qkv_bias: bool = argument(True, "biases on the query, key and value projections.", check=args.boolean)
    qk_norm: bool = argument(False, "a LayerNorm over each head's queries and keys (`query_ln`, `key_ln`) before "
                             "their product.", check=args.boolean)
    layer_norm_epsilon: float = argument(LAYER_NORM_EPSILON, "epsilon of every LayerNorm (1e-6 in the official "
                                         "models, 1e-5 in CLIP's).", check=_positive_number)
    posemb_interpolation: str = argument("bilinear", "how the learned table is resampled to another grid (loading at "
                                         "another size, a model of any size): `\"bilinear\"` (the official "
                                         "interpolation, aligned corners) or `\"bicubic\"` (timm's "
                                         "resample_abs_pos_embed: antialiased bicubic).",
                                         check=args.choice(lambda: POSEMB_INTERPOLATIONS))
    prefix_tokens: tuple = dataclasses.field(init=False)

    def __post_init__(self):
        self._check_arguments()
        pooling = (None if self.classifier == "unpooled" else self.classifier) if self.include_top else \
            {"avg": "gap"}.get(self.pooling, self.pooling)
        native = None if self.native_image_size is None else _pair("native_image_size", self.native_image_size)
        image_size = _pair("image_size", self.image_size, dynamic=True)
        resolved = dict(
            image_size=image_size,
            patch_size=_pair("patch_size", self.patch_size),
            classes=self.classes if self.include_top else None,
            pooling=pooling,
            representation_size=self.representation_size or None,
            resnet_layers=None if self.resnet_layers is None else tuple(self.resnet_layers),
            native_image_size=image_size if native is None and None not in image_size else native,
            dynamic_padding=bool(self.dynamic_padding),
            include_top=bool(self.include_top),
        )
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        # meaningful only for a learned table and a class token; True otherwise, so that equal models compare equal
        class_row = POSEMB_KINDS[self.posemb].learned and self.classifier == "token"
        object.__setattr__(self, "posemb_class_token", bool(self.posemb_class_token) or not class_row)
        object.__setattr__(self, "prefix_tokens", tuple(
            (kind, entry.count(self)) for kind, entry in PREFIX_TOKENS.items() if entry.count(self)))
        self.check()

    def _check_arguments(self):
        """Every argument's declared check, then the rules that tie arguments together (on the values as given)."""
        args.check_declared(self)
        if self.include_top and self.classifier == "unpooled":
            raise ArgumentError("classifier", "unpooled", "a pooling with include_top=True",
                                "classifier='unpooled' has no head: build it with include_top=False.")
        if not self.include_top and self.pooling == "token" and self.classifier != "token":
            raise ArgumentError("pooling", "token", "a pooling of the grid tokens without a class token",
                                f"pooling='token' needs a class token, but classifier={self.classifier!r} has none; "
                                "use 'avg'.")
        if self.representation_size and not self.include_top and self.pooling is None:
            raise ArgumentError("representation_size", self.representation_size, "None without pooling",
                                "representation_size applies to a pooled vector: set pooling='token', 'avg', 'max' "
                                "or 'map'.")
        if self.include_top and self.classes is None:
            raise ArgumentError("classes", None, "a positive int with include_top=True",
                                "classes must be a positive int with include_top=True, got None: give the number of "
                                "classes, or build with include_top=False.")

    @classmethod
    def from_arguments(cls, **arguments):
        """The architecture of ``VisionTransformer(**arguments)`` (its structural arguments); checks every one."""
        return cls(**arguments)

    @classmethod
    def arguments(cls):
        """The names of the structural builder arguments (the declared fields)."""
        return tuple(field.name for field in args.declared(cls))

    def check(self):
        """Raises ``ValueError`` naming the first argument that cannot describe a ViT."""
        if self.hidden_size % self.num_heads:
            raise ArgumentError(
                "num_heads", self.num_heads, f"a divisor of hidden_size {self.hidden_size}",
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}: "
                "choose a number of heads that divides the hidden size."
            )
        if self.classes is not None:
            args.positive_int("the number of head outputs")("classes", self.classes)
        if self.representation_size is not None:
            args.positive("representation_size", self.representation_size)
        if POSEMB_KINDS[self.posemb].check is not None:
            POSEMB_KINDS[self.posemb].check(self)
        if self.native_image_size is None:
            raise ArgumentError(
                "native_image_size", None, "(height, width) when image_size leaves a side open",
                f"image_size={self.image_size} leaves a side open: give native_image_size=(height, width), the size "
                "the position embeddings are laid out for (keras.applications-style constructors take image_size)."
            )
        stride = self.token_stride
        sizes = [("image_size", size) for size in self.image_size if size is not None and not self.dynamic_padding]
        sizes += [("native_image_size", size) for size in self.native_image_size]
        for (name, size), side, step in zip(sizes, ("height", "width") * 2, stride * 2):
            if size < step or size % step:
                multiple = max(size // step, 1) * step
                raise ArgumentError(
                    name, getattr(self, name), f"{side} a multiple of the token stride {step}",
                    f"Image {side} {size} ({name}) is not a multiple of the token stride {step} (patch size"
                    f"{' x ResNet stride' if self.resnet_layers is not None else ''}): use {multiple}"
                    + (f" or {multiple + step}" if size > step else "")
                    + (", or dynamic_padding=True" if name == "image_size" else "") + "."
                )

    # --- derived ----------------------------------------------------------------------------------------------

    @property
    def class_token(self):
        """Whether the first token is a class token."""
        return bool(self.prefix_tokens) and self.prefix_tokens[0][0] == "class"

    @property
    def num_prefix_tokens(self):
        """Tokens before the grid tokens (class token and registers)."""
        return sum(count for _, count in self.prefix_tokens)

    @property
    def token_stride(self):
        """Image pixels per token, (rows, columns): patch size x ResNet stride."""
        return token_stride(self.patch_size, self.resnet_layers)

    @property
    def dynamic(self):
        """Whether a side of the input may vary (then the learned table is resampled for other sizes)."""
        return None in self.image_size

    @property
    def grid(self):
        """The token grid (gh, gw); None for a side that varies (see ``grid_for``)."""
        return self.grid_for(*self.image_size)

    def grid_for(self, height, width):
        """The token grid (gh, gw) of an input of ``height`` x ``width`` pixels (None stays None)."""
        def side(size, step):
            if size is None:
                return None
            return -(-size // step) if self.dynamic_padding else size // step

        return tuple(side(size, step) for size, step in zip((height, width), self.token_stride))

    @property
    def posemb_grid(self):
        """The grid the learned position-embedding table is laid out for (``native_image_size`` / stride)."""
        return tuple(size // step for size, step in zip(self.native_image_size, self.token_stride))

    @property
    def posemb_prefix_rows(self):
        """Rows of the learned position-embedding table before the grid rows: 1 for the 2020 class token, else 0."""
        return int(self.posemb_learned and self.class_token and self.posemb_class_token)

    @property
    def posemb_learned(self):
        """Whether the position embeddings are a learned table (weights in checkpoints) rather than computed."""
        return POSEMB_KINDS[self.posemb].learned

    @property
    def posemb_shape(self):
        """Shape of the learned table (1, rows, D); None for fixed embeddings."""
        if not self.posemb_learned:
            return None
        return (1, self.posemb_prefix_rows + self.posemb_grid[0] * self.posemb_grid[1], self.hidden_size)

    @property
    def num_tokens(self):
        """T, the length of the token sequence; None when a side varies."""
        return None if self.dynamic else self.num_prefix_tokens + self.grid[0] * self.grid[1]

    def replace(self, **changes):
        """A checked copy with ``changes``."""
        return dataclasses.replace(self, **changes)


def _preprocessing(name, value):
    try:
        input_settings(value)
    except ValueError as error:
        raise ArgumentError(name, value, "None or a dict of mean, std, interpolation, crop_pct, crop_mode",
                            str(error)) from None


def _preprocessing_config(value):
    """The preprocessing a config stores: given keys only, mean and std as lists (JSON)."""
    if value is None:
        return None
    return {key: list(v) if isinstance(v, tuple) else v for key, v in dict(value).items()}


def _activation_config(activation):
    """A head activation as a config stores it: a name as given, a function by Keras' serialization."""
    return activation if isinstance(activation, str) else keras.activations.serialize(keras.activations.get(activation))


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The builder's arguments besides the structure: regularization, remat, the head's activation, preprocessing,
    labels and the variant. Each declared once, as ``Architecture``'s fields are."""

    classifier_activation: str = argument(None, "activation of the head; None gives logits (e.g. `\"softmax\"`).",
                                          given=True, to_config=_activation_config)
    include_preprocessing: bool = argument(False, "adds the weights' normalization as the first layer (`(x - 127.5) "
                                           "/ 127.5` for the official ones, see preprocessing), so the model takes "
                                           "pixels in [0, 255] (default: [-1, 1]).", check=args.boolean)
    preprocessing: dict = argument(None, "the input pipeline the weights expect, stored with the model: `mean`, "
                                   "`std` (of pixels / 255, per channel), `interpolation`, `crop_pct`, `crop_mode` "
                                   "as timm's pretrained_cfg has them (loading timm weights sets it); None: the "
                                   "official one, mean = std = 0.5. include_preprocessing and "
                                   "preprocess_input(images, model=model) normalize with it.",
                                   check=_preprocessing, to_config=_preprocessing_config)
    dropout_rate: float = argument(0.0, "dropout after the position embeddings, the attention output and both MLP "
                                   "layers (official placement).", check=args.rate)
    attention_dropout_rate: float = argument(0.0, "dropout on the attention weights.", check=args.rate)
    stochastic_depth_rate: float = argument(0.0, "drop-path rate of the last block; block i uses "
                                            "rate * i / (num_layers - 1).", check=args.rate)
    remat: bool = argument(False, "gradient checkpointing of every Transformer block in training.")
    variant: str = argument(None, "the official variant this geometry is (e.g. `\"ViT-B_16\"`, picks weights "
                            "families); inferred when None.")
    class_names: list = argument(None, "the K class names, stored with the model (decode_predictions reads them).")

    def __post_init__(self):
        args.check_declared(self)

    def resolved_for(self, arch):
        """``(variant, class_names)`` of a model of ``arch``: the official variant of its geometry (a ``variant``
        given must be it) and ``class_names`` as a list of str, one per class (None when not given)."""
        found = configs.variant_of(arch)
        if self.variant is not None and self.variant != found:
            raise ArgumentError("variant", self.variant, f"the variant of this geometry ({found or 'no official variant'})",
                                f"variant={self.variant!r} does not describe this geometry "
                                f"({found or 'no official variant'}): leave it None, it is inferred.")
        names = self.class_names
        if names is None:
            return found, None
        if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
            raise ArgumentError("class_names", names, "a list of names, one per class")
        names = [str(name) for name in names]
        if arch.classes is not None and len(names) != arch.classes:
            raise ArgumentError("class_names", names, f"{arch.classes} names (one per class)",
                                f"class_names has {len(names)} names for {arch.classes} classes.")
        return found, names


def token_stride(patch_size, resnet_layers=None):
    """Image pixels per token, (rows, columns), of a patch size (int or pair) on a hybrid's ResNet (or none)."""
    patch = to_pair(patch_size, "patch size")
    stride = 1 if resnet_layers is None else stem_stride(resnet_layers)
    return (patch[0] * stride, patch[1] * stride)


def _pair(name, value, dynamic=False):
    """``value`` as (height, width) of positive ints (None allowed when ``dynamic``)."""
    if dynamic and value is not None and not isinstance(value, int):
        try:
            pair = tuple(value)
        except TypeError:
            pair = ()
        if len(pair) == 2 and None in pair:
            fixed = [side for side in pair if side is not None]
            return tuple(pair) if not fixed or _pair(name, fixed * 2) else pair
    try:
        pair = to_pair(value, name)
    except ValueError:
        allowed = " (None for a side that varies)" if dynamic else ""
        raise ArgumentError(name, value, f"an int or (height, width) of ints{allowed}") from None
    if min(pair) < 1:
        raise ArgumentError(name, value, "positive")
    return pair
