"""The registry of official checkpoints: which file serves a model name and a weights family.

``resolve(model_name, family, image_size)`` picks the entry for an official
model name and a family (``"imagenet21k"``, ``"augreg_in21k_ft_in1k"``, ...),
preferring the file whose native resolution equals the requested one. Nothing
here downloads or builds anything.
"""

import dataclasses
import urllib.parse

BUCKET = "https://storage.googleapis.com/vit_models/"


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """One released checkpoint: where it is and what it was trained for.

    The architecture details (representation layer, classifier) are read from
    the file itself when it is loaded.
    """

    path: str  # under BUCKET, or a full URL
    resolution: int  # native square resolution, px
    classes: int  # outputs of the stored head (the 2020 imagenet21k heads are zeroed)
    sha256: str | None = None  # verified after download when known; the bucket publishes none
    preprocessing: str = "(pixels - 127.5) / 127.5"  # to [-1, 1], for every official checkpoint
    upstream: str | None = None  # a fine-tune's pre-training run (the augreg file stem), when known

    @property
    def file_name(self):
        """The file name under its family folder, e.g. ``R50+ViT-B_16.npz``."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def url(self):
        return self.path if "://" in self.path else BUCKET + urllib.parse.quote(self.path)


IN21K_CLASSES = 21843
_FT = "--imagenet2012-steps_20k-lr_"
# AugReg ("How to train your ViT?") upstream runs: the official recommendations (vision_transformer README).
_AUGREG_IN21K = {
    "ViT-Ti_16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
    "ViT-S_16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "ViT-S_32": "S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0",
    "ViT-B_16": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "ViT-B_32": "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0",
    "ViT-B_8": "B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0",
    "ViT-L_16": "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0",
    "R+ViT-Ti_16": "R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
    "R26+ViT-S_32": "R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0",
    "R50+ViT-L_32": "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1",
}
# Their ImageNet-1k fine-tunes: (file, resolution). 384 px as recommended upstream; 224 px as picked by timm.
# The file stem before "--" names the upstream run: for S/32, B/32, B/8, L/16 and R26+S/32 at 224 px it is
# another run than the augreg_in21k file above (``PretrainedWeights.upstream``, ``differs_from_augreg_in21k``).
_AUGREG_IN21K_FT_IN1K = {
    "ViT-Ti_16": [
        (f"Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0{_FT}0.03-res_224", 224),
        (f"Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0{_FT}0.03-res_384", 384),
    ],
    "ViT-S_16": [
        (f"S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0{_FT}0.03-res_224", 224),
        (f"S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0{_FT}0.03-res_384", 384),
    ],
    "ViT-S_32": [
        (f"S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0{_FT}0.03-res_224", 224),
        (f"S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0{_FT}0.01-res_384", 384),
    ],
    "ViT-B_16": [
        (f"B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0{_FT}0.01-res_224", 224),
        (f"B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0{_FT}0.01-res_384", 384),
    ],
    "ViT-B_32": [
        (f"B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0{_FT}0.03-res_224", 224),
        (f"B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0{_FT}0.01-res_384", 384),
    ],
    "ViT-B_8": [(f"B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0{_FT}0.01-res_224", 224)],
    "ViT-L_16": [
        (f"L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1{_FT}0.01-res_224", 224),
        (f"L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0{_FT}0.01-res_384", 384),
    ],
    "R+ViT-Ti_16": [
        (f"R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0{_FT}0.03-res_224", 224),
        (f"R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0{_FT}0.03-res_384", 384),
    ],
    "R26+ViT-S_32": [
        (f"R26_S_32-i21k-300ep-lr_0.001-aug_light0-wd_0.03-do_0.1-sd_0.1{_FT}0.03-res_224", 224),
        (f"R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0{_FT}0.01-res_384", 384),
    ],
    "R50+ViT-L_32": [
        (f"R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1{_FT}0.01-res_224", 224),
        (f"R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1{_FT}0.01-res_384", 384),
    ],
}
# ImageNet-1k only (pre-trained and fine-tuned on ImageNet-1k).
_AUGREG_IN1K = {
    "ViT-S_16": "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0",
    "ViT-B_16": "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1",
    "ViT-B_32": "B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1",
}


def _build_registry():
    """{(official model name, family): [PretrainedWeights, ...]} from the tables above."""
    registry = {}

    def add(model, family, path, resolution, classes, upstream=None):
        entry = PretrainedWeights(path, resolution, classes, upstream=upstream)
        registry.setdefault((model, family), []).append(entry)

    for model in (
        "ViT-B_8", "ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "ViT-H_14",
        "R26+ViT-B_32", "R50+ViT-B_16", "R50+ViT-L_32",
    ):
        add(model, "imagenet21k", f"imagenet21k/{model}.npz", 224, IN21K_CLASSES)
    for model in ("ViT-B_16", "ViT-L_16"):
        add(model, "imagenet21k+imagenet2012", f"imagenet21k+imagenet2012/{model}-224.npz", 224, 1000)
    for model in ("ViT-B_8", "ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32", "R50+ViT-B_16"):
        add(model, "imagenet21k+imagenet2012", f"imagenet21k+imagenet2012/{model}.npz", 384, 1000)
    for model, stem in _AUGREG_IN21K.items():
        add(model, "augreg_in21k", f"augreg/{stem}.npz", 224, IN21K_CLASSES)
    for model, files in _AUGREG_IN21K_FT_IN1K.items():
        for stem, resolution in files:
            add(model, "augreg_in21k_ft_in1k", f"augreg/{stem}.npz", resolution, 1000, upstream=stem.split("--")[0])
    for model, stem in _AUGREG_IN1K.items():
        for resolution in (224, 384):
            add(model, "augreg_in1k", f"augreg/{stem}{_FT}0.01-res_{resolution}.npz", resolution, 1000, upstream=stem)
    for model in ("ViT-B_16", "ViT-B_32", "ViT-L_16", "ViT-L_32"):
        add(model, "sam", f"sam/{model}.npz", 224, 1000)
    # Left out: sam/ViT-S_16.npz. It holds about three times the bytes of ViT-S/16's parameters, which is what a
    # full Flax optimizer checkpoint (opt/target parameters plus Adam's two moments under opt/state) would weigh;
    # its arrays could not be inspected here (no network). keras_vit ignores opt/state/ arrays, so if that is
    # what it holds, the file loads by path or URL (weights="https://storage.googleapis.com/vit_models/sam/...").
    return registry


REGISTRY = _build_registry()
FAMILIES = ("imagenet21k", "imagenet21k+imagenet2012", "augreg_in21k", "augreg_in21k_ft_in1k", "augreg_in1k", "sam")


def families_for(model_name):
    """The weight families released for an official model name, e.g. ``["imagenet21k", ...]``."""
    return [family for (model, family) in REGISTRY if model == model_name]


def resolve(model_name, family, image_size=None):
    """The registry entry for ``model_name`` and ``family``; prefers the native resolution ``image_size``.

    Raises ``ValueError`` naming the families that exist for the model.
    """
    model_name = model_name.replace("_ViT", "+ViT")  # a model's default name spells a hybrid's "+" as "_"
    entries = REGISTRY.get((model_name, family))
    if not entries:
        available = families_for(model_name)
        raise ValueError(
            f"No {family!r} weights were released for {model_name}. "
            + (f"Available: {', '.join(available)}." if available else "No pretrained weights exist for it.")
            + f" Families: {', '.join(FAMILIES)}; or pass a local path or URL."
        )
    height = image_size if isinstance(image_size, int) else (image_size or (None,))[0]
    # The file of the requested resolution, otherwise the nearest one (its position embeddings get interpolated).
    return min(entries, key=lambda e: abs(e.resolution - (height or e.resolution)))




def differs_from_augreg_in21k(model_name, entry):
    """Whether an ``augreg_in21k_ft_in1k`` entry fine-tunes another upstream run than the model's augreg_in21k file."""
    upstream = _AUGREG_IN21K.get(model_name)
    return entry.upstream is not None and upstream is not None and entry.upstream != upstream


def weights_table():
    """The README's weights table (Markdown), generated from the registry: one row per file."""
    rows = ["| Model | Family | Resolution | Classes | File | Upstream run |", "|---|---|---|---|---|---|"]
    for (model, family), entries in REGISTRY.items():
        for entry in entries:
            upstream = ""
            if entry.upstream:
                upstream = f"`{entry.upstream}`" + (
                    " (not the augreg_in21k file)"
                    if family == "augreg_in21k_ft_in1k" and differs_from_augreg_in21k(model, entry)
                    else ""
                )
            rows.append(
                f"| {model} | {family} | {entry.resolution} | {entry.classes} | `{entry.path}` | {upstream} |"
            )
    return "\n".join(rows)
