"""Command lines: convert official checkpoints (and write a model's weights back out), interpolate position embeddings.

Installed as ``keras-vit-convert`` and ``keras-vit-interpolate-posemb``; the
scripts in ``tools/`` call the same functions. Outputs are written to a
temporary file in the output folder and renamed into place only when
complete (and verified, with ``--verify``), so a failure leaves nothing
behind; an existing output is never overwritten without ``--force``; a
temporary left by a killed process is deleted by the next command writing
into that folder once nobody has written to it for ``STALE_AFTER_S``.

The library's errors a user fixes by changing the command (``USER_ERRORS``:
a wrong value, a file that cannot be read or written) end a command with one
line, ``<prog>: error: <message>``, naming the command's flags instead of the
library's argument names (``--image-size``, not ``image_size``), and exit
status 2, as argparse's own errors (``tool_main``; ``tools/*.py`` use it too).
"""

import argparse
import contextlib
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from keras_vit.files import atomic_file

OUTPUT_SUFFIXES = (".keras", ".weights.h5")
STALE_AFTER_S = 3600.0  # a temporary nobody wrote to for this long belongs to a killed command
USER_ERRORS = (ValueError, OSError)  # wrong values, files that cannot be read or written: not bugs
# The library's argument names and the flags that set them, for error messages.
FLAGS = {"image_size": "--image-size", "patch_size": "--patch-size", "classes": "--classes", "include_top": "--no-top"}


def with_flags(message, flags=FLAGS):
    """``message`` with the library's argument names written as the command's flags: a name with an underscore
    wherever it is a word (``image_size`` -> ``--image-size``), others only as ``name=`` (``classes=0``)."""
    for name, flag in flags.items():
        pattern = rf"(?<![\w-]){name}(?!\w)" if "_" in name else rf"(?<![\w-]){name}(?=\s*=)"
        message = re.sub(pattern + r"\s*=\s*", flag + " ", message)
        message = re.sub(pattern, flag, message)
    return message


def tool_main(main, prog, argv=None, flags=FLAGS):
    """``main(argv)``'s exit status; the library's ``USER_ERRORS`` end it with one line on stderr,
    ``prog: error: <message naming the flags>``, and status 2. Other exceptions are bugs: their traceback stays."""
    try:
        return main(argv)
    except USER_ERRORS as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}: error: {with_flags(message, flags)}", file=sys.stderr)
        return 2


def positive_int(text):
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def parse_size(text):
    """``"384"`` -> 384, ``"384,512"`` -> (384, 512); sides >= 1."""
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected H or H,W (integers >= 1), got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _suffix(path):
    name = Path(path).name
    return ".weights.h5" if name.endswith(".weights.h5") else Path(path).suffix


def _remove_stale_temporaries(output):
    """Deletes temporaries of ``output`` (``.<name>.<random><suffix>``) that killed commands left: those nobody
    wrote to for ``STALE_AFTER_S`` (a live command writes its file within that time)."""
    now = time.time()
    for temporary in output.parent.glob(f".{glob_escape(output.name)}.*{_suffix(output)}"):
        try:
            if temporary.is_file() and now - temporary.stat().st_mtime > STALE_AFTER_S:
                temporary.unlink()
        except OSError:
            pass  # removed meanwhile by another process


def glob_escape(name):
    """``name`` with glob's special characters matched literally."""
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def atomic_output(output, force, inputs=()):
    """Yields a temporary path beside ``output`` (same suffix); renames it to ``output`` on success.

    Refuses to overwrite an existing output without ``force`` (``FileExistsError``) or to write over one of
    ``inputs`` (``ValueError``). Stale temporaries of ``output`` left by killed commands are deleted first.
    """
    output = Path(output)
    for source in inputs:
        if output.exists() and Path(source).exists() and output.samefile(source):
            raise ValueError(f"the output {output} is the input file; choose another output path.")
    if output.exists() and not force:
        raise FileExistsError(f"{output} exists; pass --force to overwrite it.")
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(output)
    with atomic_file(output, suffix=_suffix(output)) as temporary:
        yield temporary


def _describe(model, config):
    lines = [f"{key}: {value}" for key, value in config.items()]
    lines.append(f"parameters: {model.count_params():,}")
    return "\n".join(lines)


def _compare(model, reloaded, seed=0):
    """Largest absolute output difference of two models on seeded random images in [-1, 1]."""
    shape = (2, *model.input.shape[1:])
    images = np.random.default_rng(seed).uniform(-1, 1, shape).astype("float32")
    return float(np.abs(model.predict(images, verbose=0) - reloaded.predict(images, verbose=0)).max())


def _reload(model, path):
    import keras

    if str(path).endswith(".keras"):
        return keras.models.load_model(path)
    clone = type(model).from_config(model.get_config())
    clone.load_weights(path)
    return clone


def convert_main(argv=None):
    """keras-vit-convert INPUT.npz OUTPUT.keras|OUTPUT.weights.h5 [options]; MODEL.keras --to LAYOUT OUTPUT"""
    return tool_main(_convert_main, "keras-vit-convert", argv)


def _convert_main(argv):
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="keras-vit-convert",
        description="Convert an official JAX/Flax ViT .npz checkpoint to a Keras .keras model or .weights.h5 file. "
        "The architecture is inferred from the arrays.",
    )
    parser.add_argument("input", help="official checkpoint (.npz)")
    parser.add_argument("output", help="output file: .keras (model + weights) or .weights.h5 (weights only)")
    parser.add_argument("--image-size", type=parse_size, help="H or H,W; position embeddings are interpolated")
    parser.add_argument("--classes", type=positive_int, help="new zero-initialised head with this many classes")
    parser.add_argument("--no-top", action="store_true", help="drop the head (and pre-logits)")
    parser.add_argument("--verify", action="store_true", help="reload the output and compare with the .npz model")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--to", choices=("official", "big_vision", "timm"),
                        help="the other way: write the weights of INPUT, a keras_vit .keras model, in this layout to "
                        "OUTPUT (.npz; for timm a folder or .safetensors): keras_vit.save_weights")
    parser.add_argument("--dequantize", action="store_true", help="with --to: write a quantized model's float weights")
    args = parser.parse_args(argv)
    if args.to:
        print(f"wrote {_save_weights(parser, args)} ({args.to} layout), read back and checked")
        return 0
    if _suffix(args.output) not in OUTPUT_SUFFIXES:
        parser.error(f"the output must end in .keras or .weights.h5, got {args.output}")
    if not Path(args.input).is_file():
        parser.error(f"{args.input} does not exist")
    if _suffix(args.input) in OUTPUT_SUFFIXES:
        parser.error(
            f"{args.input} is already a Keras file, not an official .npz checkpoint: load it with "
            "keras.models.load_model (.keras) or model.load_weights (.weights.h5); to resize it use "
            "keras-vit-interpolate-posemb"
        )
    if Path(args.output).exists() and not args.force:
        parser.error(f"{args.output} exists; pass --force to overwrite it")

    from keras_vit import applications, official_names
    from keras_vit.pretrained import config

    model = applications.from_official_checkpoint(
        args.input, image_size=args.image_size, classes=args.classes, include_top=not args.no_top
    )
    built = {k: v for k, v in config.infer_config(official_names.official_arrays(model)).items() if v is not None}
    print(_describe(model, built))
    with atomic_output(args.output, args.force, inputs=[args.input]) as temporary:
        if str(temporary).endswith(".keras"):
            model.save(temporary)
        else:
            model.save_weights(temporary)
        if args.verify:
            difference = _compare(model, _reload(model, temporary))
            print(f"verify: largest output difference after reload {difference:.3g}")
            if difference > 1e-5:
                raise ValueError("the reloaded output differs from the checkpoint model; nothing was written.")
    print(f"wrote {args.output}")
    return 0


def _save_weights(parser, args):
    """keras-vit-convert MODEL.keras --to LAYOUT OUTPUT: ``keras_vit.save_weights`` of the model; the path written."""
    if _suffix(args.input) != ".keras" or not Path(args.input).is_file():
        parser.error(f"--to writes the weights of a keras_vit .keras model; {args.input} is not one")
    if args.image_size or args.classes or args.no_top or args.verify:
        parser.error("--to writes the model as it is (and always reads the output back): drop --image-size, "
                     "--classes, --no-top and --verify")
    import keras

    from keras_vit.pretrained.save import save_weights

    try:
        return save_weights(keras.models.load_model(args.input), args.output, layout=args.to, overwrite=args.force,
                            dequantize=args.dequantize)
    except (ValueError, TypeError, OSError) as error:  # ended by tool_main in one line, with the flags' names
        message = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ValueError(message.replace("overwrite=True", "--force").replace("dequantize=True", "--dequantize")) from None


def _interpolate_npz(source, target, image_size, patch_size, architecture):
    """Rewrites only the position embeddings (and the patch kernel) of an .npz; names and storage types stay.

    The rules are ``keras_vit.pretrained.adapt``'s, applied to the architecture the file describes at the new
    size (and patch size).
    """
    from keras_vit.layers import to_pair
    from keras_vit.pretrained import adapt, config, names, npz

    arrays = npz.read_npz(source, progress=sys.stdout.isatty())  # Keras' bar writes ANSI escapes to any stream
    found = config.infer_config(arrays)
    if found["image_size"] is None:
        raise ValueError(f"{source} has a rectangular grid; interpolate the .keras model instead.")
    if patch_size is not None and found.get("resnet_layers") is not None:
        raise ValueError("--patch-size applies to plain ViTs; a hybrid's patches are on its feature map.")
    if patch_size is not None:
        found["patch_size"] = to_pair(patch_size, "patch size")
    target_arch = config.architecture(found, image_size=to_pair(image_size, "image size"))
    canonical = names.normalize_names(arrays)
    adapted, _, _ = adapt.adapt(canonical, target_arch)
    by_canonical = {names.normalize_names({key: arrays[key]}).popitem()[0]: key for key in arrays}
    for name in ("embedding/kernel", names.POSEMB):
        if name in by_canonical and adapted[name] is not canonical[name]:
            key = by_canonical[name]
            arrays[key] = npz.encode_like(adapted[name], arrays[key])
    np.savez(target, **arrays)


def _interpolate_keras(source, target, image_size, patch_size, architecture):
    import keras

    from keras_vit import applications

    applications.resize_model(keras.models.load_model(source), image_size, patch_size=patch_size).save(target)


def _interpolate_weights_h5(source, target, image_size, patch_size, architecture):
    """Build (from ``architecture``) -> load the weights -> resize -> save the weights."""
    import keras

    from keras_vit import applications

    if architecture is None:
        raise ValueError(
            "a .weights.h5 file holds no architecture: pass --architecture with the .keras model or "
            "official .npz checkpoint it was saved from."
        )
    if _suffix(architecture) == ".keras":
        model = keras.models.load_model(architecture)
    else:
        model = applications.from_official_checkpoint(architecture)
    model.load_weights(source)
    applications.resize_model(model, image_size, patch_size=patch_size).save_weights(target)


def interpolate_main(argv=None):
    """keras-vit-interpolate-posemb INPUT OUTPUT --image-size H[,W]"""
    return tool_main(_interpolate_main, "keras-vit-interpolate-posemb", argv)


def _interpolate_main(argv):
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="keras-vit-interpolate-posemb",
        description="Resize the position embeddings of a checkpoint (.npz, .keras or .weights.h5) to another "
        "image size with the official algorithm (class token kept, bilinear with aligned corners), and optionally "
        "the patch kernel to another patch size (FlexiViT).",
    )
    parser.add_argument("input", help="official .npz, Keras .keras or .weights.h5 of a keras_vit model")
    parser.add_argument("output", help="output file, same format as the input")
    parser.add_argument("--image-size", type=parse_size, required=True, help="target H or H,W")
    parser.add_argument(
        "--patch-size", type=parse_size, help="also resample the patch kernel to this P or P,Q (FlexiViT pseudo-inverse)"
    )
    parser.add_argument(
        "--architecture", help="for a .weights.h5 input: the .keras model or official .npz it was saved from"
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)
    handlers = {".npz": _interpolate_npz, ".keras": _interpolate_keras, ".weights.h5": _interpolate_weights_h5}
    kind = _suffix(args.input)
    if kind not in handlers:
        parser.error(f"the input must be .npz, .keras or .weights.h5, got {args.input}")
    if _suffix(args.output) != kind:
        parser.error(f"the output must have the input's format ({kind}), got {args.output}")
    if not Path(args.input).is_file():
        parser.error(f"{args.input} does not exist")
    with atomic_output(args.output, args.force, inputs=[args.input]) as temporary:
        handlers[kind](args.input, temporary, args.image_size, args.patch_size, args.architecture)
    print(f"wrote {args.output} with position embeddings for {args.image_size}")
    return 0
