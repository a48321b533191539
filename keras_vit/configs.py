"""The ViT variant table and model-name parsing.

A model name is decoded into the keyword arguments of
``keras_vit.vision_transformer``. Two spellings are accepted:

* the official names of google-research/vision_transformer, e.g.
  ``"ViT-B_16"``, ``"ViT-S_16-gap-norep"``, hybrids ``"R50+ViT-B_16"``;
* short forms, e.g. ``"B/16"``, ``"Ti/16"``, ``"S/32-gap"``, ``"R50+B/16"``.

For hybrids the number after the width is the effective patch size on the
image (ResNet stride x patch size on the feature map).

Options after the name, separated by ``-``: ``gap`` (global average pooling,
no class token), ``token`` (class token, the default) and ``norep`` (no
pre-logits layer, the default of the official configs).
"""

import re

# width name: (hidden_size, num_layers, num_heads, mlp_dim), as in the paper's Table 1
# (Ti and S from the AugReg follow-up, as in the official configs).
VARIANTS = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}

# The configurations the official code registers, in table order.
OFFICIAL_MODELS = (
    "ViT-Ti_16",
    "ViT-S_16",
    "ViT-S_32",
    "ViT-B_8",
    "ViT-B_16",
    "ViT-B_32",
    "ViT-L_16",
    "ViT-L_32",
    "ViT-H_14",
)
# Patch-14 geometries of widths the official code registers only at other patch sizes: the DINOv2 (S, B, L) and
# CLIP (L) weights of timm (keras_vit.pretrained.registry).
TIMM_MODELS = ("ViT-S_14", "ViT-B_14", "ViT-L_14")

# Hybrids (seed, "Hybrid Architecture"): (ResNet prefix, width, effective patch) ->
# (units per ResNet stage, patch size on the feature map). R50+ViT-B_16 is the seed's option 2 (stage 4
# removed, its units moved to stage 3); R50+ViT-L_32 is option 1 (a regular ResNet-50's four stages).
HYBRIDS = {
    ("R", "Ti", 16): ((), 8),
    ("R26", "S", 32): ((2, 2, 2, 2), 1),
    ("R26", "B", 32): ((2, 2, 2, 2), 1),
    ("R50", "B", 16): ((3, 4, 9), 1),
    ("R50", "L", 32): ((3, 4, 6, 3), 1),
}
OFFICIAL_HYBRIDS = tuple(f"{r}+ViT-{w}_{p}" for r, w, p in HYBRIDS)

_WIDTHS = "|".join(VARIANTS)
_RESNET = r"(?:(?P<resnet>R\d*)\+)?"
_NAME_PATTERNS = (
    re.compile(rf"^{_RESNET}ViT-(?P<width>{_WIDTHS})_(?P<patch>\d+)(?P<options>(-[a-z]+)*)$"),
    re.compile(rf"^{_RESNET}(?P<width>{_WIDTHS})/(?P<patch>\d+)(?P<options>(-[a-z]+)*)$"),
)
_OPTIONS = {
    "gap": {"classifier": "gap"},
    "token": {"classifier": "token"},
    "norep": {"representation_size": None},
}


def variant_of(arch):
    """The official name of an ``Architecture``'s geometry (``"ViT-B_16"``, ``"R50+ViT-B_16"``), or None.

    Width, depth, heads, MLP size and token stride (and a hybrid's ResNet stages) decide; the classifier,
    image size and head do not (weights families are released per geometry).
    """
    shape = (arch.hidden_size, arch.num_layers, arch.num_heads, arch.mlp_dim)
    width = next((name for name, value in VARIANTS.items() if value == shape), None)
    stride = arch.token_stride
    if width is None or stride[0] != stride[1]:
        return None
    if arch.resnet_layers is None:
        name = f"ViT-{width}_{stride[0]}"
        return name if name in OFFICIAL_MODELS + TIMM_MODELS else None
    for (resnet, hybrid_width, patch), (units, map_patch) in HYBRIDS.items():
        same = (hybrid_width, patch, tuple(units), map_patch) == (width, stride[0], tuple(arch.resnet_layers), arch.patch_size[0])
        if same and arch.resnet_width_factor == 1:
            return f"{resnet}+ViT-{width}_{patch}"
    return None


def list_models():
    """Returns the model names, official plain, then hybrid, then the patch-14 variants of timm's weights:
    ``["ViT-Ti_16", ..., "R50+ViT-L_32", "ViT-S_14", "ViT-B_14", "ViT-L_14"]``."""
    return list(OFFICIAL_MODELS + OFFICIAL_HYBRIDS + TIMM_MODELS)


def _name_error(name, reason):
    return ValueError(
        f"Unknown model name {name!r} ({reason}). Valid names are the official ones "
        f"{', '.join(OFFICIAL_MODELS + OFFICIAL_HYBRIDS)} and timm's {', '.join(TIMM_MODELS)}, optionally followed "
        "by -gap, -token or -norep "
        "(e.g. 'ViT-B_16-gap-norep'), or short forms such as 'B/16', 'Ti/16', 'S/32-gap', 'R50+B/16'."
    )


def model_config(name):
    """Decodes a model name into ``vision_transformer`` keyword arguments.

    >>> model_config("S/32-gap")["classifier"]
    'gap'

    Returns a dict with ``patch_size``, ``hidden_size``, ``num_layers``,
    ``num_heads``, ``mlp_dim``, ``classifier``, ``representation_size``,
    ``name`` (the official spelling, e.g. ``"ViT-S_32-gap"``) and ``variant``
    (the official model without options, e.g. ``"ViT-S_32"``).
    """
    if not isinstance(name, str):
        raise TypeError(f"A model name must be a string, got {type(name).__name__}.")
    match = next((m for m in (p.match(name) for p in _NAME_PATTERNS) if m), None)
    if match is None:
        raise _name_error(name, "not of the form 'ViT-<width>_<patch>' or '<width>/<patch>'")
    hidden_size, num_layers, num_heads, mlp_dim = VARIANTS[match["width"]]
    config = {
        "patch_size": int(match["patch"]),
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "mlp_dim": mlp_dim,
        "classifier": "token",
        "representation_size": None,
    }
    options = [o for o in match["options"].split("-") if o]
    for option in options:
        if option not in _OPTIONS:
            raise _name_error(name, f"unknown option '-{option}'")
        config.update(_OPTIONS[option])
    if config["patch_size"] < 1:
        raise _name_error(name, "the patch size must be positive")
    prefix = ""
    if match["resnet"]:
        key = (match["resnet"], match["width"], config["patch_size"])
        if key not in HYBRIDS:
            raise _name_error(name, "not a released hybrid configuration")
        config["resnet_layers"], config["patch_size"] = HYBRIDS[key]
        config["resnet_width_factor"] = 1
        prefix = f"{match['resnet']}+"
    config["variant"] = f"{prefix}ViT-{match['width']}_{match['patch']}"
    config["name"] = config["variant"] + "".join(f"-{o}" for o in options)
    return config


def options_of(name):
    """The builder arguments that a model name's options set, e.g. ``{"classifier"}`` for ``"ViT-B_16-gap"``."""
    config = model_config(name)
    options = [o for o in config["name"][len(config["variant"]) :].split("-") if o]
    return {argument for option in options for argument in _OPTIONS[option]}
