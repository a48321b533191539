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
* ``load``: the pipeline itself.

The public entry points are ``weights=`` on the constructors,
``keras_vit.from_official_checkpoint`` and ``keras_vit.load_weights``.
"""
