"""Geometry of pretrained arrays: position-embedding grids, patch-kernel sizes, input channels.

All functions are NumPy, float64 inside, and return the input dtype.
"""

import numpy as np


def square_grid(num_tokens):
    """The (g, g) grid of ``num_tokens`` grid tokens; ``ValueError`` when it is not a square."""
    side = int(round(np.sqrt(num_tokens)))
    if side * side != num_tokens:
        raise ValueError(
            f"{num_tokens} position embeddings do not form a square grid; pass the source grid (rows, columns) "
            "explicitly for a rectangular checkpoint."
        )
    return (side, side)


def _linear_resample(array, size, axis):
    """Linear interpolation along ``axis`` to ``size`` samples with aligned corners (float64)."""
    old = array.shape[axis]
    if size == old:
        return array
    positions = np.arange(size) * ((old - 1) / (size - 1)) if size > 1 else np.zeros(1)
    low = np.clip(np.floor(positions).astype(int), 0, old - 1)
    high = np.minimum(low + 1, old - 1)
    frac = (positions - low).reshape([-1 if a == axis else 1 for a in range(array.ndim)])
    return np.take(array, low, axis=axis) * (1 - frac) + np.take(array, high, axis=axis) * frac


def interpolate_posemb(posemb, target_grid, num_prefix_tokens=1, source_grid=None):
    """Resizes position embeddings (1, prefix + gh*gw, D) to (1, prefix + th*tw, D), the official way.

    The prefix (class-token) rows are kept; the grid is resampled bilinearly
    with aligned corners, which is what the official ``interpolate_posembed``
    does through ``scipy.ndimage.zoom(order=1)``. ``source_grid`` defaults to
    the square grid; rectangular grids are supported both ways.
    """
    posemb = np.asarray(posemb)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"Position embeddings must be shaped (1, tokens, hidden), got {posemb.shape}.")
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:].astype(np.float64)
    if source_grid is None:
        try:
            source_grid = square_grid(grid.shape[0])
        except ValueError:
            side = int(round(np.sqrt(posemb.shape[1])))
            if num_prefix_tokens and side * side == posemb.shape[1]:
                raise ValueError(
                    f"The {posemb.shape[1]} position embeddings form a {side}x{side} grid with no class-token row "
                    f"(big_vision's layout), not {num_prefix_tokens} prefix row(s) and a grid: pass "
                    "num_prefix_tokens=0."
                ) from None
            raise
    source_grid = tuple(source_grid)
    if source_grid[0] * source_grid[1] != grid.shape[0]:
        raise ValueError(f"Source grid {source_grid} does not hold the {grid.shape[0]} position embeddings given.")
    grid = grid.reshape(*source_grid, -1)
    grid = _linear_resample(_linear_resample(grid, target_grid[0], 0), target_grid[1], 1)
    grid = grid.reshape(1, target_grid[0] * target_grid[1], -1).astype(posemb.dtype)
    return np.concatenate([prefix, grid], axis=1)


# Antialiased resampling filters as PyTorch's ``F.interpolate(..., antialias=True)`` has them (after PIL's):
# (support at scale 1, weight of a distance). Bicubic uses a = -0.5 (Keys' cubic as PIL), not -0.75.
def _cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


ANTIALIASED_FILTERS = {"bicubic": (2.0, _cubic), "bilinear": (1.0, lambda x: np.maximum(0.0, 1.0 - np.abs(x)))}


def antialiased_resize_matrix(old, new, kernel="bicubic"):
    """(new, old) matrix of PyTorch's antialiased 1-D resize (``F.interpolate(mode=kernel, antialias=True,
    align_corners=False)``, timm's ``resample_abs_pos_embed``), float64.

    Output sample i is centred at ``c = (i + 0.5) * s`` input samples, ``s = old / new``; the filter is widened by
    ``s`` when shrinking (``support = r * max(s, 1)``, its argument scaled by ``1 / max(s, 1)``), reads the input
    samples j in ``[trunc(c - support + 0.5), trunc(c + support + 0.5))`` clipped to the input, at distance
    ``j + 0.5 - c``, and its weights are normalized to sum to 1 (so the borders are not clamped but renormalized).
    """
    radius, weight = ANTIALIASED_FILTERS[kernel]
    scale = old / new
    stretch = max(scale, 1.0)
    support = radius * stretch
    centres = (np.arange(new) + 0.5) * scale
    low = np.maximum(np.trunc(centres - support + 0.5), 0)
    high = np.minimum(np.trunc(centres + support + 0.5), old)
    j = np.arange(old)[None, :]
    inside = (j >= low[:, None]) & (j < high[:, None])
    weights = np.where(inside, weight((j + 0.5 - centres[:, None]) / stretch), 0.0)
    return weights / weights.sum(axis=1, keepdims=True)


def resample_posemb_antialiased(posemb, target_grid, num_prefix_tokens=1, source_grid=None, kernel="bicubic"):
    """Resizes position embeddings (1, prefix + gh*gw, D) to (1, prefix + th*tw, D) as timm's
    ``resample_abs_pos_embed`` does by default: the grid resized as an image with PyTorch's antialiased bicubic
    (``antialiased_resize_matrix`` on each axis), the prefix rows kept. ``source_grid`` defaults to the square
    grid. Computed in float64, returned in the input dtype."""
    posemb = np.asarray(posemb)
    grid = posemb[0, num_prefix_tokens:].astype(np.float64)
    source_grid = tuple(source_grid) if source_grid is not None else square_grid(grid.shape[0])
    target_grid = tuple(target_grid)
    if source_grid == target_grid:
        return posemb
    grid = grid.reshape(*source_grid, -1)
    rows = antialiased_resize_matrix(source_grid[0], target_grid[0], kernel)
    columns = antialiased_resize_matrix(source_grid[1], target_grid[1], kernel)
    grid = np.einsum("ih,hwd,jw->ijd", rows, grid, columns).reshape(1, target_grid[0] * target_grid[1], -1)
    return np.concatenate([posemb[:, :num_prefix_tokens], grid.astype(posemb.dtype)], axis=1)


def bilinear_resize_matrix(old, new):
    """(new, old) matrix of 1-D bilinear resizing with half-pixel centres and no antialiasing.

    The weights of ``tf.image.resize(..., "bilinear")`` (TensorFlow 2's default ``antialias=False``), the resize
    FlexiViT's ``resample_patchemb`` builds its matrix from (big_vision ``models/proj/flexi/vit.py``): output
    sample i sits at input coordinate ``(i + 0.5) * old / new - 0.5`` and interpolates the two input samples
    around it (the nearest one at the borders), whether growing or shrinking.
    """
    centres = (np.arange(new) + 0.5) * (old / new) - 0.5
    distance = np.arange(old)[None, :] - centres[:, None]
    weights = np.maximum(0.0, 1.0 - np.abs(distance))
    return weights / weights.sum(axis=1, keepdims=True)


def resample_patch_kernel(kernel, new_size):
    """FlexiViT's pseudo-inverse resize of a patch-embedding kernel (ph, pw, C, D) to (nh, nw, C, D).

    With B the (nh*nw, ph*pw) bilinear resize of a patch (``bilinear_resize_matrix``
    on each axis), the new kernel is ``pinv(B^T) @ w`` for each flattened
    filter w: the kernel whose tokens of resized patches best match the old
    tokens of the original patches, ``<x, w> = <B x, w_new>`` (exactly when
    growing the patch). Beyer et al., "FlexiViT: One Model for All Patch
    Sizes", 2023, section 3.4; the same matrix as big_vision's
    ``resample_patchemb``.
    """
    kernel = np.asarray(kernel)
    old, new = tuple(kernel.shape[:2]), tuple(new_size)
    if old == new:
        return kernel
    resize = np.kron(bilinear_resize_matrix(old[0], new[0]), bilinear_resize_matrix(old[1], new[1]))
    flat = kernel.astype(np.float64).reshape(old[0] * old[1], -1)
    resampled = np.linalg.pinv(resize.T) @ flat
    return resampled.reshape(*new, *kernel.shape[2:]).astype(kernel.dtype)


def adapt_input_channels(kernel, channels):
    """A first-layer kernel (kh, kw, C, D) for ``channels`` input channels, as timm's ``adapt_input_conv``.

    One channel: the sum over the C input channels (a grey image gives the
    colour model's response to that grey). Otherwise: the C channels
    repeated to ``channels`` and scaled by C / channels.
    """
    kernel = np.asarray(kernel)
    have = kernel.shape[2]
    if channels == have:
        return kernel
    wide = kernel.astype(np.float64)
    if channels == 1:
        return wide.sum(axis=2, keepdims=True).astype(kernel.dtype)
    repeats = -(-channels // have)
    return (np.tile(wide, (1, 1, repeats, 1))[:, :, :channels] * (have / channels)).astype(kernel.dtype)
