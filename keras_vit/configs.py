"""The ViT variant table and model-name parsing.

A model name is decoded into the keyword arguments of
``keras_vit.vision_transformer``. Two spellings are accepted:

* the official names of google-research/vision_transformer, e.g.
  ``"ViT-B_16"``, ``"ViT-S_16-gap-norep"``;
* short forms, e.g. ``"B/16"``, ``"Ti/16"``, ``"S/32-gap"``.

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

_WIDTHS = "|".join(VARIANTS)
_NAME_PATTERNS = (
    re.compile(rf"^ViT-(?P<width>{_WIDTHS})_(?P<patch>\d+)(?P<options>(-[a-z]+)*)$"),
    re.compile(rf"^(?P<width>{_WIDTHS})/(?P<patch>\d+)(?P<options>(-[a-z]+)*)$"),
)
_OPTIONS = {
    "gap": {"classifier": "gap"},
    "token": {"classifier": "token"},
    "norep": {"representation_size": None},
}


def list_models():
    """Returns the official model names, e.g. ``["ViT-Ti_16", ..., "ViT-H_14"]``."""
    return list(OFFICIAL_MODELS)


def _name_error(name, reason):
    return ValueError(
        f"Unknown model name {name!r} ({reason}). Valid names are the official ones "
        f"{', '.join(OFFICIAL_MODELS)}, optionally followed by -gap, -token or -norep "
        "(e.g. 'ViT-B_16-gap-norep'), or short forms such as 'B/16', 'Ti/16', 'S/32-gap'."
    )


def model_config(name):
    """Decodes a model name into ``vision_transformer`` keyword arguments.

    >>> model_config("S/32-gap")["classifier"]
    'gap'

    Returns a dict with ``patch_size``, ``hidden_size``, ``num_layers``,
    ``num_heads``, ``mlp_dim``, ``classifier``, ``representation_size`` and
    ``name`` (the official spelling, e.g. ``"ViT-S_32-gap"``).
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
    config["name"] = f"ViT-{match['width']}_{match['patch']}" + "".join(f"-{o}" for o in options)
    return config
