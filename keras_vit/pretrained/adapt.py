"""Fitting checkpoint arrays to a model that differs from the checkpoint: the one place for these rules.

``adapt`` is a checkpoint filter (timm's ``checkpoint_filter_fn``) on ``{official name: array}``: it knows what
goes with the head, how position embeddings follow the token grid, how the patch kernel follows the patch size
and the input channels. It never touches a model: the target is described by its ``Architecture``.
``log_notes`` reports each change once through this module's logger (``keras_vit.pretrained.adapt``) after
loading succeeded.
"""

import logging

from keras_vit.layers.heads import POOLINGS
from keras_vit.pretrained.names import POSEMB
from keras_vit.pretrained.resample import (
    adapt_input_channels,
    interpolate_posemb,
    resample_patch_kernel,
    resample_posemb_antialiased,
)

log = logging.getLogger(__name__)
_HEAD = ("head/kernel", "head/bias")
_PRE_LOGITS = ("pre_logits/kernel", "pre_logits/bias")


def _pop(arrays, names):
    for name in names:
        arrays.pop(name, None)


def _adapt_top(arrays, arch, kept, notes):
    """The head, the pre-logits layer that feeds it and a pooling with weights (MAP)."""
    head = arrays.get("head/kernel")
    if head is None and arch.classes is not None and "embedding/kernel" in arrays:
        kept.update(_HEAD)  # a headless encoder (include_top=False, self-supervised)
        notes.append(f"The checkpoint has no head: the model keeps its zero-initialised {arch.classes}-class head.")
    elif head is not None and arch.classes is None:
        _pop(arrays, _HEAD)
        notes.append("Dropped the checkpoint's head: the model has none (include_top=False).")
    elif head is not None and head.shape[0] == (arch.representation_size or arch.hidden_size) and (
        head.shape[-1] != arch.classes
    ):
        _pop(arrays, _HEAD)
        kept.update(_HEAD)
        notes.append(f"Replaced the checkpoint's {head.shape[-1]}-class head by a zero-initialised {arch.classes}-class head.")
    # The pre-logits layer goes with the head it fed, as in the official fine-tuning code.
    if "pre_logits/kernel" in arrays and not arch.representation_size and "head/kernel" not in arrays:
        _pop(arrays, _PRE_LOGITS)
        notes.append("Dropped the checkpoint's pre_logits layer: the model has no representation layer.")
    if arch.fc_norm and arch.pooling is None and any(name.startswith("fc_norm/") for name in arrays):
        _pop(arrays, [name for name in arrays if name.startswith("fc_norm/")])
        notes.append("Dropped the checkpoint's fc_norm (the norm after pooling): the model does not pool.")
    for kind, entry in POOLINGS.items():
        scope = entry.official_scope and entry.official_scope + "/"
        if scope and kind != arch.pooling and any(name.startswith(scope) for name in arrays):
            _pop(arrays, [name for name in arrays if name.startswith(scope)])
            notes.append(f"Dropped the checkpoint's {kind} pooling ({entry.official_scope}): the model does not use it.")


def _adapt_first_kernels(arrays, arch, notes):
    """Patch size of the patch embedding, then input channels of the first convolution."""
    kernel = arrays.get("embedding/kernel")
    if kernel is not None and kernel.shape[:2] != arch.patch_size and kernel.shape[-1] == arch.hidden_size:
        arrays["embedding/kernel"] = resample_patch_kernel(kernel, arch.patch_size)
        notes.append(
            f"Resampled the patch-embedding kernel from {kernel.shape[0]}x{kernel.shape[1]} to "
            f"{arch.patch_size[0]}x{arch.patch_size[1]} patches (FlexiViT pseudo-inverse resize)."
        )
    if arch.resnet_layers is not None:
        name, size, width = "conv_root/kernel", (7, 7), int(64 * arch.resnet_width_factor)
    else:
        name, size, width = "embedding/kernel", arch.patch_size, arch.hidden_size
    kernel = arrays.get(name)
    if kernel is not None and kernel.ndim == 4 and kernel.shape[2] != arch.channels and (
        tuple(kernel.shape[:2]) == tuple(size) and kernel.shape[3] == width
    ):
        arrays[name] = adapt_input_channels(kernel, arch.channels)
        how = "summed over" if arch.channels == 1 else "repeated and scaled from"
        notes.append(f"Adapted {name} to {arch.channels} input channels ({how} the checkpoint's {kernel.shape[2]}).")


# posemb_interpolation: the NumPy resampling of a learned table (the model resamples in the graph the same way)
_POSEMB_RESAMPLING = {
    "bilinear": (interpolate_posemb, "bilinear, the official interpolation"),
    "bicubic": (resample_posemb_antialiased, "antialiased bicubic, timm's resample_abs_pos_embed"),
}


def _adapt_posemb(arrays, arch, source_grid, notes):
    """Position embeddings follow the model's token grid (when the prefix rows and hidden size agree)."""
    posemb, target = arrays.get(POSEMB), arch.posemb_shape
    if posemb is None or target is None or posemb.ndim != 3 or posemb.shape[-1] != target[-1]:
        return
    prefix = arch.posemb_prefix_rows
    if ("cls" in arrays) != arch.class_token or posemb.shape[1] == target[1]:
        return  # a token checkpoint for a gap model (or the reverse) is an architecture mismatch, not a grid
    grid = arch.posemb_grid  # the model's grid; a model of any size: the grid its table is laid out for
    resample, how = _POSEMB_RESAMPLING[arch.posemb_interpolation]
    arrays[POSEMB] = resample(posemb, grid, num_prefix_tokens=prefix, source_grid=source_grid)
    notes.append(f"Interpolated position embeddings from {posemb.shape[1] - prefix} grid tokens to a "
                 f"{grid[0]}x{grid[1]} grid ({how}).")


def adapt(arrays, arch, source_grid=None):
    """Fits ``arrays`` (canonical names) to a model of architecture ``arch``.

    * a head the model lacks (``include_top=False``) is dropped; a model head the checkpoint lacks stays as
      initialised; a head with another number of classes is dropped and the model keeps its zero-initialised
      head; the pre-logits layer goes with a dropped head unless the model has one; a MAP head goes unless the
      model pools with one;
    * the patch-embedding kernel is resampled to the model's patch size (``resample_patch_kernel``), and the
      first convolution's kernel (``embedding`` or a hybrid's ``conv_root``) adapted to its input channels
      (``adapt_input_channels``);
    * position embeddings are interpolated to the model's grid (``interpolate_posemb``; ``source_grid`` is the
      checkpoint's grid when it is not square).

    Only arrays whose hidden size fits the model are adapted, so a checkpoint of another variant still fails the
    strict match with the full lists. Returns ``(arrays, kept, notes)``: the adapted arrays (a new dict), the
    names of model weights that keep their initial values, and one line per change.
    """
    arrays, kept, notes = dict(arrays), set(), []
    _adapt_top(arrays, arch, kept, notes)
    _adapt_first_kernels(arrays, arch, notes)
    _adapt_posemb(arrays, arch, source_grid, notes)
    return arrays, kept, notes


def log_notes(notes, source):
    """Logs each adaptation note once, at INFO, naming the source."""
    for note in notes:
        log.info("%s: %s", source, note)
