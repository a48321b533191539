"""Writes the test data of this folder with keras_vit at commit d3246bf (run from a checkout of it, TensorFlow).

    PYTHONPATH=/path/to/checkout-at-d3246bf KERAS_BACKEND=tensorflow python tests/data/main_d3246bf/make_main.py OUT

Small models (16 px images, patch 4, hidden 48, 2 blocks, 3 heads), random float weights:

* ``plain.keras``: a token ViT with a representation layer, dropout 0.1, stochastic depth 0.1, float32;
* ``int8.keras``: ``plain`` quantized to int8 (Keras' ``quantize``);
* ``lora.keras`` and ``lora.lora.h5``: ``plain`` with rank-2 LoRA on query and value, random factors (the
  ``.keras`` file holds them merged, the ``.lora.h5`` file the factors alone);
* ``map_reg_sincos.keras``: a MAP-pooled model with 2 register tokens and sin-cos position embeddings;
* ``ckpt/``: a training checkpoint (keras_vit.train.checkpointing) of ``plain`` after two AdamW steps;
* ``outputs.npz``: ``images`` and each model's inference output on them, ``ckpt_logits`` those of the
  checkpointed weights, ``lora_base`` the outputs of the base ``plain`` model the ``.lora.h5`` factors adapt;
* ``configs.json``: each model's ``get_config()``.
"""

import json
import sys
from pathlib import Path

import keras
import numpy as np

import keras_vit
from keras_vit.train import checkpointing

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype("float32")
small = dict(image_size=16, patch_size=4, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96, classes=5)
outputs, configs = {"images": images}, {}
rng = np.random.default_rng(2)


def randomize(model):
    """Random float weights (the zero-initialised head would make every output 0); integer seed states kept."""
    model.set_weights([w if w.dtype.kind in "iu" else rng.normal(0, 0.3, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    return model


def record(name, model):
    model.save(out / f"{name}.keras")
    outputs[name] = keras.ops.convert_to_numpy(model(images, training=False)).astype("float32")
    configs[name] = model.get_config()


keras.utils.set_random_seed(1)
plain = randomize(keras_vit.vision_transformer(**small, representation_size=24, dropout_rate=0.1,
                                               stochastic_depth_rate=0.1, name="plain"))
record("plain", plain)

quantized = keras.models.load_model(out / "plain.keras")
quantized.quantize("int8")
record("int8", quantized)

lora = keras.models.load_model(out / "plain.keras")
outputs["lora_base"] = keras.ops.convert_to_numpy(lora(images, training=False))
lora.enable_lora(2)
for layer in lora._lora_layers():
    for factor in (layer.lora_kernel_a, layer.lora_kernel_b):
        factor.assign(rng.normal(0, 0.3, factor.shape).astype("float32"))
lora.save_lora_weights(out / "lora.lora.h5")
record("lora", lora)

mapped = randomize(keras_vit.vision_transformer(**small, classifier="map", num_register_tokens=2, posemb="sincos2d",
                                                name="map_reg_sincos"))
record("map_reg_sincos", mapped)

optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.05)
labels = keras.ops.one_hot(np.array([1, 3]), 5)
for _ in range(2):
    with __import__("tensorflow").GradientTape() as tape:
        loss = keras.ops.mean(keras.losses.categorical_crossentropy(labels, plain(images, training=True), from_logits=True))
    grads = tape.gradient(loss, plain.trainable_variables)
    optimizer.apply_gradients(zip(grads, plain.trainable_variables))
checkpointing.CheckpointManager(out / "ckpt").save(plain, optimizer, step=2, stream_position=2, run_id="main")
outputs["ckpt_logits"] = keras.ops.convert_to_numpy(plain(images, training=False))
np.savez(out / "outputs.npz", **outputs)
(out / "configs.json").write_text(json.dumps(configs, indent=1, sort_keys=True) + "\n")
print(sorted(p.name for p in out.iterdir()))
