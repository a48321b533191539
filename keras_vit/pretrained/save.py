"""Weights out: a keras_vit model's weights in the layouts other code reads; ``load``'s inverse.

``save_weights(model, path, layout=None)`` writes the model's official arrays (``official_names.official_arrays``) as

* ``"official"``: an ``.npz`` in the names and shapes of the 2020 google-research/vision_transformer files
  (pre-Linen block names, the position-embedding table under ``Transformer/posembed_input`` with the class
  token's row, a hybrid's GroupNorm parameters (1, 1, 1, C)), which the official ``checkpoint.load``, timm's
  ``vision_transformer._load_weights`` and ``keras_vit.load_weights`` read;
* ``"big_vision"``: an ``.npz`` in big_vision's names (Linen block names, the table at the top level as
  ``pos_embedding`` without a class-token row, ``MAPHead_0``; ``scan=True`` stacks the blocks on a leading axis
  as big_vision's scan models hold them), which big_vision's ``vit.load``, timm and keras_vit read;
* ``"timm"``: a Hugging Face Hub folder of timm (``model.safetensors`` + ``config.json`` with ``architecture``,
  ``model_args``, ``num_classes``, ``global_pool`` and ``pretrained_cfg``), which
  ``timm.create_model(config["architecture"], **config["model_args"])`` + strict ``load_state_dict``, timm's
  ``local-dir:`` models and ``keras_vit.pretrained.timm.read_timm`` read; a path ending in ``.safetensors`` gets
  the state dict alone.

The name rules are the readers' own run backwards (``names.official_layout``, ``names.big_vision_layout``,
``timm_names.from_official``). What a layout cannot hold is declared once (``PARTS``) and refused with a
``LayoutError`` naming a layout that holds it. Every file is written under a temporary name beside its target,
read back with keras_vit's own reader and compared with the model's weights (names, shapes, values), and only
then renamed into place: a failure leaves nothing behind.
"""

import collections
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import keras
import numpy as np
import safetensors.numpy

from keras_vit import preprocessing
from keras_vit.layers.common import to_pair
from keras_vit.layers.tokens import PREFIX_TOKENS
from keras_vit.backbone import dequantized_copy
from keras_vit.files import atomic_file, umask
from keras_vit.models import as_vision_transformer
from keras_vit.official_names import official_arrays
from keras_vit.pretrained import hub, names, timm as timm_lib, timm_names
from keras_vit.pretrained.npz import read_npz
from keras_vit.pretrained.safetensors_file import read_safetensors
from keras_vit.pretrained.timm_entry_points import ENTRY_POINTS, TIMM_DEFAULTS

LAYOUTS = ("official", "big_vision", "timm")
NPZ_SUFFIX = ".npz"
SAFETENSORS_SUFFIX = ".safetensors"

Part = collections.namedtuple("Part", "what present layouts")
Part.__doc__ = "A part a model may have: a description, whether an ``Architecture`` has it, the layouts that hold it."
PARTS = (
    Part("register tokens", lambda a: a.num_prefix_tokens > int(a.class_token), ("timm",)),
    Part("MAP pooling", lambda a: a.pooling == "map", ("big_vision", "timm")),
    Part("max pooling before the head", lambda a: a.pooling == "max" and a.classes is not None, ("timm",)),
    Part("fixed 2-D sin-cos position embeddings", lambda a: a.posemb == "sincos2d", ("big_vision", "timm")),
    Part("a class token without a position-embedding row",
         lambda a: a.class_token and a.posemb == "learn" and not a.posemb_class_token, ("big_vision", "timm")),
    Part("a class token with a position-embedding row", lambda a: a.posemb_prefix_rows > 0, ("official", "timm")),
    Part("a ResNet stem (a hybrid)", lambda a: a.resnet_layers is not None, ("official",)),
    Part("a representation layer (pre_logits)", lambda a: a.representation_size is not None,
         ("official", "big_vision")),
    Part("the exact (erf) GELU, which the .npz readers compute with tanh", lambda a: a.gelu == "erf", ("timm",)),
    Part("CLIP's quick GELU", lambda a: a.gelu == "quick", ("timm",)),
    Part("a norm before the blocks (pre_norm)", lambda a: a.pre_norm, ("timm",)),
    Part("a norm after pooling (fc_norm)", lambda a: a.fc_norm, ("timm",)),
    Part("LayerScale", lambda a: a.layer_scale is not None, ("timm",)),
    Part("query and key norms (qk_norm)", lambda a: a.qk_norm, ("timm",)),
    Part("query, key and value projections without biases", lambda a: not a.qkv_bias, ("timm",)),
    Part("another LayerNorm epsilon than 1e-6", lambda a: a.layer_norm_epsilon != 1e-6, ("timm",)),
)


class LayoutError(ValueError):
    """A weights layout cannot hold parts of a model: ``layout`` (the one asked for), ``missing`` (a tuple of
    those parts), ``use`` (a tuple of the layouts that hold every part of the model; empty when none does)."""

    def __init__(self, layout, missing, use):
        self.layout = layout
        self.missing = tuple(missing)
        self.use = tuple(use)
        parts = ", ".join(self.missing)
        advice = (f"save it with layout={self.use[0]!r}" if self.use
                  else "no weights layout holds it all: save the whole model with model.save('model.keras')")
        super().__init__(f"The {layout} layout cannot hold what this model has ({parts}): {advice}.")


class ReadBackError(RuntimeError):
    """A file just written did not read back as the model's weights (``path``; ``names``: the arrays that
    differ); it was not renamed into place."""

    def __init__(self, path, names, what):
        self.path = path
        self.names = tuple(names)
        super().__init__(f"{path} did not read back as written ({what}); nothing was written.")


class QuantizedModelError(ValueError):
    """A quantized model (``modes``: its layers' quantization modes) was asked to write its weights without
    ``dequantize=True``."""

    def __init__(self, modes):
        self.modes = tuple(sorted(modes))
        super().__init__(
            f"This model is quantized ({', '.join(self.modes)}): its kernels are not the float weights other code "
            "reads. Pass dequantize=True to write the float weights it applies (keras_vit.backbone.dequantized_copy)."
        )


def missing_parts(arch, layout):
    """The descriptions of the parts of ``arch`` (an ``Architecture``) that ``layout`` cannot hold."""
    return tuple(part.what for part in PARTS if part.present(arch) and layout not in part.layouts)


def _check_layout(arch, layout):
    missing = missing_parts(arch, layout)
    if missing:
        raise LayoutError(layout, missing, [other for other in LAYOUTS if not missing_parts(arch, other)])


def infer_layout(path, arch):
    """The layout a path asks for: ``.npz`` -> "official", or "big_vision" when the model needs big_vision's
    names; ``.safetensors`` or anything else (a folder) -> "timm"."""
    if Path(path).name.endswith(NPZ_SUFFIX):
        needs_big_vision = missing_parts(arch, "official") and not missing_parts(arch, "big_vision")
        return "big_vision" if needs_big_vision else "official"
    return "timm"


def _quantization_modes(model):
    """The quantization modes of ``model``'s layers, read off its config's dtype policy map (empty: not quantized)."""
    policy = keras.dtype_policies.get(model.get_config()["dtype"])
    if not isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return set()
    return {entry.quantization_mode for entry in policy.values() if entry.quantization_mode is not None}


# --- the layouts: official arrays -> {file name: contents} --------------------------------------------------------

def _npz_arrays(arrays, layout, scan):
    """The arrays of the one ``.npz`` of the official or big_vision layout."""
    return names.official_layout(arrays) if layout == "official" else names.big_vision_layout(arrays, scan=scan)


def _timm_official(arrays, arch, model):
    """The official arrays timm's layout holds, and the ``Architecture`` they describe there.

    Fixed sin-cos embeddings become a learned table of their values (the same outputs at the model's size; timm
    resamples the table at other sizes). A class token whose row sits beside registers, which have none, has the
    row folded into it (``cls + row``), as timm converts DINOv2 with registers: the same outputs, the table then
    covering the grid only.
    """
    arrays = dict(arrays)
    changes = {}
    if arch.posemb == "sincos2d":
        arrays[names.POSEMB] = model.position_embeddings()[None]
        changes.update(posemb="learn", posemb_class_token=not arch.class_token)  # as from_arguments spells it
    elif arch.posemb_prefix_rows and arch.num_prefix_tokens > 1:
        table, cls = arrays[names.POSEMB], PREFIX_TOKENS["class"].official_name
        arrays[cls] = arrays[cls] + table[:, :1]
        arrays[names.POSEMB] = table[:, 1:]
        changes.update(posemb_class_token=False)
    return arrays, arch.replace(image_size=arch.native_image_size, **changes)


def _mlp_ratio(hidden, mlp):
    """The ``mlp_ratio`` timm turns back into ``mlp`` hidden units (``int(hidden * ratio)``)."""
    ratio = mlp / hidden
    while int(hidden * ratio) < mlp:
        ratio = float(np.nextafter(ratio, np.inf))
    return ratio


_GLOBAL_POOL = {pooling: timm_pool for timm_pool, pooling in timm_lib.TIMM_POOLING.items()}  # keras_vit -> timm
_ACT_LAYER = {gelu: act for act, gelu in timm_lib.TIMM_GELU.items()}


def _size(pair):
    return pair[0] if pair[0] == pair[1] else list(pair)


def timm_model_arguments(arch):
    """timm ``VisionTransformer`` keyword arguments of an ``Architecture`` timm holds (``_timm_official``'s)."""
    registers = arch.num_prefix_tokens - int(arch.class_token)
    return dict(
        img_size=list(arch.native_image_size), patch_size=_size(arch.patch_size), in_chans=arch.channels,
        num_classes=arch.classes or 0, global_pool=_GLOBAL_POOL.get(arch.pooling, ""), embed_dim=arch.hidden_size,
        depth=arch.num_layers, num_heads=arch.num_heads, mlp_ratio=_mlp_ratio(arch.hidden_size, arch.mlp_dim),
        class_token=arch.class_token, reg_tokens=registers,
        no_embed_class=arch.num_prefix_tokens > 0 and arch.posemb_prefix_rows == 0,
        # timm's fc_norm=None puts the norm after pooling for avg/max pools, before it otherwise: say so when not
        fc_norm=None if arch.fc_norm == (_GLOBAL_POOL.get(arch.pooling) in timm_lib.FC_NORM_POOLS) else arch.fc_norm,
        act_layer=_ACT_LAYER[arch.gelu], dynamic_img_pad=arch.dynamic_padding, pre_norm=arch.pre_norm,
        init_values=arch.layer_scale, qkv_bias=arch.qkv_bias, qk_norm=arch.qk_norm, norm_eps=arch.layer_norm_epsilon,
    )


# Entry-point facts that are no keyword argument of timm's VisionTransformer: only the entry point can set them
_ENTRY_POINT_ONLY = ("norm_eps",)


def _normalized(key, value):
    return to_pair(value) if key in ("img_size", "patch_size") else value


def entry_point(arguments):
    """``(name, model_args)``: the timm entry point closest to ``arguments`` (the fewest arguments that differ;
    among equals, one named for the model's resolution, then the first) and the ``model_args`` that make it
    ``arguments``: every argument the entry point sets or that differs from timm's defaults."""
    height, width = to_pair(arguments["img_size"])

    def differing(preset):
        merged = {**TIMM_DEFAULTS, **preset}
        return sum(_normalized(k, merged[k]) != _normalized(k, arguments.get(k, TIMM_DEFAULTS[k])) for k in merged)

    def settable(preset):  # what model_args cannot say, the entry point must
        merged = {**TIMM_DEFAULTS, **preset}
        return all(merged[key] == arguments.get(key, TIMM_DEFAULTS[key]) for key in _ENTRY_POINT_ONLY)

    candidates = [(name, preset) for name, preset in ENTRY_POINTS.items()
                  if set(preset) <= set(TIMM_DEFAULTS) and settable(preset)]
    if not candidates:
        return None, None
    named_for_size = lambda name: height == width and f"_{height}" in name  # noqa: E731
    name, preset = min(candidates, key=lambda item: (differing(item[1]), not named_for_size(item[0])))
    model_args = {key: value for key, value in arguments.items() if key not in _ENTRY_POINT_ONLY and (
                  key in preset or key in ("img_size", "num_classes", "global_pool", "in_chans")
                  or _normalized(key, value) != _normalized(key, TIMM_DEFAULTS[key]))}
    return name, model_args


def _json_value(value):
    return list(value) if isinstance(value, tuple) else value


def timm_config(arch, class_names=None, input_settings=None):
    """The ``config.json`` of a Hub folder of timm holding a model of ``arch`` (an ``Architecture`` timm holds) whose
    weights expect ``input_settings`` (``keras_vit.preprocessing.input_settings``; None: the official input).

    A LayerNorm epsilon only an entry point sets (no timm entry point has the model's) is a ``LayoutError``."""
    arguments = timm_model_arguments(arch)
    architecture, model_args = entry_point(arguments)
    if architecture is None:
        raise LayoutError("timm", (f"a LayerNorm epsilon of {arch.layer_norm_epsilon} (no timm entry point has it)",),
                          [layout for layout in LAYOUTS if layout != "timm" and not missing_parts(arch, layout)])
    channels = arch.channels
    settings = preprocessing.input_settings(input_settings)
    per_channel = lambda values: list(values) * (channels // len(values))  # noqa: E731 (one value: every channel)
    pretrained_cfg = dict(
        custom_load=False, input_size=[channels, *arch.native_image_size], fixed_input_size=True,
        interpolation=settings["interpolation"], crop_pct=settings["crop_pct"], crop_mode=settings["crop_mode"],
        mean=per_channel(settings["mean"]), std=per_channel(settings["std"]), num_classes=arguments["num_classes"],
        pool_size=None, first_conv="patch_embed.proj", classifier="head",
    )
    config = dict(architecture=architecture, num_classes=arguments["num_classes"], num_features=arch.hidden_size,
                  global_pool=arguments["global_pool"],
                  model_args={key: _json_value(value) for key, value in model_args.items()},
                  pretrained_cfg=pretrained_cfg)
    if class_names is not None:
        config["label_names"] = list(class_names)
    return config


def _timm_files(arrays, arch, model, bare):
    """``{name: contents}`` of the timm layout: ``model.safetensors`` (+ ``config.json`` unless ``bare``)."""
    arrays, timm_arch = _timm_official(arrays, arch, model)
    config = timm_config(timm_arch, model.class_names, getattr(model, "preprocessing", None))
    try:  # what keras_vit's timm reader accepts (the writer's own arguments go through the reader's merge)
        timm_lib.timm_arguments(config["architecture"], config["model_args"])
    except timm_lib.UnsupportedArchitectureError as error:
        use = [layout for layout in LAYOUTS if layout != "timm" and not missing_parts(arch, layout)]
        raise LayoutError("timm", error.missing, use) from None
    state = timm_names.from_official(arrays, label=model.name)
    files = {hub.WEIGHTS_NAME: state}
    if not bare:
        files[hub.CONFIG_NAME] = config
    return files, arrays, timm_arch, config


# --- writing and reading back -------------------------------------------------------------------------------------

def _write(path, contents):
    """Writes ``contents`` to ``path`` as its name says: a dict as JSON (``.json``), arrays as float32
    ``.safetensors`` or ``.npz``."""
    if path.name.endswith(".json"):
        path.write_text(json.dumps(contents, indent=2) + "\n", encoding="utf-8")
        return
    arrays = {name: np.ascontiguousarray(array, np.float32) for name, array in contents.items()}
    if path.name.endswith(SAFETENSORS_SUFFIX):
        path.write_bytes(safetensors.numpy.save(arrays, metadata={"format": "pt"}))  # "pt": what timm writes
    else:
        with open(path, "wb") as file:
            np.savez(file, **arrays)


def _same_arrays(found, expected, where):
    """Raises ``ReadBackError`` unless ``found`` and ``expected`` ({name: array}) have the same names, shapes and
    values."""
    if set(found) != set(expected):
        differ = sorted(set(found) ^ set(expected))
        raise ReadBackError(where, differ, f"arrays {', '.join(differ[:3])} are in one and not the other")
    differ = sorted(name for name, array in expected.items()
                    if np.shape(found[name]) != np.shape(array) or not np.array_equal(found[name], array))
    if differ:
        raise ReadBackError(where, differ, f"{', '.join(differ[:3])} differ in shape or values")


def _read_back_npz(path, written, model_arrays):
    """The written ``.npz`` as keras_vit reads it: the arrays written, and normalized the model's own."""
    found = read_npz(path)
    _same_arrays(found, written, path)
    _same_arrays(names.normalize_names(found), model_arrays, f"{path} (read as keras_vit reads it)")


def _read_back_timm(source, written, official, arch, **config):
    """The written timm files as keras_vit reads them: the state dict written, and through ``read_timm`` (of a
    folder, or of a bare file with ``config``'s architecture and model_args) the official arrays and the
    architecture timm holds."""
    weights = source / hub.WEIGHTS_NAME if source.is_dir() else source
    _same_arrays(read_safetensors(weights), written[hub.WEIGHTS_NAME], weights)
    checkpoint = timm_lib.read_timm(source, **config)
    _same_arrays(checkpoint.arrays, official, f"{source} (read as keras_vit reads it)")
    built = {key: value for key, value in checkpoint.arguments.items() if key in type(arch).arguments()}
    # how the model resamples its table is no part of the files
    if type(arch).from_arguments(**built, posemb_interpolation=arch.posemb_interpolation) != arch:
        raise ReadBackError(source, (), f"its config describes {built}, not the model's architecture {arch}")


def _refuse_existing(paths, overwrite):
    for path in paths:
        if path.exists() and not overwrite:
            raise FileExistsError(errno.EEXIST, f"{path} exists: pass overwrite=True to replace it", str(path))


def _commit_file(target, contents, check):
    """Writes ``contents`` to a temporary file beside ``target``, runs ``check(temporary)``, renames it over."""
    with atomic_file(target) as temporary:
        _write(temporary, contents)
        check(temporary)


def _commit_folder(folder, files, check, overwrite):
    """Writes ``files`` ({name: contents}) into a temporary sibling of ``folder``, runs ``check(temporary)``,
    then renames it to ``folder``, or, when ``folder`` exists, moves each file into it (its other files kept)."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(errno.EEXIST, f"{folder} is a file; the timm layout writes a folder", str(folder))
    if folder.exists():
        _refuse_existing([folder / name for name in files], overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, contents in files.items():
            _write(temporary / name, contents)
        check(temporary)
        if folder.exists():
            for name in files:
                os.replace(temporary / name, folder / name)
        else:
            os.chmod(temporary, 0o777 & ~umask())  # mkdtemp makes it private; give it a normal folder's mode
            os.rename(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def save_weights(model, path, layout=None, overwrite=False, dequantize=False, scan=False):
    """Writes ``model``'s weights to ``path`` in ``layout``: ``keras_vit.load_weights`` run backwards.

    Args:
        model: a ``keras_vit.VisionTransformer``. LoRA factors are merged into the kernels they adapt (the
            weights written are those the model applies).
        path: an ``.npz`` file (official or big_vision layout), a folder (timm's Hub layout: ``model.safetensors``
            + ``config.json``) or a ``.safetensors`` file (timm's state dict alone).
        layout: ``"official"``, ``"big_vision"`` or ``"timm"``; None infers it from ``path`` (``.npz``: official,
            or big_vision when the model needs its names; otherwise timm).
        overwrite: replace existing files (a folder's other files are kept). Without it an existing file is a
            ``FileExistsError``, whatever wrote it.
        dequantize: write a quantized model's effective float weights (``backbone.dequantized_copy``); without it a
            quantized model is a ``QuantizedModelError``.
        scan: big_vision layout only: the blocks stacked on a leading layer axis (``Transformer/encoderblock/...``).

    A part the layout cannot hold is a ``LayoutError`` (fields ``layout``, ``missing``, ``use``). The files are
    read back with keras_vit's readers and compared with the model's weights (names, shapes, values) before they
    are renamed into place. Returns the path written (a ``pathlib.Path``).
    """
    model = as_vision_transformer(model, "save_weights")
    path = Path(os.fspath(path))
    arch = model.architecture
    layout = layout or infer_layout(path, arch)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if scan and layout != "big_vision":
        raise ValueError(f"scan=True stacks big_vision's blocks; the {layout} layout has none to stack.")
    npz = layout in ("official", "big_vision")
    if npz != path.name.endswith(NPZ_SUFFIX):
        wanted = "an .npz file" if npz else "a folder or a .safetensors file"
        raise ValueError(f"The {layout} layout writes {wanted}, got {path}.")
    _check_layout(arch, layout)
    modes = _quantization_modes(model)
    if modes and not dequantize:
        raise QuantizedModelError(modes)
    arrays = official_arrays(dequantized_copy(model) if modes else model)
    if npz:
        _refuse_existing([path], overwrite)
        written = _npz_arrays(arrays, layout, scan)
        path.parent.mkdir(parents=True, exist_ok=True)
        _commit_file(path, written, lambda temporary: _read_back_npz(temporary, written, arrays))
        return path
    bare = path.name.endswith(SAFETENSORS_SUFFIX)
    written, official, timm_arch, config = _timm_files(arrays, arch, model, bare)
    if bare:
        _refuse_existing([path], overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        _commit_file(path, written[hub.WEIGHTS_NAME], lambda temporary: _read_back_timm(
            temporary, written, official, timm_arch, architecture=config["architecture"],
            model_args=config["model_args"]))
    else:
        _commit_folder(path, written, lambda temporary: _read_back_timm(temporary, written, official, timm_arch),
                       overwrite)
    return path
