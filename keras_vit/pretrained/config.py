"""What a checkpoint describes: the ``vision_transformer`` configuration inferred from its arrays alone."""

from keras_vit import configs
from keras_vit.pretrained.names import BLOCK_KEY, POSEMB, UNIT_KEY, normalize_names
from keras_vit.pretrained.resample import square_grid
from keras_vit.resnet import stem_stride


def token_stride(config):
    """Pixels per token (rows, columns) of a ``vision_transformer`` config: patch size x ResNet stride."""
    patch = config["patch_size"]
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    stride = stem_stride(config["resnet_layers"]) if config.get("resnet_layers") is not None else 1
    return (patch[0] * stride, patch[1] * stride)


def infer_config(arrays):
    """Infers ``vision_transformer`` keyword arguments from official checkpoint arrays alone.

    Returns hidden_size, num_layers, num_heads, mlp_dim, patch_size, channels,
    classifier, representation_size, classes (None without a head),
    image_size (from a square position-embedding grid; None for a
    rectangular one) and, for hybrids, resnet_layers (units per stage) and
    resnet_width_factor.
    """
    arrays = normalize_names(arrays)
    try:
        kernel = arrays["embedding/kernel"]
        posemb = arrays[POSEMB]
        query = arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"]
        mlp = arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"]
    except KeyError as error:
        raise ValueError(f"Not an official ViT checkpoint: it has no {error.args[0]!r} array.") from None
    blocks = {m[1] for m in map(BLOCK_KEY.match, arrays) if m}
    prefix = int("cls" in arrays)
    try:
        grid = square_grid(posemb.shape[1] - prefix)
    except ValueError:
        grid = None  # a rectangular grid: the image size cannot be read off the arrays
    patch = tuple(int(p) for p in kernel.shape[:2])
    hybrid = {}
    if "conv_root/kernel" in arrays:
        units = [m.groups() for m in map(UNIT_KEY.match, arrays) if m]
        stages = sorted({int(stage) for stage, _ in units})
        if stages != list(range(1, len(stages) + 1)):
            raise ValueError(f"ResNet stages {stages} of the checkpoint are not numbered block1, block2, ...")
        layers = tuple(len({unit for stage, unit in units if int(stage) == s}) for s in stages)
        hybrid = dict(resnet_layers=layers, resnet_width_factor=arrays["conv_root/kernel"].shape[-1] / 64)
    stride = token_stride(dict(patch_size=patch, **hybrid))
    return dict(
        image_size=(grid[0] * stride[0], grid[1] * stride[1]) if grid else None,
        patch_size=patch,
        hidden_size=int(kernel.shape[-1]),
        num_layers=len(blocks),
        num_heads=int(query.shape[1]),
        mlp_dim=int(mlp.shape[1]),
        channels=int((arrays["conv_root/kernel"] if hybrid else kernel).shape[2]),
        classifier="token" if prefix else "gap",
        representation_size=int(arrays["pre_logits/kernel"].shape[1]) if "pre_logits/kernel" in arrays else None,
        classes=int(arrays["head/bias"].shape[0]) if "head/bias" in arrays else None,
        **hybrid,
    )


def describe(config):
    """A short description of a configuration, e.g. ``"ViT-Ti/16 token"``, ``"R50+ViT-B/16 gap"``, ``"ViT-D48-N3-M96/4 token, 2 layers"``."""
    hidden, layers, heads, mlp = (config[k] for k in ("hidden_size", "num_layers", "num_heads", "mlp_dim"))
    width = next((name for name, (d, _, n, m) in configs.VARIANTS.items() if (d, n, m) == (hidden, heads, mlp)), None)
    depth = width and configs.VARIANTS[width][1]
    width = width or f"D{hidden}-N{heads}-M{mlp}"
    stride = token_stride(config)
    patch = str(stride[0]) if stride[0] == stride[1] else f"{stride[0]}x{stride[1]}"
    stem = ""
    if config.get("resnet_layers") is not None:
        layers = tuple(config["resnet_layers"])
        stem = next((r for (r, _, _), (units, _) in configs.HYBRIDS.items() if tuple(units) == layers), "R") + "+"
    classifier = config.get("classifier", "token")
    layers_note = "" if layers == depth else f", {layers} layers"
    return f"{stem}ViT-{width}/{patch} {'token' if classifier == 'token' else 'gap'}{layers_note}"


def architecture_summary(file_config, model_config):
    """``"this is a ViT-Ti/16 token checkpoint; the model is ViT-S/16 token"``, or None when they agree."""
    file, model = describe(file_config), describe(model_config)
    channels = file_config.get("channels"), model_config.get("channels", 3)
    if file == model and channels[0] == channels[1]:
        return None
    return f"this is a {file} checkpoint; the model is {model}"

