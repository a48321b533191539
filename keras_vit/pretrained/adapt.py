"""Fitting checkpoint arrays to a model that differs from the checkpoint: the one place for these rules.

``adapt`` is a checkpoint filter (timm's ``checkpoint_filter_fn``) on
``{official name: array}``: it knows what goes with the head, how position
embeddings follow the token grid, how the patch kernel follows the patch size
and the input channels. It never touches a model: the model is described by
``shapes`` ({official name: shape of the model's variable}), its token
``grid`` and number of prefix tokens. ``log_notes`` reports each change once
through this module's logger (``keras_vit.pretrained.adapt``) after loading
succeeded.
"""

import logging

from keras_vit.pretrained.names import POSEMB
from keras_vit.pretrained.resample import adapt_input_channels, interpolate_posemb, resample_patch_kernel

log = logging.getLogger(__name__)
_HEAD = ("head/kernel", "head/bias")
_PRE_LOGITS = ("pre_logits/kernel", "pre_logits/bias")


def _pop(arrays, names):
    for name in names:
        arrays.pop(name, None)


def _adapt_top(arrays, shapes, kept, notes):
    """The head and the pre-logits layer that feeds it."""
    head, model_head = arrays.get("head/kernel"), shapes.get("head/kernel")
    if head is None and model_head is not None and "embedding/kernel" in arrays:
        kept.update(_HEAD)  # a headless encoder (include_top=False, self-supervised)
        notes.append(f"The checkpoint has no head: the model keeps its zero-initialised {model_head[-1]}-class head.")
    elif head is not None and model_head is None:
        _pop(arrays, _HEAD)
        notes.append("Dropped the checkpoint's head: the model has none (include_top=False).")
    elif head is not None and head.shape[0] == model_head[0] and tuple(head.shape) != tuple(model_head):
        _pop(arrays, _HEAD)
        kept.update(_HEAD)
        notes.append(
            f"Replaced the checkpoint's {head.shape[-1]}-class head by a zero-initialised {model_head[-1]}-class head."
        )
    # The pre-logits layer goes with the head it fed, as in the official fine-tuning code.
    if "pre_logits/kernel" in arrays and "pre_logits/kernel" not in shapes and "head/kernel" not in arrays:
        _pop(arrays, _PRE_LOGITS)
        notes.append("Dropped the checkpoint's pre_logits layer: the model has no representation layer.")


def _adapt_first_kernels(arrays, shapes, notes):
    """Patch size of the patch embedding, then input channels of the first convolution."""
    name, kernel, target = "embedding/kernel", arrays.get("embedding/kernel"), shapes.get("embedding/kernel")
    if kernel is not None and target is not None and kernel.shape[2:] == tuple(target[2:]) and (
        kernel.shape[:2] != tuple(target[:2])
    ):
        arrays[name] = resample_patch_kernel(kernel, target[:2])
        notes.append(
            f"Resampled the patch-embedding kernel from {kernel.shape[0]}x{kernel.shape[1]} to "
            f"{target[0]}x{target[1]} patches (FlexiViT pseudo-inverse resize)."
        )
    name = "conv_root/kernel" if "conv_root/kernel" in shapes else "embedding/kernel"
    kernel, target = arrays.get(name), shapes.get(name)
    if kernel is not None and target is not None and kernel.ndim == 4 and (
        kernel.shape[:2] == tuple(target[:2]) and kernel.shape[3] == target[3] and kernel.shape[2] != target[2]
    ):
        arrays[name] = adapt_input_channels(kernel, target[2])
        how = "summed over" if target[2] == 1 else "repeated and scaled from"
        notes.append(f"Adapted {name} to {target[2]} input channels ({how} the checkpoint's {kernel.shape[2]}).")


def _adapt_posemb(arrays, shapes, grid, num_prefix_tokens, source_grid, notes):
    """Position embeddings follow the model's token grid (when the class token and hidden size agree)."""
    posemb, target = arrays.get(POSEMB), shapes.get(POSEMB)
    if posemb is None or target is None or posemb.ndim != 3 or posemb.shape[-1] != target[-1]:
        return
    if ("cls" in arrays) != bool(num_prefix_tokens) or posemb.shape[1] == target[1]:
        return  # a token checkpoint for a gap model (or the reverse) is an architecture mismatch, not a grid
    arrays[POSEMB] = interpolate_posemb(posemb, grid, num_prefix_tokens=num_prefix_tokens, source_grid=source_grid)
    notes.append(
        f"Interpolated position embeddings from {posemb.shape[1] - num_prefix_tokens} grid tokens to a "
        f"{grid[0]}x{grid[1]} grid."
    )


def adapt(arrays, shapes, grid, num_prefix_tokens, source_grid=None):
    """Fits ``arrays`` (canonical names) to a model described by ``shapes``, ``grid`` and ``num_prefix_tokens``.

    * a head the model lacks (``include_top=False``) is dropped; a model head
      the checkpoint lacks stays as initialised; a head with another number
      of classes is dropped and the model keeps its zero-initialised head;
    * the pre-logits layer goes with a dropped head unless the model has one;
    * the patch-embedding kernel is resampled to the model's patch size
      (``resample_patch_kernel``), and the first convolution's kernel
      (``embedding`` or a hybrid's ``conv_root``) adapted to its input
      channels (``adapt_input_channels``);
    * position embeddings are interpolated to the model's grid
      (``interpolate_posemb``; ``source_grid`` is the checkpoint's grid when
      it is not square).

    Only arrays whose hidden size fits the model are adapted, so a checkpoint
    of another variant still fails the strict match with the full lists.
    Returns ``(arrays, kept, notes)``: the adapted arrays (a new dict), the
    names of model weights that keep their initial values, and one line per change.
    """
    arrays, kept, notes = dict(arrays), set(), []
    _adapt_top(arrays, shapes, kept, notes)
    _adapt_first_kernels(arrays, shapes, notes)
    _adapt_posemb(arrays, shapes, grid, num_prefix_tokens, source_grid, notes)
    return arrays, kept, notes


def log_notes(notes, source):
    """Logs each adaptation note once, at INFO, naming the source."""
    for note in notes:
        log.info("%s: %s", source, note)
