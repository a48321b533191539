"""What a checkpoint describes: the ``VisionTransformer`` arguments inferred from its arrays alone."""

from keras_vit import configs
from keras_vit.architecture import Architecture, token_stride
from keras_vit.layers.heads import POOLINGS
from keras_vit.layers.tokens import PREFIX_TOKENS
from keras_vit.pretrained.names import BLOCK_KEY, POSEMB, UNIT_KEY, normalize_names
from keras_vit.pretrained.resample import square_grid



def pooling_in(arrays):
    """The pooling kind whose official scope has arrays in ``arrays`` (canonical names), or None."""
    return next((kind for kind, entry in POOLINGS.items()
                 if entry.official_scope and any(name.startswith(entry.official_scope + "/") for name in arrays)), None)


def infer_config(arrays):
    """Infers ``VisionTransformer`` keyword arguments from official checkpoint arrays alone.

    Returns hidden_size, num_layers, num_heads, mlp_dim, patch_size, channels, classifier ("token", or the
    pooling whose weights the file holds, e.g. "map", else "gap"), the prefix-token counts
    (``num_register_tokens``), posemb ("learn", or "sincos2d" when the file has no table),
    posemb_class_token, representation_size, classes (None without a head), image_size (from a square
    position-embedding grid; None for a rectangular one or fixed embeddings) and, for hybrids, resnet_layers
    (units per stage) and resnet_width_factor.
    """
    arrays = normalize_names(arrays)
    try:
        kernel = arrays["embedding/kernel"]
        query = arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
        mlp = arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"]
    except KeyError as error:
        raise ValueError(f"Not an official ViT checkpoint: it has no {error.args[0]!r} array.") from None
    blocks = {m[1] for m in map(BLOCK_KEY.match, arrays) if m}
    class_token = PREFIX_TOKENS["class"].official_name in arrays
    prefix_counts = {entry.argument: int(arrays[entry.official_name].shape[1])
                     for entry in PREFIX_TOKENS.values() if entry.argument and entry.official_name in arrays}
    posemb = arrays.get(POSEMB)
    grid, posemb_class_token = None, True
    if posemb is not None:
        rows = posemb.shape[1]
        for prefix_rows in ((1, 0) if class_token else (0,)):
            try:
                grid = square_grid(rows - prefix_rows)
                posemb_class_token = bool(prefix_rows) or not class_token
                break
            except ValueError:
                continue
    patch = tuple(int(p) for p in kernel.shape[:2])
    hybrid = {}
    if "conv_root/kernel" in arrays:
        units = [m.groups() for m in map(UNIT_KEY.match, arrays) if m]
        stages = sorted({int(stage) for stage, _ in units})
        if stages != list(range(1, len(stages) + 1)):
            raise ValueError(f"ResNet stages {stages} of the checkpoint are not numbered block1, block2, ...")
        layers = tuple(len({unit for stage, unit in units if int(stage) == s}) for s in stages)
        hybrid = dict(resnet_layers=layers, resnet_width_factor=arrays["conv_root/kernel"].shape[-1] / 64)
    stride = token_stride(patch, hybrid.get("resnet_layers"))
    classifier = "token" if class_token else pooling_in(arrays) or "gap"
    return dict(
        image_size=(grid[0] * stride[0], grid[1] * stride[1]) if grid else None,
        patch_size=patch,
        hidden_size=int(kernel.shape[-1]),
        num_layers=len(blocks),
        num_heads=int(query.shape[1]),
        mlp_dim=int(mlp.shape[1]),
        channels=int((arrays["conv_root/kernel"] if hybrid else kernel).shape[2]),
        classifier=classifier,
        **{entry.argument: prefix_counts.get(entry.argument, 0) for entry in PREFIX_TOKENS.values() if entry.argument},
        posemb="learn" if posemb is not None else "sincos2d",
        posemb_class_token=posemb_class_token,
        representation_size=int(arrays["pre_logits/kernel"].shape[1]) if "pre_logits/kernel" in arrays else None,
        classes=int(arrays["head/bias"].shape[0]) if "head/bias" in arrays else None,
        **hybrid,
    )


def architecture(config, image_size=None):
    """The ``Architecture`` of ``infer_config``'s result (its head kept, as the checkpoint has it).

    ``image_size`` is needed when the checkpoint's grid could not be read (rectangular, fixed embeddings).
    """
    config = dict(config)
    classes = config.pop("classes")
    config["image_size"] = image_size or config["image_size"]
    if config["image_size"] is None:
        raise ValueError("The checkpoint's image size cannot be read off its arrays: pass image_size=(height, width).")
    return Architecture.from_arguments(
        **config, include_top=classes is not None, classes=classes,
        pooling=None if classes is not None else config["classifier"],
    )


def describe(config):
    """A short description of a configuration, e.g. ``"ViT-Ti/16 token"``, ``"R50+ViT-B/16 gap"``, ``"ViT-D48-N3-M96/4 token, 2 layers"``."""
    hidden, layers, heads, mlp = (config[k] for k in ("hidden_size", "num_layers", "num_heads", "mlp_dim"))
    width = next((name for name, (d, _, n, m) in configs.VARIANTS.items() if (d, n, m) == (hidden, heads, mlp)), None)
    depth = width and configs.VARIANTS[width][1]
    width = width or f"D{hidden}-N{heads}-M{mlp}"
    stride = token_stride(config["patch_size"], config.get("resnet_layers"))
    patch = str(stride[0]) if stride[0] == stride[1] else f"{stride[0]}x{stride[1]}"
    stem = ""
    if config.get("resnet_layers") is not None:
        layers = tuple(config["resnet_layers"])
        stem = next((r for (r, _, _), (units, _) in configs.HYBRIDS.items() if tuple(units) == layers), "R") + "+"
    classifier = config.get("classifier", "token")
    registers = config.get("num_register_tokens") or 0
    notes = ("" if layers == depth else f", {layers} layers") + (f", {registers} registers" if registers else "")
    return f"{stem}ViT-{width}/{patch} {classifier}{notes}"


def architecture_summary(file_config, model_config):
    """``"this is a ViT-Ti/16 token checkpoint; the model is ViT-S/16 token"``, or None when they agree."""
    file, model = describe(file_config), describe(model_config)
    channels = file_config.get("channels"), model_config.get("channels", 3)
    if file == model and channels[0] == channels[1]:
        return None
    return f"this is a {file} checkpoint; the model is {model}"
