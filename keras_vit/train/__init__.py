"""The training application: data pipelines, strategies, the trainer, the recipe runner, tuning and presets.

The model library (``keras_vit`` outside this package) never imports from here.
"""
