"""Writes the legacy test data of this folder with keras_vit at commit 410d757 (run from a checkout of it).

    PYTHONPATH=/path/to/checkout-at-410d757 python tests/data/legacy_410d757/make_legacy.py OUT_DIR

* ``token_dropout.keras``: a token ViT (hidden 48, 2 blocks, 3 heads, 16 px, patch 4) with a representation
  layer, dropout 0.1 and stochastic depth 0.1, float32;
* ``gap_bf16.keras``: a gap ViT built under the mixed_bfloat16 policy;
* ``hybrid.keras``: a hybrid (ResNet root + one stage) token ViT;
* ``ckpt/``: a training checkpoint (keras_vit.train.checkpointing) of ``token_dropout`` after two AdamW steps;
* ``outputs.npz``: ``images`` and each model's inference output on them, ``<name>_reloaded`` the output of
  the model ``keras.models.load_model`` gives back at 410d757 in a float32 process (``gap_bf16`` then computes in
  float32: that commit stored no dtype), ``ckpt_logits`` those of the checkpointed weights.
"""

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
outputs = {"images": images}
rng = np.random.default_rng(2)


def randomize(model):
    """Random float weights (the zero-initialised head would make every output 0); integer seed states kept."""
    model.set_weights([w if w.dtype.kind in "iu" else rng.normal(0, 0.3, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    return model


keras.utils.set_random_seed(1)
token = keras_vit.vision_transformer(**small, representation_size=24, dropout_rate=0.1,
                                     stochastic_depth_rate=0.1, name="token_dropout")
randomize(token)
token.save(out / "token_dropout.keras")
outputs["token_dropout"] = keras.ops.convert_to_numpy(token(images, training=False))

keras.config.set_dtype_policy("mixed_bfloat16")
gap = randomize(keras_vit.vision_transformer(**small, classifier="gap", name="gap_bf16"))
keras.config.set_dtype_policy("float32")
gap.save(out / "gap_bf16.keras")
outputs["gap_bf16"] = keras.ops.convert_to_numpy(gap(images, training=False)).astype("float32")

hybrid = keras_vit.vision_transformer(image_size=32, patch_size=1, hidden_size=48, num_layers=1, num_heads=3,
                                      mlp_dim=96, classes=5, resnet_layers=(1,), resnet_width_factor=0.5,
                                      name="hybrid")
randomize(hybrid)
hybrid_images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
hybrid.save(out / "hybrid.keras")
outputs["hybrid_images"] = hybrid_images
outputs["hybrid"] = keras.ops.convert_to_numpy(hybrid(hybrid_images, training=False))

optimizer = keras.optimizers.AdamW(1e-3, weight_decay=0.05)
labels = keras.ops.one_hot(np.array([1, 3]), 5)
for _ in range(2):
    with __import__("tensorflow").GradientTape() as tape:
        loss = keras.ops.mean(keras.losses.categorical_crossentropy(labels, token(images, training=True), from_logits=True))
    grads = tape.gradient(loss, token.trainable_variables)
    optimizer.apply_gradients(zip(grads, token.trainable_variables))
checkpointing.CheckpointManager(out / "ckpt").save(token, optimizer, step=2, stream_position=2, run_id="legacy")
outputs["ckpt_logits"] = keras.ops.convert_to_numpy(token(images, training=False))
for name in ("token_dropout", "gap_bf16", "hybrid"):
    reloaded = keras.models.load_model(out / f"{name}.keras")
    inputs = outputs["hybrid_images" if name == "hybrid" else "images"]
    outputs[f"{name}_reloaded"] = keras.ops.convert_to_numpy(reloaded(inputs, training=False)).astype("float32")
np.savez(out / "outputs.npz", **outputs)
print(sorted(p.name for p in out.iterdir()))
