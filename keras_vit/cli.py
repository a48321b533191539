"""Command lines: convert official checkpoints, interpolate position embeddings.

Installed as ``keras-vit-convert`` and ``keras-vit-interpolate-posemb``; the
scripts in ``tools/`` call the same functions. Outputs are written to a
temporary file in the output folder and renamed into place only when
complete (and verified, with ``--verify``), so a failure leaves nothing
behind; an existing output is never overwritten without ``--force``.
"""

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

OUTPUT_SUFFIXES = (".keras", ".weights.h5")


def parse_size(text):
    """``"384"`` -> 384, ``"384,512"`` -> (384, 512)."""
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return tuple(parts)
    raise argparse.ArgumentTypeError(f"expected H or H,W, got {text!r}")


def _suffix(path):
    name = Path(path).name
    return ".weights.h5" if name.endswith(".weights.h5") else Path(path).suffix


@contextlib.contextmanager
def atomic_output(output, force, inputs=()):
    """Yields a temporary path beside ``output`` (same suffix); renames it to ``output`` on success.

    Refuses (SystemExit) to overwrite an existing output without ``force``,
    or to write over one of ``inputs``.
    """
    output = Path(output)
    for source in inputs:
        if output.exists() and Path(source).exists() and output.samefile(source):
            sys.exit(f"error: the output {output} is the input file; choose another output path.")
    if output.exists() and not force:
        sys.exit(f"error: {output} exists; pass --force to overwrite it.")
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=_suffix(output), dir=output.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's permissions
    temporary = Path(temporary)
    try:
        yield temporary
        os.replace(temporary, output)
    finally:
        if temporary.exists():
            temporary.unlink()


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
    clone = keras.Model.from_config(model.get_config())
    clone.load_weights(path)
    return clone


def convert_main(argv=None):
    """keras-vit-convert INPUT.npz OUTPUT.keras|OUTPUT.weights.h5 [options]"""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="keras-vit-convert",
        description="Convert an official JAX/Flax ViT .npz checkpoint to a Keras .keras model or .weights.h5 file. "
        "The architecture is inferred from the arrays.",
    )
    parser.add_argument("input", help="official checkpoint (.npz)")
    parser.add_argument("output", help="output file: .keras (model + weights) or .weights.h5 (weights only)")
    parser.add_argument("--image-size", type=parse_size, help="H or H,W; position embeddings are interpolated")
    parser.add_argument("--classes", type=int, help="new zero-initialised head with this many classes")
    parser.add_argument("--no-top", action="store_true", help="drop the head (and pre-logits)")
    parser.add_argument("--verify", action="store_true", help="reload the output and compare with the .npz model")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    args = parser.parse_args(argv)
    if _suffix(args.output) not in OUTPUT_SUFFIXES:
        parser.error(f"the output must end in .keras or .weights.h5, got {args.output}")
    if not Path(args.input).is_file():
        parser.error(f"{args.input} does not exist")
    if Path(args.output).exists() and not args.force:
        parser.error(f"{args.output} exists; pass --force to overwrite it")

    from keras_vit import checkpoints, models

    arrays = checkpoints.read_npz(args.input, progress=True)
    model = models.model_from_arrays(
        arrays, args.input, image_size=args.image_size, classes=args.classes, include_top=not args.no_top
    )
    built = {k: v for k, v in checkpoints.infer_config(checkpoints.model_arrays(model)).items() if v is not None}
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
                sys.exit("error: the reloaded output differs from the checkpoint model; nothing was written.")
    print(f"wrote {args.output}")
    return 0


def _interpolate_npz(source, target, image_size):
    from keras_vit import checkpoints
    from keras_vit.layers import to_pair

    arrays = checkpoints.read_npz(source, progress=True)
    config = checkpoints.infer_config(arrays)
    if config["image_size"] is None:
        raise SystemExit(f"error: {source} has a rectangular grid; interpolate the .keras model instead.")
    height, width = to_pair(image_size, "image size")
    stride = checkpoints.token_stride(config)
    if height % stride[0] or width % stride[1]:
        raise SystemExit(f"error: image size {height}x{width} is not a multiple of the token stride {stride}.")
    # Only the position embeddings change; every other array keeps its name, shape and dtype.
    key = next(k for k in arrays if k.endswith("Transformer/posembed_input/pos_embedding"))
    prefix = int(config["classifier"] == "token")
    resized = checkpoints.interpolate_posemb(
        checkpoints.decode_array(arrays[key]), (height // stride[0], width // stride[1]), prefix
    )
    arrays[key] = checkpoints.encode_like(resized, arrays[key])
    np.savez(target, **arrays)


def _interpolate_keras(source, target, image_size):
    import keras

    from keras_vit import models

    models.resize_model(keras.models.load_model(source), image_size).save(target)


def _interpolate_weights_h5(source, target, image_size):
    """Edits the position embeddings inside a copy of a Keras .weights.h5 file of a keras_vit model."""
    import h5py

    from keras_vit import checkpoints
    from keras_vit.layers import to_pair

    shutil.copyfile(source, target)
    with h5py.File(target, "r+") as file:
        layers = file["layers"]
        if "add_position_embs" not in layers or "patches" not in layers:
            raise SystemExit(f"error: {source} does not hold the weights of a keras_vit model.")
        posemb = layers["add_position_embs/vars/0"][...]
        stages = [name for name in layers if name.startswith("res_net_stage")]
        hybrid = {"resnet_layers": stages} if "std_conv2d" in layers else {}
        stride = checkpoints.token_stride(dict(patch_size=layers["patches/projection/vars/0"].shape[:2], **hybrid))
        height, width = to_pair(image_size, "image size")
        prefix = int("class_token" in layers)
        resized = checkpoints.interpolate_posemb(posemb, (height // stride[0], width // stride[1]), prefix)
        del layers["add_position_embs/vars/0"]
        layers["add_position_embs/vars"].create_dataset("0", data=resized)


def interpolate_main(argv=None):
    """keras-vit-interpolate-posemb INPUT OUTPUT --image-size H[,W]"""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="keras-vit-interpolate-posemb",
        description="Resize the position embeddings of a checkpoint (.npz, .keras or .weights.h5) to another "
        "image size with the official algorithm (class token kept, bilinear with aligned corners).",
    )
    parser.add_argument("input", help="official .npz, Keras .keras or .weights.h5 of a keras_vit model")
    parser.add_argument("output", help="output file, same format as the input")
    parser.add_argument("--image-size", type=parse_size, required=True, help="target H or H,W")
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
        handlers[kind](args.input, temporary, args.image_size)
    print(f"wrote {args.output} with position embeddings for {args.image_size}")
    return 0
