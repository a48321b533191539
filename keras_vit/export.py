"""Deployment: SavedModel with a serving signature, TFLite/LiteRT (float32, float16, int8), ONNX and OpenVINO IR.

``export(model, path, format)`` writes the artefact next to ``path`` under a
temporary name, runs it on sample images, compares it with the Keras model
(float32 exports: largest absolute logit difference, must be <= 1e-4;
float16 and int8: the difference and the top-1 agreement are reported, not enforced) and only then moves it into place, so a
failed export leaves nothing behind. An existing ``path`` is refused unless
``force=True``; a ``path`` that is (or holds) one of ``inputs`` is always refused.
Returns a dict with the path, size in bytes and the comparison.

Exports compute in float32: a mixed-precision model (``mixed_bfloat16``,
``mixed_float16`` policies) is exported as a float32 copy (same weights), and
compared with that copy. What the converters print goes to a log file, not to
the terminal; a failed conversion raises ``ExportError`` with one line that
names the log file.

What each format takes (B = batch, (H, W, C) = the model's input size, K = classes):

* SavedModel: encoded image bytes (``serving_default``) or uint8 pixels
  (``serve_pixels``) of any size, resized and mapped to [-1, 1] inside
  (``ServingModule``); returns logits, top-k and a per-image ``ok``;
* TFLite: one image, float32 [1, H, W, C] in [-1, 1] (``(pixels - 127.5) /
  127.5``, ``keras_vit.preprocess_input``), already resized to H x W: nothing
  is resized or normalised inside; returns float32 [1, K] logits. Run it with
  LiteRT (``tflite_interpreter``);
* ONNX: float32 [B, H, W, C] in [-1, 1], already resized; returns [B, K] logits.
* OpenVINO IR (Keras' exporter, ``model.export(..., format="openvino")``): ``path`` is the ``.xml`` file, its
  weights go to the ``.bin`` file beside it; float32 [B, H, W, C] in [-1, 1], already resized; returns [B, K]
  logits. It is checked with OpenVINO's CPU plugin computing in float32 (``OPENVINO_FLOAT32``): on CPUs with
  native bfloat16 the plugin's default is bfloat16 (faster, about 1e-2 off).
"""

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_vit.backbone import dequantized_copy
from keras_vit.preprocessing import decode_image

FORMATS = ("saved_model", "tflite", "onnx", "openvino")
QUANTIZATIONS = (None, "float16", "int8")
FLOAT_TOLERANCE = 1e-4
ONNX_OPSET = 17
# OpenVINO's CPU plugin computes in bfloat16 by default where the CPU has it: the verification asks for float32.
OPENVINO_FLOAT32 = {"INFERENCE_PRECISION_HINT": "f32"}
_HALF_PRECISION = re.compile(r"(mixed_)?b?float16")
log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """A converter failed; the message names the log file with its full output."""


def _float32_policy_name(name):
    """A policy name computing in float32: ``mixed_bfloat16`` -> ``float32``, ``int8_from_mixed_bfloat16`` ->
    ``int8_from_float32``."""
    return _HALF_PRECISION.sub("float32", name)


def _float32_config(config):
    """``config`` (a nested ``get_config()``) with every dtype policy computing in half precision made float32
    (quantized ones keep their quantization); and whether any was."""
    changed = False

    def rename(name):
        nonlocal changed
        new = _float32_policy_name(name)
        changed = changed or new != name
        return new

    def visit(node):
        if isinstance(node, dict):
            if node.get("class_name") == "__keras_tensor__" and node["config"].get("dtype") in ("bfloat16", "float16"):
                return {**node, "config": {**node["config"], "dtype": "float32"}}
            if "DTypePolicy" in str(node.get("class_name")) and isinstance(node.get("config"), dict):
                inner = {key: rename(value) if key in ("name", "source_name") and isinstance(value, str) else visit(value)
                         for key, value in node["config"].items()}
                return {**node, "config": inner}
            return {key: rename(value) if key == "dtype" and isinstance(value, str) else visit(value)
                    for key, value in node.items()}
        if isinstance(node, list):
            return [visit(value) for value in node]
        return node

    return visit(config), changed


def float32_model(model):
    """``model`` itself when it computes in float32, else a float32 copy (rebuilt from its config, same weights).

    Mixed-precision policies keep float32 variables, so the copy holds exactly the trained weights; TFLite
    cannot convert bfloat16 convolutions, and exports are compared with float32 Keras outputs. Keras' global
    dtype policy is neither read nor changed (a ``VisionTransformer``'s config holds its own).
    """
    config, changed = _float32_config(model.get_config())
    if not changed:
        return model
    copy = model.__class__.from_config(config)
    copy.set_weights(model.get_weights())
    log.info("Exporting a float32 copy of %s (it computes in %s).", model.name, model.compute_dtype)
    return copy


@contextlib.contextmanager
def _converter_output_to(log_path):
    """Sends everything printed meanwhile (Python and native code, stdout and stderr) to ``log_path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_path, "a") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
                yield log_file
        finally:
            log_file.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _one_line(error, limit=300):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _input_size(model):
    height, width, channels = model.input.shape[1:]
    return height, width, channels


def _keras_logits(model, images):
    return np.asarray(model.predict(images, verbose=0), np.float32)


def _serving_size(model, height, width):
    """The (H, W) that images of ``height`` x ``width`` are resized to for ``model``: its fixed sides; an open side
    (a model of any size) keeps the image's, rounded down to a multiple of the token stride (at least one), or as
    it is when the model pads its inputs itself. ``height`` and ``width`` may be tensors."""
    arch = getattr(model, "architecture", None)
    fixed = _input_size(model)[:2]
    sides = []
    for size, given, step in zip(fixed, (height, width), arch.token_stride if arch else (1, 1)):
        if size is not None:
            sides.append(size)
        elif arch.dynamic_padding:
            sides.append(given)
        else:
            sides.append(tf.maximum(given // step, 1) * step)
    return sides


def _to_model_input(pixels, model):
    """uint8 or float pixels (B, h, w, C) in [0, 255] -> float32 (B, H, W, C) in [-1, 1] (official mapping), at
    the model's size (``_serving_size``)."""
    shape = tf.shape(pixels)
    resized = tf.image.resize(tf.cast(pixels, tf.float32), _serving_size(model, shape[1], shape[2]))
    return (resized - 127.5) / 127.5


def _match_channels(pixels, channels):
    """uint8 (B, h, w, c) -> (B, h, w, ``channels``): as given when c equals ``channels``; for a grey or RGB model,
    grey and RGB(A) pixels are converted (grey replicated, alpha dropped, ITU-R 601 luma), as decoding does.
    Other counts: an ``InvalidArgumentError`` that says what the signature takes."""
    given = tf.shape(pixels)[-1]
    accepted = [channels] if channels not in (1, 3) else [1, 3, 4]
    names = f"{channels}" if channels not in (1, 3) else "1 (grey), 3 (RGB) or 4 (RGBA, alpha dropped)"
    check = tf.debugging.assert_equal(
        tf.reduce_any(tf.equal(given, accepted)), True,
        message=f"serve_pixels takes uint8 pixels (batch, height, width, channels) with {names} channels for this "
        f"{channels}-channel model; convert the images or send encoded bytes to serving_default",
    )
    with tf.control_dependencies([check]):
        pixels = tf.identity(pixels)
    if channels not in (1, 3):
        return tf.ensure_shape(pixels, [None, None, None, channels])
    if channels == 3:
        return tf.cond(given == 1, lambda: tf.tile(pixels[..., :1], [1, 1, 1, 3]), lambda: pixels[..., :3])
    return tf.cond(given == 1, lambda: pixels[..., :1], lambda: tf.image.rgb_to_grayscale(pixels[..., :3]))


class ServingModule(tf.Module):
    """The model plus its pre-processing, for TF Serving: images in, logits and top-k out, per-image status.

    Signatures (B images, K = ``top_k``, N = classes):

    * ``serve_bytes(image_bytes)``: string (B,), encoded images (JPEG, PNG,
      GIF, BMP, WebP, JPEG XL) of any size;
    * ``serve_pixels(pixels)``: uint8 (B, h, w, c), any h and w; c = 1 (grey),
      3 (RGB) or 4 (RGBA) for a grey or RGB model, converted to its channels.

    Both resize to the model's (H, W) (``serve_bytes`` to its native size
    when it takes any size; ``serve_pixels`` then keeps each batch's size,
    rounded down to multiples of the token stride unless the model pads),
    map to [-1, 1] and return ``logits``
    float32 (B, N), ``top_k_classes`` int32 (B, K), ``top_k_scores`` float32
    (B, K) and ``ok`` bool (B,). An image that does not decode has ``ok``
    False, NaN logits and scores and classes -1; the rest of the batch is
    served.
    """

    def __init__(self, model, top_k=5):
        super().__init__()
        self.model = model
        self.top_k = top_k
        channels = _input_size(model)[2]
        arch = getattr(model, "architecture", None)
        self.size = arch.native_image_size if arch is not None else _input_size(model)[:2]  # for encoded images
        self.channels = channels

        @tf.function(input_signature=[tf.TensorSpec([None, None, None, None], tf.uint8, name="pixels")])
        def serve_pixels(pixels):
            images = _to_model_input(_match_channels(pixels, channels), model)
            return self._outputs(images, tf.ones(tf.shape(pixels)[:1], tf.bool))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve_bytes(image_bytes):
            count = tf.shape(image_bytes)[0]

            def decode(index, data):
                image = decode_image(data, channels)
                image.set_shape([None, None, channels])
                return index, tf.image.resize(tf.cast(image, tf.float32), self.size)

            blank = tf.data.Dataset.from_tensors((count, tf.zeros([*self.size, channels])))  # never fails: a batch
            decoded = (
                tf.data.Dataset.from_tensor_slices((tf.range(count), image_bytes))
                .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                .ignore_errors()  # an image that does not decode is left out; its row stays blank, ok False
                .concatenate(blank)
                .batch(tf.cast(count + 1, tf.int64))
            )
            indices, pixels = decoded.get_single_element()
            rows = indices[:, None]
            images = tf.scatter_nd(rows, pixels, [count + 1, *self.size, channels])[:count]
            ok = tf.scatter_nd(rows, tf.ones_like(indices, tf.bool), [count + 1])[:count]
            return self._outputs((images - 127.5) / 127.5, ok)

        self.serve_pixels = serve_pixels
        self.serve_bytes = serve_bytes

    def _outputs(self, images, ok):
        logits = tf.cast(self.model(images, training=False), tf.float32)
        top = tf.math.top_k(logits, k=min(self.top_k, logits.shape[-1]))
        served = ok[:, None]
        return {
            "logits": tf.where(served, logits, np.nan),
            "top_k_classes": tf.where(served, top.indices, -1),
            "top_k_scores": tf.where(served, top.values, np.nan),
            "ok": ok,
        }


def _saved_model(model, target, batches, top_k):
    module = ServingModule(model, top_k)
    tf.saved_model.save(
        module, str(target), signatures={"serving_default": module.serve_bytes, "serve_pixels": module.serve_pixels}
    )
    reloaded = tf.saved_model.load(str(target))
    exported, reference = [], []
    for images in batches:
        pixels = np.clip(np.round(images * 127.5 + 127.5), 0, 255).astype(np.uint8)
        exported.append(reloaded.signatures["serve_pixels"](pixels=tf.constant(pixels))["logits"].numpy())
        reference.append(_keras_logits(model, np.asarray(_to_model_input(pixels, model))))
    return np.concatenate(exported), np.concatenate(reference)


def tflite_interpreter(path):
    """An interpreter of the ``.tflite`` file ``path``: LiteRT's (``ai_edge_litert``, ``pip install ai-edge-litert``)
    when installed, else TensorFlow's deprecated ``tf.lite.Interpreter``. Call ``allocate_tensors()`` first.

    The files ``export`` writes take one image: float32 [1, H, W, C] in
    [-1, 1] (``(pixels - 127.5) / 127.5``, ``keras_vit.preprocess_input``),
    already resized to the model's H x W (nothing is resized inside); they
    return float32 [1, classes] logits.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    return Interpreter(model_path=str(path))


def _tflite(model, target, batches, quantization):
    height, width, channels = _input_size(model)
    saved = Path(target).parent / "saved_model_for_tflite"
    reference = model
    if _keras_quantized(model):
        # TFLite's kernels do not take the integer (or float8) products of Keras' quantized layers: the file holds
        # their effective weights, quantized by TFLite itself (int8 dynamic range unless float16 is asked).
        model = dequantized_copy(model)
    model.export(str(saved), format="tf_saved_model", verbose=False,
                 input_signature=[tf.TensorSpec([1, height, width, channels], tf.float32)])
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    if quantization:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic-range int8 weights
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
    Path(target).write_bytes(converter.convert())
    shutil.rmtree(saved)
    interpreter = tflite_interpreter(target)
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    exported = []
    for images in batches:
        if None in (height, width):  # an open side: the input is resized to each size (resize_tensor_input)
            interpreter.resize_tensor_input(input_index, [1, *images.shape[1:]])
        interpreter.allocate_tensors()
        for image in images:
            interpreter.set_tensor(input_index, image[None].astype(np.float32))
            interpreter.invoke()
            exported.append(interpreter.get_tensor(output_index)[0])
    return np.stack(exported), np.concatenate([_keras_logits(reference, images) for images in batches])


def _keras_quantized(model):
    """Whether ``model`` was quantized with Keras' ``model.quantize`` (its config holds quantized dtype policies)."""
    return "Quantized" in str(model.get_config())


def _onnx(model, target, batches):
    import onnxruntime
    import tf2onnx

    height, width, channels = _input_size(model)

    @tf.autograph.experimental.do_not_convert
    def forward(images):
        return model(images, training=False)

    signature = [tf.TensorSpec([None, height, width, channels], tf.float32, name="images")]
    proto, _ = tf2onnx.convert.from_function(tf.function(forward, input_signature=signature), input_signature=signature, opset=ONNX_OPSET)
    Path(target).write_bytes(proto.SerializeToString())
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    exported = [session.run(None, {name: images.astype(np.float32)})[0] for images in batches]
    return np.concatenate(exported), np.concatenate([_keras_logits(model, images) for images in batches])


def _openvino(model, target, batches):
    import openvino

    height, width, channels = _input_size(model)
    model.export(str(target), format="openvino", verbose=False,
                 input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32)])
    compiled = openvino.Core().compile_model(str(target), "CPU", OPENVINO_FLOAT32)
    exported = [compiled(images.astype(np.float32))[0] for images in batches]
    return np.concatenate(exported), np.concatenate([_keras_logits(model, images) for images in batches])


def _companions(path, format):
    """The files an artefact at ``path`` is made of: OpenVINO's ``.xml`` and its ``.bin``; else ``path`` alone."""
    return [path, path.with_suffix(".bin")] if format == "openvino" else [path]


def _input_description(format, height, width, channels):
    """What an exported artefact takes, in one line (``export``'s ``"input"``)."""
    if format == "saved_model":
        return ("serving_default: encoded images, string [B]; serve_pixels: uint8 [B, h, w, 1|3|4]; any size, "
                "resized and mapped to [-1, 1] inside")
    batch = "1" if format == "tflite" else "B"
    h, w = ("H" if height is None else height), ("W" if width is None else width)
    open_sides = None in (height, width)
    how = (f"any {h}x{w} the model takes (resize the interpreter's input with resize_tensor_input)"
           if format == "tflite" and open_sides else f"any {h}x{w} the model takes" if open_sides
           else f"already resized to {h}x{w}")
    return (f"float32 [{batch}, {h}, {w}, {channels}] in [-1, 1] ((pixels - 127.5) / 127.5), {how}: nothing is "
            "resized or normalised inside")


def _sample_batches(model, images):
    """The batches (B, H, W, C) an export is checked on: ``images`` (an array, or a list of arrays of different
    sizes), else 8 random images at the model's size; a model of any size is checked at two sizes (its native
    one and a rectangular other, whose sides are not multiples of the token stride when the model pads)."""
    if images is not None:
        return [np.asarray(batch, np.float32) for batch in (images if isinstance(images, (list, tuple)) else [images])]
    height, width, channels = _input_size(model)
    arch = getattr(model, "architecture", None)
    sizes = [(height, width)]
    if None in (height, width):
        native, step = arch.native_image_size, arch.token_stride
        pad = 1 if arch.dynamic_padding else 0  # one pixel short of a multiple: the model pads it
        sizes = [tuple(n if s is None else s for s, n in zip((height, width), native)),
                 tuple(n + k * t - pad if s is None else s for s, n, t, k in zip((height, width), native, step, (1, 2)))]
    rng = np.random.default_rng(0)
    return [rng.uniform(-1, 1, (4 if len(sizes) > 1 else 8, *size, channels)).astype(np.float32) for size in sizes]


def _size(path):
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _convert(model, target, format, batches, quantization, top_k):
    """Writes ``target`` and returns (its outputs, Keras outputs) on ``batches``; converter output goes to a log file."""
    handle, log_path = tempfile.mkstemp(prefix=f"keras_vit_export_{target.name}.", suffix=".log")
    os.close(handle)
    failure = None
    with _converter_output_to(log_path) as log_file:
        try:
            if format == "saved_model":
                outputs = _saved_model(model, target, batches, top_k)
            elif format == "tflite":
                outputs = _tflite(model, target, batches, quantization)
            elif format == "openvino":
                outputs = _openvino(model, target, batches)
            else:
                outputs = _onnx(model, target, batches)
        except Exception as error:
            traceback.print_exc(file=log_file)
            failure = error
    if failure is not None:
        raise ExportError(
            f"The {format} export failed ({type(failure).__name__}: {_one_line(failure)}); nothing was written. "
            f"The converter's full output is in {log_path}."
        )
    os.unlink(log_path)
    return outputs


def _check_path(path, inputs, force):
    """Refuses an output that is, or is a folder holding, one of ``inputs``; and an existing one without ``force``."""
    for source in map(Path, inputs):
        if path.exists() and source.exists() and (path.samefile(source) or (path.is_dir() and source.resolve().is_relative_to(path.resolve()))):
            raise FileExistsError(f"The output {path} is (or holds) the input {source}: choose another output path; --force never replaces an input.")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (--force) to replace it.")


def export(model, path, format="saved_model", quantization=None, images=None, top_k=5, force=False, inputs=()):
    """Exports ``model`` to ``path`` and verifies the artefact against Keras on ``images``.

    Args:
        format: ``"saved_model"`` (signatures ``serving_default``: encoded image
            bytes; ``serve_pixels``: uint8 pixels; both resize and map to [-1, 1]
            inside and return logits, top-k and a per-image ``ok``: see
            ``ServingModule``), ``"tflite"`` (input float32 [1, H, W, C] in
            [-1, 1], already resized: no pre-processing inside) or ``"onnx"``
            (float32 [B, H, W, C] in [-1, 1], already resized).
            ``"openvino"``: OpenVINO IR, input as ONNX's; ``path`` ends in ``.xml``
            and the weights go to the ``.bin`` beside it (both checked, both moved into place).
        quantization: TFLite only: None (float32), ``"float16"`` or ``"int8"``
            (dynamic range). A model quantized with Keras (``model.quantize``)
            is exported as it is to SavedModel; TFLite cannot run Keras'
            integer products, so its TFLite file holds the layers' effective
            weights quantized by TFLite (``"int8"`` unless ``"float16"``).
        images: (B, H, W, C) float32 in [-1, 1] to compare on (or a list of such batches of different sizes, for
            a model of any size); by default 8 random images, or 4 at each of two sizes for a model of any size
            (its open sides stay open in every format: ONNX dynamic axes, a resizable TFLite input).
        inputs: paths the export must never replace (e.g. the file ``model`` was loaded from).
    Returns:
        ``{"path", "format", "quantization", "bytes", "max_abs_diff", "top1_agreement", "input"}``; ``"input"``
        says what the artefact takes.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    if quantization not in QUANTIZATIONS or (quantization and format != "tflite"):
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, and is for TFLite only; got {quantization!r}.")
    path = Path(path)
    if format == "openvino" and path.suffix != ".xml":
        raise ValueError(f"An OpenVINO export is an .xml file (its weights go to a .bin beside it); got {path}.")
    for part in _companions(path, format):
        _check_path(part, inputs, force)
    if format == "onnx":
        try:
            import onnxruntime  # noqa: F401
            import tf2onnx  # noqa: F401
        except ImportError:
            raise ImportError("ONNX export needs tf2onnx and onnxruntime: pip install 'keras3-vit[onnx]'.") from None
    if format == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise ImportError("OpenVINO export needs openvino: pip install 'keras3-vit[openvino]'.") from None
    model = float32_model(model)
    if format == "tflite" and _keras_quantized(model):
        quantization = quantization or "int8"
    height, width, channels = _input_size(model)
    batches = _sample_batches(model, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    target = workdir / path.name
    try:
        exported, reference = _convert(model, target, format, batches, quantization, top_k)
        result = {
            "path": str(path),
            "format": format,
            "quantization": quantization,
            "bytes": sum(_size(part) for part in _companions(target, format)),
            "max_abs_diff": float(np.abs(exported - reference).max()),
            "top1_agreement": float(np.mean(exported.argmax(-1) == reference.argmax(-1))),
            "input": _input_description(format, height, width, channels),
        }
        if quantization is None and not result["max_abs_diff"] <= FLOAT_TOLERANCE:  # NaN fails too
            raise ValueError(
                f"The {format} export differs from the Keras model by {result['max_abs_diff']:.3g} "
                f"(> {FLOAT_TOLERANCE}); nothing was written."
            )
        for part, written in reversed(list(zip(_companions(path, format), _companions(target, format)))):
            if part.exists():  # OpenVINO: the .bin first, so that an .xml never names weights not yet in place
                shutil.rmtree(part) if part.is_dir() else part.unlink()
            os.replace(written, part)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
