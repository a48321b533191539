"""PNG figures (need matplotlib: ``pip install keras3-vit[plots]``): the seed's Figures 6 and 7, training curves and
a search's trials. Without matplotlib each function raises an ``ImportError`` that says what to install."""

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("Plotting needs matplotlib: pip install 'keras3-vit[plots]'.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path):
    figure.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(figure)
    return path


def plot_embedding_filters(tiles, path, columns=7):
    """Principal components of the patch-embedding filters, (K, ph, pw, C) in [0, 1], as a grid of tiles."""
    plt = _pyplot()
    rows = int(np.ceil(len(tiles) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 0.9, rows * 0.9), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, tile in zip(axes.ravel(), tiles):
        axis.imshow(tile if tile.shape[-1] == 3 else tile[..., 0], cmap=None if tile.shape[-1] == 3 else "gray")
    figure.suptitle("RGB embedding filters (first principal components)")
    return _save(figure, path)


def plot_position_similarity(similarity, path):
    """Cosine similarity of position embeddings, (gh, gw, gh, gw): one small map per patch position."""
    plt = _pyplot()
    gh, gw = similarity.shape[:2]
    figure, axes = plt.subplots(gh, gw, figsize=(gw * 0.6 + 1, gh * 0.6), squeeze=False)
    for row in range(gh):
        for col in range(gw):
            image = axes[row, col].imshow(similarity[row, col], vmin=-1, vmax=1, cmap="viridis")
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
    figure.colorbar(image, ax=axes, fraction=0.02, label="cosine similarity")
    figure.supxlabel("input patch column")
    figure.supylabel("input patch row")
    figure.suptitle("Position embedding similarity")
    return _save(figure, path)


def plot_attention_distance(distances, path):
    """Mean attention distance (L, N) in pixels: one dot per head, network depth on the x axis."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(4.5, 3.5))
    layers, heads = distances.shape
    for head in range(heads):
        axis.scatter(np.arange(layers), distances[:, head], s=12, label=f"head {head + 1}")
    axis.set(xlabel="network depth (layer)", ylabel="mean attention distance (pixels)", title="Mean attention distance")
    if heads <= 16:
        axis.legend(fontsize=6, ncol=2)
    return _save(figure, path)


def plot_attention_overlays(images, heat_maps, path):
    """Images (B, H, W, C) in [-1, 1] beside their rollout heat maps (B, H, W) in [0, 1]."""
    plt = _pyplot()
    count = len(images)
    figure, axes = plt.subplots(2, count, figsize=(count * 1.8, 3.8), squeeze=False)
    for i in range(count):
        picture = np.clip((images[i] + 1) / 2, 0, 1)
        picture = picture if picture.shape[-1] == 3 else picture[..., 0]
        axes[0, i].imshow(picture, cmap=None if picture.ndim == 3 else "gray")
        axes[1, i].imshow(picture, cmap=None if picture.ndim == 3 else "gray")
        axes[1, i].imshow(heat_maps[i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[0, i].axis("off")
        axes[1, i].axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title("attention rollout", fontsize=8, loc="left")
    return _save(figure, path)


def plot_training_curves(history, path):
    """Training loss and train/eval top-1 against the step, from rows ``{"step", "loss", "accuracy", "val_accuracy"}``."""
    plt = _pyplot()
    steps = [r["step"] for r in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.plot(steps, [r["loss"] for r in history])
    left.set(xlabel="step", ylabel="training loss")
    right.plot(steps, [r["accuracy"] for r in history], label="train")
    evaluated = [r for r in history if r.get("val_accuracy") is not None]
    right.plot([r["step"] for r in evaluated], [r["val_accuracy"] for r in evaluated], "o-", label="eval")
    right.set(xlabel="step", ylabel="top-1", ylim=(0, 1))
    right.legend()
    figure.tight_layout()
    return _save(figure, path)


def plot_trials(rows, objective, path):
    """A search's ``objective`` per trial (rows with ``trial`` and the objective; trials without it are left out)."""
    plt = _pyplot()
    done = [row for row in rows if row.get(objective) is not None]
    figure, axis = plt.subplots(figsize=(5, 3))
    axis.plot(range(len(done)), [row[objective] for row in done], "o-")
    axis.set(xlabel="trial", ylabel=objective, title="Search")
    axis.set_xticks(range(len(done)), [row["trial"] for row in done], rotation=90, fontsize=6)
    figure.tight_layout()
    return _save(figure, path)


def write_figures(model, images, folder):
    """Writes the four figures for ``model`` and ``images`` (B, H, W, C) in [-1, 1] into ``folder``; returns paths."""
    from pathlib import Path

    from keras_vit import analysis

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiles, _ = analysis.embedding_filters(model)
    return [
        plot_embedding_filters(tiles, folder / "embedding_filters.png"),
        plot_position_similarity(analysis.position_embedding_similarity(model), folder / "position_similarity.png"),
        plot_attention_distance(analysis.model_attention_distance(model, images), folder / "attention_distance.png"),
        plot_attention_overlays(images, analysis.attention_rollout(model, images)["image"], folder / "attention_rollout.png"),
    ]
