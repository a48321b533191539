"""The registry of official checkpoints: which file serves a model name and a weights family.

``resolve(model_name, family, image_size)`` picks the entry for an official
model name and a family (``"imagenet21k"``, ``"augreg_in21k_ft_in1k"``,
``"siglip2_webli"``, ...), preferring the file whose native resolution equals
the requested one. ``FAMILY_INFO`` says per family who released the files, where
their names come from and what input they expect. Nothing here downloads or
builds anything.
"""

import dataclasses
import urllib.parse

_STORAGE = "https://storage.googleapis.com/"  # serves gs://BUCKET/PATH as _STORAGE + BUCKET/PATH
BUCKET = _STORAGE + "vit_models/"
BIG_VISION_BUCKET = _STORAGE + "big_vision/"


@dataclasses.dataclass(frozen=True)
class PretrainedWeights:
    """One released checkpoint: where it is and what it was trained for.

    The architecture details (representation layer, classifier) are read from
    the file itself when it is loaded.
    """

    path: str  # under BUCKET, a full URL, or a Hugging Face Hub id (hf-hub:timm/<entry point>.<tag>)
    resolution: int  # native square resolution, px
    classes: int | None  # outputs of the stored head (the 2020 imagenet21k heads are zeroed); None: no head
    sha256: str | None = None  # verified after download when known; the buckets publish none (the Hub: per file)
    preprocessing: str = "(pixels - 127.5) / 127.5"  # to [-1, 1]; the family's FAMILY_INFO entry says more
    upstream: str | None = None  # a fine-tune's pre-training run (the augreg file stem), when known
    top1: float | None = None  # ImageNet-1k top-1 (%) published in timm's results/results-imagenet.csv
    input_settings: dict | None = dataclasses.field(default=None, compare=False)  # timm's pretrained_cfg input

    @property
    def file_name(self):
        """The file name under its family folder, e.g. ``R50+ViT-B_16.npz``."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def is_hub(self):
        """Whether the file is a Hugging Face Hub repository (read by ``keras_vit.pretrained.timm``)."""
        return self.path.startswith(HUB_PREFIX)

    @property
    def url(self):
        return self.path if "://" in self.path or self.is_hub else BUCKET + urllib.parse.quote(self.path)


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


# big_vision (gs://big_vision): FlexiViT (Beyer et al. 2023), file names from big_vision's
# configs/proj/flexivit/README.md (and VANITY_NAMES of models/proj/flexi/vit.py). A FlexiViT file holds one
# patch-embedding kernel and a 7x7 position-embedding grid (posemb_size) for 240 px; it serves every patch size of
# its width: loading resamples the kernel (FlexiViT's pseudo-inverse resize) and interpolates the grid.
_FLEXIVIT = {  # width: (file of the recommended ImageNet-1k model, 1200 epochs; keras_vit variants of that width)
    "S": ("flexivit/flexivit_s_i1k.npz", ("ViT-S_16", "ViT-S_32")),
    "B": ("flexivit/flexivit_b_i1k.npz", ("ViT-B_8", "ViT-B_16", "ViT-B_32")),
    "L": ("flexivit/flexivit_l_i1k.npz", ("ViT-L_16", "ViT-L_32")),
}
# ImageNet-21k FlexiViT-B, 1000 epochs: "Should be the best available -B model" (the paper used the 300ep file).
_FLEXIVIT_I21K = "flexivit/flexivit_b_i21k_1000ep.npz"
# SigLIP image towers (two-tower files; keras_vit reads params/img/ and ignores the text tower): file names from
# big_vision's configs/proj/image_text/SigLIP_demo.ipynb (gs://big_vision/siglip/). (variant, resolution): file.
_SIGLIP = {
    ("ViT-B_16", 224): "siglip/webli_en_b16_224_63724782.npz",
    ("ViT-B_16", 256): "siglip/webli_en_b16_256_60500360.npz",
    ("ViT-B_16", 384): "siglip/webli_en_b16_384_68578854.npz",
    ("ViT-B_16", 512): "siglip/webli_en_b16_512_68580893.npz",
    ("ViT-L_16", 256): "siglip/webli_en_l16_256_60552751.npz",
    ("ViT-L_16", 384): "siglip/webli_en_l16_384_63634585.npz",
}
_SIGLIP_I18N = {("ViT-B_16", 256): "siglip/webli_i18n_b16_256_66117334.npz"}
# SigLIP 2 (stacked "scan" layout), file names from big_vision's configs/proj/image_text/README_siglip2.md.
_SIGLIP2 = {
    ("ViT-B_32", 256): "siglip2/siglip2_b32_256.npz",
    ("ViT-B_16", 224): "siglip2/siglip2_b16_224.npz",
    ("ViT-B_16", 256): "siglip2/siglip2_b16_256.npz",
    ("ViT-B_16", 384): "siglip2/siglip2_b16_384.npz",
    ("ViT-B_16", 512): "siglip2/siglip2_b16_512.npz",
    ("ViT-L_16", 256): "siglip2/siglip2_l16_256.npz",
    ("ViT-L_16", 384): "siglip2/siglip2_l16_384.npz",
    ("ViT-L_16", 512): "siglip2/siglip2_l16_512.npz",
}
# Left out of the big_vision families (no keras_vit variant, so no constructor and no family resolves to them):
# SigLIP So400m/14 and So400m/16 (width 1152, depth 27, MLP 4304, 16 heads) and SigLIP 2 g-opt/16 (width 1536,
# depth 40, MLP 6144). keras_vit builds these geometries from the file: keras_vit.from_official_checkpoint(URL)
# infers them (untested on the real files). So400m/14 at 384 px has a 27x27 grid: big_vision's VALID patch
# convolution ignores the last 6 pixels, keras_vit takes 378 x 378 images. The NaFlex files
# (siglip2_*_naflex.npz) need another patch and position embedding (naflex_vit.py): not supported.


# timm's Hugging Face Hub weights: facts from timm's timm/models/vision_transformer.py (default_cfgs: hf_hub_id,
# input_size, mean, std, crop_pct, crop_mode; interpolation "bicubic" throughout) and results/results-imagenet.csv
# (top-1), read in huggingface/pytorch-image-models. These files were NOT downloaded here (no network): their
# layouts are read as the shared timm fixtures (../shared/fixtures/timm_vit, made by timm 1.0.31) are, and the
# architecture and input pipeline come from each repository's config.json when it is loaded.
HUB_PREFIX = "hf-hub:"
_INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm's IMAGENET_INCEPTION_MEAN / _STD
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # IMAGENET_DEFAULT_MEAN / _STD
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # OPENAI_CLIP_MEAN / _STD
_TIMM_ENTRY = {  # (keras_vit variant, weights kind): the timm entry point's stem (+ "_<resolution>" for these)
    ("ViT-B_8", "plain"): "vit_base_patch8", ("ViT-B_16", "plain"): "vit_base_patch16",
    ("ViT-B_32", "clip"): "vit_base_patch32_clip", ("ViT-B_16", "clip"): "vit_base_patch16_clip",
    ("ViT-L_14", "clip"): "vit_large_patch14_clip", ("ViT-H_14", "clip"): "vit_huge_patch14_clip",
}
# family: [(variant, resolution, published top-1 or None, (mean, std), crop_pct, crop_mode)]
_TIMM_FAMILIES = {
    "augreg2_in21k_ft_in1k": ("plain", [
        ("ViT-B_8", 224, 86.252, _INCEPTION, 0.9, "center"),
        ("ViT-B_16", 224, 85.108, _INCEPTION, 0.9, "center"),
    ]),
    "clip_laion2b_ft_in12k_in1k": ("clip", [
        ("ViT-B_32", 224, 83.304, _CLIP, 0.9, "center"), ("ViT-B_32", 384, 85.398, _CLIP, 1.0, "center"),
        ("ViT-B_32", 448, 85.792, _CLIP, 1.0, "center"),
        ("ViT-B_16", 224, 86.204, _CLIP, 0.95, "center"), ("ViT-B_16", 384, 87.210, _CLIP, 1.0, "squash"),
        ("ViT-L_14", 224, 87.900, _INCEPTION, 1.0, "center"), ("ViT-L_14", 336, 88.190, _INCEPTION, 1.0, "squash"),
        ("ViT-H_14", 224, 88.288, _CLIP, 1.0, "center"), ("ViT-H_14", 336, 88.634, _CLIP, 1.0, "squash"),
    ]),
    "clip_openai_ft_in12k_in1k": ("clip", [
        ("ViT-B_32", 384, 85.218, _CLIP, 0.95, "squash"),
        ("ViT-B_16", 224, 85.954, _CLIP, 0.95, "center"), ("ViT-B_16", 384, 87.030, _CLIP, 0.95, "squash"),
        ("ViT-L_14", 224, 88.162, _CLIP, 1.0, "center"), ("ViT-L_14", 336, 88.260, _CLIP, 1.0, "squash"),
    ]),
    "clip_laion2b_ft_in1k": ("clip", [
        ("ViT-B_32", 224, 82.614, _CLIP, 0.9, "center"),
        ("ViT-B_16", 224, 85.488, _CLIP, 1.0, "center"), ("ViT-B_16", 384, 86.638, _CLIP, 1.0, "squash"),
        ("ViT-L_14", 224, 87.288, _INCEPTION, 1.0, "center"), ("ViT-L_14", 336, 87.870, _INCEPTION, 1.0, "squash"),
        ("ViT-H_14", 224, 87.612, _CLIP, 1.0, "center"),
    ]),
    "clip_openai_ft_in1k": ("clip", [
        ("ViT-B_32", 224, 81.944, _CLIP, 0.9, "center"),
        ("ViT-B_16", 224, 85.282, _CLIP, 0.9, "center"), ("ViT-B_16", 384, 86.210, _CLIP, 1.0, "squash"),
        ("ViT-L_14", 224, 87.858, _CLIP, 1.0, "center"),
    ]),
}
# DINOv2 (self-supervised, no head, 518 px): vit_{small,base,large}_patch14[_reg4]_dinov2.lvd142m
_DINOV2 = {"ViT-S_14": "vit_small_patch14", "ViT-B_14": "vit_base_patch14", "ViT-L_14": "vit_large_patch14"}
# Left out: the timm tags keras_vit cannot build (giant DINOv2: SwiGLU; EVA, RoPE, NaFlex: see
# keras_vit.pretrained.timm_entry_points.OTHER_MODULES) and those without a keras_vit variant (medium, betwixt,
# mediumd, so400m: load them by Hub id with keras_vit.from_official_checkpoint("hf-hub:timm/<name>")).


def _timm_entry(hub_name, resolution, classes, top1, mean_std, crop_pct, crop_mode):
    mean, std = mean_std
    settings = dict(mean=mean, std=std, interpolation="bicubic", crop_pct=crop_pct, crop_mode=crop_mode)
    text = f"(pixels / 255 - mean) / std, mean {mean}, std {std}; bicubic, crop_pct {crop_pct}, {crop_mode}"
    return PretrainedWeights(HUB_PREFIX + "timm/" + hub_name, resolution, classes, preprocessing=text, top1=top1,
                             input_settings=settings)


@dataclasses.dataclass(frozen=True)
class Family:
    """Who released a family's files, where their names come from, and the input they expect."""

    source: str
    preprocessing: str


# Not verified offline (no network here): that every big_vision file exists under these names and how each is laid
# out. What the code says: vit.py's names (read like big_vision's fixtures, ../shared/fixtures/big_vision_vit),
# SigLIP files in the per-block layout, SigLIP 2 files stacked ("scan"), both as two-tower files (params/img/, no
# image head); FlexiViT files as proj/flexi/vit.py writes them (a class token, a 7x7 table without a class-token
# row, a patch kernel of the training config's size: 16x16 in i1k_deit3_distill.py, 8x8 in i21k_sup.py).
_PAPER_INPUT = "(pixels - 127.5) / 127.5"
_SIGLIP_INPUT = (f"{_PAPER_INPUT} as ViT, after resizing the whole image to R x R (no crop): "
                 "resize(R)|value_range(-1, 1)")
FAMILY_INFO = {
    "imagenet21k": Family("google-research/vision_transformer (gs://vit_models)", _PAPER_INPUT),
    "imagenet21k+imagenet2012": Family("google-research/vision_transformer (gs://vit_models)", _PAPER_INPUT),
    "augreg_in21k": Family("AugReg, google-research/vision_transformer README (gs://vit_models/augreg)", _PAPER_INPUT),
    "augreg_in21k_ft_in1k": Family("AugReg, google-research/vision_transformer README", _PAPER_INPUT),
    "augreg_in1k": Family("AugReg, google-research/vision_transformer README", _PAPER_INPUT),
    "sam": Family("google-research/vision_transformer README (gs://vit_models/sam)", _PAPER_INPUT),
    "flexivit_i1k": Family(
        "FlexiViT, big_vision configs/proj/flexivit/README.md (gs://big_vision/flexivit)",
        f"{_PAPER_INPUT}; evaluated at 240 px after resizing to 274 x 274 and a central crop "
        "(i1k_deit3_distill.py: resize(res//7*8)|central_crop(res)|value_range(-1, 1))",
    ),
    "flexivit_i21k": Family(
        "FlexiViT, big_vision configs/proj/flexivit/README.md (gs://big_vision/flexivit)",
        f"{_PAPER_INPUT}; evaluated at 240 px after resizing the shorter side to 274 and a central crop "
        "(i21k_sup.py: resize_small(res//7*8)|central_crop(res)|value_range(-1, 1))",
    ),
    "siglip_webli": Family(
        "SigLIP, big_vision configs/proj/image_text/SigLIP_demo.ipynb (gs://big_vision/siglip)", _SIGLIP_INPUT
    ),
    "siglip_webli_i18n": Family(
        "multilingual SigLIP, big_vision configs/proj/image_text/SigLIP_demo.ipynb (gs://big_vision/siglip)",
        _SIGLIP_INPUT,
    ),
    "siglip2_webli": Family(
        "SigLIP 2, big_vision configs/proj/image_text/README_siglip2.md (gs://big_vision/siglip2)", _SIGLIP_INPUT
    ),
}
_TIMM_SOURCE = "timm, Hugging Face Hub (hf-hub:timm/...; not downloaded here)"
_TIMM_INPUT = "(pixels / 255 - mean) / std per channel, as each file's config.json (pretrained_cfg) says; bicubic"
FAMILY_INFO.update({family: Family(_TIMM_SOURCE, _TIMM_INPUT) for family in _TIMM_FAMILIES})
FAMILY_INFO["augreg2_in21k_ft_in1k"] = Family(f"{_TIMM_SOURCE}: AugReg ImageNet-21k, fine-tuned again by timm",
                                              _TIMM_INPUT)
FAMILY_INFO["dinov2_lvd142m"] = Family(f"{_TIMM_SOURCE}: DINOv2 (Oquab et al. 2023), self-supervised", _TIMM_INPUT)
FAMILY_INFO["dinov2_reg4_lvd142m"] = Family(f"{_TIMM_SOURCE}: DINOv2 with 4 registers (Darcet et al. 2024)",
                                            _TIMM_INPUT)
FAMILIES = tuple(FAMILY_INFO)


def _build_registry():
    """{(official model name, family): [PretrainedWeights, ...]} from the tables above."""
    registry = {}

    def add(model, family, path, resolution, classes, upstream=None):
        entry = PretrainedWeights(path, resolution, classes, preprocessing=FAMILY_INFO[family].preprocessing,
                                  upstream=upstream)
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
    for path, models in _FLEXIVIT.values():
        for model in models:
            add(model, "flexivit_i1k", BIG_VISION_BUCKET + path, 240, 1000)
    for model in ("ViT-B_8", "ViT-B_16", "ViT-B_32"):
        add(model, "flexivit_i21k", BIG_VISION_BUCKET + _FLEXIVIT_I21K, 240, IN21K_CLASSES)
    for family, files in (("siglip_webli", _SIGLIP), ("siglip_webli_i18n", _SIGLIP_I18N), ("siglip2_webli", _SIGLIP2)):
        for (model, resolution), path in files.items():
            add(model, family, BIG_VISION_BUCKET + path, resolution, None)  # image towers have no head
    for family, (kind, rows) in _TIMM_FAMILIES.items():
        for model, resolution, top1, mean_std, crop_pct, crop_mode in rows:
            name = f"{_TIMM_ENTRY[model, kind]}_{resolution}.{family.removeprefix('clip_')}"
            entry = _timm_entry(name, resolution, 1000, top1, mean_std, crop_pct, crop_mode)
            registry.setdefault((model, family), []).append(entry)
    for model, stem in _DINOV2.items():
        for family, registers in (("dinov2_lvd142m", ""), ("dinov2_reg4_lvd142m", "_reg4")):
            entry = _timm_entry(f"{stem}{registers}_dinov2.lvd142m", 518, None, None, _IMAGENET, 1.0, "center")
            registry.setdefault((model, family), []).append(entry)
    return registry


REGISTRY = _build_registry()


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
    """The README's weights tables (Markdown), generated from the registry: one row per file, then one per family."""
    rows = ["| Model | Family | Resolution | Classes | File | Upstream run |", "|---|---|---|---|---|---|"]
    for (model, family), entries in REGISTRY.items():
        for entry in entries:
            if entry.is_hub:
                continue  # timm_weights_table
            upstream = ""
            if entry.upstream:
                upstream = f"`{entry.upstream}`" + (
                    " (not the augreg_in21k file)"
                    if family == "augreg_in21k_ft_in1k" and differs_from_augreg_in21k(model, entry)
                    else ""
                )
            classes = "none (image tower)" if entry.classes is None else entry.classes
            path = "gs://" + entry.path.removeprefix(_STORAGE) if entry.path.startswith(_STORAGE) else entry.path
            rows.append(f"| {model} | {family} | {entry.resolution} | {classes} | `{path}` | {upstream} |")
    rows += ["", "| Family | Released by | Input |", "|---|---|---|"]
    rows += [f"| {family} | {info.source} | {info.preprocessing.replace('|', chr(92) + '|')} |"
             for family, info in FAMILY_INFO.items() if family not in _timm_families()]  # a pipe is escaped
    return "\n".join(rows)


def _timm_families():
    return {family for (_, family), entries in REGISTRY.items() if entries[0].is_hub}


def timm_weights_table():
    """The README's table of timm's Hugging Face Hub weights (Markdown), generated from the registry."""
    rows = ["| Model | Family | Resolution | Hub id | Mean, std | Crop | ImageNet top-1 (timm) |",
            "|---|---|---|---|---|---|---|"]
    names = {_CLIP: "CLIP", _IMAGENET: "ImageNet", _INCEPTION: "0.5, 0.5"}
    for (model, family), entries in REGISTRY.items():
        for entry in entries:
            if entry.is_hub:
                settings = entry.input_settings
                top1 = f"{entry.top1:.3f}" if entry.top1 is not None else "no head"
                rows.append(f"| {model} | {family} | {entry.resolution} | `{entry.path}` | "
                            f"{names[settings['mean'], settings['std']]} | {settings['crop_pct']} "
                            f"{settings['crop_mode']} | {top1} |")
    return "\n".join(rows)
