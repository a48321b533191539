"""Pretrained weights: one loading pipeline, read -> adapt -> assign.

Modules, one job each:

* ``npz``: reading official ``.npz`` archives, the bfloat16 codec;
* ``names``: canonical official names, the model <-> name mapping, the strict match;
* ``config``: the architecture a checkpoint describes (``infer_config``);
* ``resample``: position-embedding interpolation, patch-kernel resampling
  (FlexiViT), input-channel adaptation;
* ``adapt``: the rules that fit a checkpoint to a model that differs from it;
* ``registry``: the official files per model name and family;
* ``download``: the download cache;
* ``safetensors_file``: reading ``.safetensors`` files, their headers checked first; PyTorch pickles refused;
* ``timm_entry_points``: timm's ViT entry points, as facts; ``timm_names``: timm's state dict in official names
  and layouts; ``timm``: a timm checkpoint's arrays, architecture and preprocessing (``read_timm``);
* ``hub``: Hugging Face Hub ids, from the Hugging Face cache or downloaded;
* ``load``: the pipeline itself.

The public entry points are ``weights=`` on the constructors,
``keras_vit.from_official_checkpoint`` and ``keras_vit.load_weights``.
"""
