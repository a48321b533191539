"""What a ViT learned, as in the seed's Figures 6 and 7: attention maps and rollout, mean attention
distance, position-embedding similarity and the principal components of the patch-embedding filters.

Every function returns NumPy arrays; ``keras_vit.plotting`` draws them. Shapes: B = batch, L = blocks,
N = heads, T = tokens, (gh, gw) = token grid, P = number of prefix (class) tokens (1 or 0).
"""

import keras
import numpy as np

from keras_vit.models import as_vision_transformer
from keras_vit.pretrained.resample import square_grid

HEAD_FUSIONS = ("mean", "max", "min")


def attention_maps(model, images, batch_size=32):
    """The attention weights of every block for ``images``: a list of L arrays (B, N, T, T), float32.

    Read from ``model.features(..., attention=True)`` in inference mode, in
    batches of ``batch_size``; plain and hybrid models alike.
    """
    vit = as_vision_transformer(model, "attention_maps")
    images = np.asarray(images, "float32")
    batches = []
    for start in range(0, len(images), batch_size):
        attentions = vit.features(images[start : start + batch_size], attention=True)["attention"]
        batches.append([keras.ops.convert_to_numpy(weights) for weights in attentions])
    return [np.concatenate(per_block).astype("float32") for per_block in zip(*batches)]


def _fuse_heads(attention, head_fusion):
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}.")
    return getattr(np, head_fusion)(attention, axis=1)


def rollout(attentions, head_fusion="mean", discard_ratio=0.0, num_prefix_tokens=1, class_token=None):
    """Attention rollout (Abnar & Zuidema, 2020) of attentions [(B, N, T, T)] * L: relevance (B, T) of each token.

    Per block: heads fused (mean/max/min), the lowest ``discard_ratio`` of
    each map's weights set to 0 (prefix-token columns kept), the identity
    added for the residual connection and rows renormalised; the maps are
    multiplied from the first block to the last. Class-token models read the
    class token's row; others (gap, MAP) average the rows of the grid tokens.
    ``class_token`` defaults to ``num_prefix_tokens > 0``; with register tokens pass it.
    """
    result = None
    for attention in attentions:
        fused = _fuse_heads(np.asarray(attention, np.float64), head_fusion)  # (B, T, T)
        if discard_ratio:
            batch, tokens, _ = fused.shape
            flat = fused.reshape(batch, -1).copy()
            count = int(flat.shape[1] * discard_ratio)
            lowest = np.argsort(flat, axis=1)[:, :count]
            keep_prefix = (lowest % tokens) < num_prefix_tokens  # never drop attention to the class token
            rows = np.repeat(np.arange(batch)[:, None], count, axis=1)
            flat[rows[~keep_prefix], lowest[~keep_prefix]] = 0.0
            fused = flat.reshape(batch, tokens, tokens)
        fused = fused + np.eye(fused.shape[-1])
        fused = fused / fused.sum(-1, keepdims=True)
        result = fused if result is None else fused @ result
    class_token = num_prefix_tokens > 0 if class_token is None else class_token
    return result[:, 0] if class_token else result[:, num_prefix_tokens:].mean(axis=1)


def attention_rollout(model, images, head_fusion="mean", discard_ratio=0.0, batch_size=32):
    """Rollout heat maps of ``images`` (B, H, W, C): ``{"grid": (B, gh, gw), "image": (B, H, W)}``, max 1.

    Uses the class token for token models and the grid tokens for the others; register tokens are left out;
    rectangular grids and hybrids work (the grid is the token grid).
    """
    vit = as_vision_transformer(model, "attention_rollout")
    prefix = vit.num_prefix_tokens
    relevance = rollout(attention_maps(vit, images, batch_size), head_fusion, discard_ratio, prefix,
                        vit.architecture.class_token)
    images = np.asarray(images)
    maps = relevance[:, prefix:].reshape(-1, *vit.grid_for(images))
    maps = maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-12)
    height, width = images.shape[1:3]
    upsampled = keras.ops.convert_to_numpy(keras.ops.image.resize(maps[..., None].astype("float32"), (height, width)))
    return {"grid": maps.astype("float32"), "image": upsampled[..., 0]}


def _grid_positions(grid):
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)


def mean_attention_distance(attentions, grid, token_stride, num_prefix_tokens=1):
    """Mean attention distance in pixels, (L, N): the seed's Figure 7 (right).

    For each query patch, the distance between patch centres
    (``token_stride`` pixels per grid step, e.g. the patch size) is averaged
    with the query's attention weights over the patch keys (renormalised to
    sum to one, prefix tokens left out), then averaged over queries and images.
    """
    stride = np.broadcast_to(np.asarray(token_stride, np.float64), (2,))
    positions = _grid_positions(grid) * stride
    distances = np.linalg.norm(positions[:, None] - positions[None], axis=-1)  # (T', T')
    result = []
    for attention in attentions:
        patches = np.asarray(attention, np.float64)[:, :, num_prefix_tokens:, num_prefix_tokens:]
        patches = patches / patches.sum(-1, keepdims=True)
        result.append((patches * distances).sum(-1).mean(axis=(0, 2)))
    return np.stack(result)


def position_embedding_similarity(model_or_posemb, grid=None, num_prefix_tokens=None):
    """Cosine similarity of each patch's position embedding with all others, (gh, gw, gh, gw): Figure 7 (centre)."""
    if isinstance(model_or_posemb, keras.Model):
        vit = as_vision_transformer(model_or_posemb, "position_embedding_similarity")
        posemb = vit.position_embeddings()
        grid = grid or vit.architecture.posemb_grid
        num_prefix_tokens = 0
    else:
        posemb = np.asarray(model_or_posemb)
    vectors = posemb.reshape(-1, posemb.shape[-1])[num_prefix_tokens or 0 :].astype(np.float64)
    grid = grid or square_grid(len(vectors))
    unit = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (unit @ unit.T).reshape(*grid, *grid)


def embedding_filters(model, num_components=28):
    """The first principal components of the patch-embedding filters, (K, ph, pw, C) scaled to [0, 1]: Figure 7 (left).

    The D filters (ph*pw*C values each) are centred; the components are the
    top right-singular vectors, each min-max scaled for display as an RGB tile.
    Also returns the explained-variance ratios (K,).
    """
    vit = as_vision_transformer(model, "embedding_filters")
    kernel = keras.ops.convert_to_numpy(vit.get_layer("embedding").kernel).astype(np.float64)  # (ph, pw, C, D)
    filters = kernel.reshape(-1, kernel.shape[-1]).T  # (D, ph*pw*C)
    centred = filters - filters.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    count = min(num_components, len(components))
    tiles = components[:count].reshape(count, *kernel.shape[:3])
    low = tiles.min(axis=(1, 2, 3), keepdims=True)
    high = tiles.max(axis=(1, 2, 3), keepdims=True)
    variance = singular**2 / np.sum(singular**2)
    return ((tiles - low) / np.maximum(high - low, 1e-12)).astype("float32"), variance[:count]


def pixels_per_token(model):
    """(rows, columns) of image pixels per token of a model: patch size x ResNet stride."""
    return tuple(float(s) for s in as_vision_transformer(model, "pixels_per_token").token_stride)


def model_attention_distance(model, images, batch_size=32):
    """``mean_attention_distance`` of ``model`` on ``images``: (L, N) pixels."""
    vit = as_vision_transformer(model, "model_attention_distance")
    return mean_attention_distance(
        attention_maps(vit, images, batch_size), vit.grid_for(np.asarray(images)), pixels_per_token(vit),
        vit.num_prefix_tokens
    )
