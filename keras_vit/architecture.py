"""One description of a ViT's architecture, ``Architecture``: what the builder builds, what a checkpoint must
hold, how position embeddings and heads are laid out. The model builder, ``keras_vit.pretrained`` (inference
from files, adaptation), the command-line tools and the tuner all read it; none re-derives any of it.

It is made from the builder's arguments (``from_arguments``), which are also what a saved model's config holds.
Every argument is checked here, once, with an error that names it.
"""

import dataclasses
import difflib
import numbers

import numpy as np

from keras_vit.layers.common import GELU_FORMS, to_pair
from keras_vit.layers.heads import POOLINGS as POOLING_KINDS
from keras_vit.resnet import stem_stride

POSEMBS = ("learn", "sincos2d")


def classifiers():
    """Every pooling kind is a classifier (only "token" has a class token); "unpooled" has neither pooling nor head."""
    return (*POOLING_KINDS, "unpooled")


def poolings():
    """keras.applications pooling names ("avg" = the official "gap"), plus every pooling kind."""
    return (None, "avg", *POOLING_KINDS)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A ViT's structure. Tokens are laid out as ``prefix_tokens`` (class token, registers), then the grid.

    Attributes:
        image_size: (height, width) of the input in pixels; None for a side that may vary from call to call.
        native_image_size: (height, width) the learned position-embedding table is laid out for (the image size
            of a fixed-size model); other sizes resample the table on the fly.
        dynamic_padding: whether inputs whose sides are not multiples of the token stride are padded (zeros at
            the bottom and right, timm's ``dynamic_img_pad``) instead of refused.
        patch_size: (height, width) of a patch (on a hybrid's feature map).
        hidden_size, num_layers, num_heads, mlp_dim: D, L, N, M.
        channels: input channels.
        prefix_tokens: ``((kind, count), ...)`` in order, kinds of ``keras_vit.layers.PREFIX_TOKENS``.
        posemb: "learn" (a learned (1, rows, D) table) or "sincos2d" (fixed, computed).
        posemb_class_token: whether the class token has a learned position-embedding row (the 2020 models) or
            the table covers the grid only and is added before any prefix token (big_vision).
        pooling: a kind of ``keras_vit.layers.POOLINGS`` ("token", "gap", "max", "map"), or None for the tokens.
        representation_size: R of the ``pre_logits`` layer (Dense + tanh after pooling), or None.
        classes: K of the classifier ``head``, or None without one.
        gelu: "tanh" or "erf".
        resnet_layers, resnet_width_factor: a hybrid's ResNet stem (None: a plain ViT).
    """

    image_size: tuple
    patch_size: tuple
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    channels: int = 3
    prefix_tokens: tuple = (("class", 1),)
    posemb: str = "learn"
    posemb_class_token: bool = True
    pooling: str | None = "token"
    representation_size: int | None = None
    classes: int | None = 1000
    gelu: str = "tanh"
    resnet_layers: tuple | None = None
    resnet_width_factor: float = 1
    native_image_size: tuple | None = None
    dynamic_padding: bool = False

    def __post_init__(self):
        if self.native_image_size is None and None not in self.image_size:
            object.__setattr__(self, "native_image_size", self.image_size)

    @classmethod
    def from_arguments(cls, image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
                       mlp_dim=3072, classifier="token", representation_size=None, include_top=True, classes=1000,
                       pooling=None, num_register_tokens=0, posemb="learn", posemb_class_token=True, gelu="tanh",
                       channels=3, resnet_layers=None, resnet_width_factor=1, native_image_size=None,
                       dynamic_padding=False):
        """The architecture of ``VisionTransformer(**arguments)`` (see its arguments); checks every one."""
        if classifier not in classifiers():
            raise ValueError(f"classifier must be one of {classifiers()}, got {classifier!r}.")
        if pooling not in poolings():
            raise ValueError(f"pooling must be one of {poolings()}, got {pooling!r}.")
        if include_top and classifier == "unpooled":
            raise ValueError("classifier='unpooled' has no head: build it with include_top=False.")
        if not include_top and pooling == "token" and classifier != "token":
            raise ValueError(f"pooling='token' needs a class token, but classifier={classifier!r} has none; use 'avg'.")
        if representation_size and not include_top and pooling is None:
            raise ValueError("representation_size applies to a pooled vector: set pooling='token', 'avg', 'max' or 'map'.")
        _check_int("num_register_tokens", num_register_tokens, minimum=0)
        for name, value in (("include_top", include_top), ("posemb_class_token", posemb_class_token),
                            ("dynamic_padding", dynamic_padding)):
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {value!r}.")
        if include_top and classes is None:
            raise ValueError("classes must be a positive int with include_top=True, got None: give the number of "
                             "classes, or build with include_top=False.")
        prefix = ((("class", 1),) if classifier == "token" else ()) + (
            (("register", num_register_tokens),) if num_register_tokens else ()
        )
        arch = cls(
            image_size=_pair("image_size", image_size, dynamic=True),
            patch_size=_pair("patch_size", patch_size),
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            channels=channels,
            prefix_tokens=prefix,
            posemb=posemb,
            # meaningful only for a learned table and a class token; True otherwise, so that equal models compare equal
            posemb_class_token=bool(posemb_class_token) or not (posemb == "learn" and classifier == "token"),
            pooling=(None if classifier == "unpooled" else classifier) if include_top else {"avg": "gap"}.get(pooling, pooling),
            representation_size=representation_size or None,
            classes=classes if include_top else None,
            gelu=gelu,
            resnet_layers=None if resnet_layers is None else tuple(resnet_layers),
            resnet_width_factor=resnet_width_factor,
            native_image_size=None if native_image_size is None else _pair("native_image_size", native_image_size),
            dynamic_padding=bool(dynamic_padding),
        )
        arch.check()
        return arch

    def check(self):
        """Raises ``ValueError`` naming the first argument that cannot describe a ViT."""
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_dim", "channels"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}: "
                "choose a number of heads that divides the hidden size."
            )
        if self.classes is not None:
            _check_int("classes", self.classes, minimum=1, what="the number of head outputs")
        if self.representation_size is not None:
            _check_int("representation_size", self.representation_size, minimum=1)
        if self.posemb not in POSEMBS:
            raise ValueError(f"posemb must be one of {POSEMBS}, got {self.posemb!r}.")
        if self.posemb == "sincos2d" and self.hidden_size % 4:
            raise ValueError(f"posemb='sincos2d' needs a hidden_size that is a multiple of 4, got {self.hidden_size}.")
        if self.gelu not in GELU_FORMS:
            raise ValueError(f"gelu must be one of {GELU_FORMS}, got {self.gelu!r}.")
        if self.resnet_layers is not None:
            for units in self.resnet_layers:
                _check_int("resnet_layers", units, minimum=1, what="units per ResNet stage")
            if not isinstance(self.resnet_width_factor, numbers.Real) or self.resnet_width_factor <= 0:
                raise ValueError(f"resnet_width_factor must be a positive number, got {self.resnet_width_factor!r}.")
        if self.native_image_size is None:
            raise ValueError(
                f"image_size={self.image_size} leaves a side open: give native_image_size=(height, width), the size "
                "the position embeddings are laid out for (keras.applications-style constructors take image_size)."
            )
        stride = self.token_stride
        sizes = [("image_size", size) for size in self.image_size if size is not None and not self.dynamic_padding]
        sizes += [("native_image_size", size) for size in self.native_image_size]
        for (name, size), side, step in zip(sizes, ("height", "width") * 2, stride * 2):
            if size < step or size % step:
                multiple = max(size // step, 1) * step
                raise ValueError(
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
        return int(self.posemb == "learn" and self.class_token and self.posemb_class_token)

    @property
    def posemb_shape(self):
        """Shape of the learned table (1, rows, D); None for fixed embeddings."""
        if self.posemb != "learn":
            return None
        return (1, self.posemb_prefix_rows + self.posemb_grid[0] * self.posemb_grid[1], self.hidden_size)

    @property
    def num_tokens(self):
        """T, the length of the token sequence; None when a side varies."""
        return None if self.dynamic else self.num_prefix_tokens + self.grid[0] * self.grid[1]

    def replace(self, **changes):
        """A checked copy with ``changes``."""
        arch = dataclasses.replace(self, **changes)
        arch.check()
        return arch


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
        raise ValueError(f"{name} must be an int or (height, width) of ints{allowed}, got {value!r}.") from None
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}.")
    return pair


def _check_int(name, value, minimum, what=None):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        bound = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {bound}{f' ({what})' if what else ''}, got {value!r}.")


def unknown_arguments_error(unknown, valid, where):
    """A ``TypeError`` for keyword arguments ``where`` does not take, suggesting the closest valid names."""
    parts = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, valid, n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return TypeError(f"{where} got unexpected keyword argument(s) {', '.join(parts)}. Valid: {', '.join(sorted(valid))}.")
