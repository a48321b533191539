"""Masked patch prediction, the seed's preliminary self-supervision (section 4.6, appendix B.1.2).

50% of the patch embeddings of each image are corrupted: 80% of those are
replaced by a learnable [mask] embedding, 10% by a random other patch
embedding (from any image of the batch), 10% are kept. For every corrupted
patch the model predicts the patch's mean colour quantised to 3 bits per
channel (512 classes for RGB, 8**C in general); uncorrupted positions do not
contribute to the loss. Shapes: B = batch, T = patches, D = hidden size.
"""

import keras
from keras import ops

from keras_vit.layers import PACKAGE
from keras_vit.models import as_vision_transformer

BITS = 3


def mean_colour_targets(images, patch_size, bits=BITS):
    """Class of each patch's mean colour, (B, T) int32 in [0, (2**bits)**C), row-major patch order.

    ``images`` are (B, H, W, C) in [-1, 1]; channel c's level is
    ``floor(mean_in_[0,1] * 2**bits)`` clipped to ``2**bits - 1``; the class
    is the levels read as base-2**bits digits, first channel most significant.
    """
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    _, height, width, channels = images.shape  # static: the model's input size
    patches = ops.reshape(images, (-1, height // ph, ph, width // pw, pw, channels))
    means = (ops.mean(patches, axis=(2, 4)) + 1.0) / 2.0  # (B, gh, gw, C) in [0, 1]
    levels = ops.clip(ops.floor(means * 2**bits), 0, 2**bits - 1)
    weights = ops.convert_to_tensor([(2**bits) ** (channels - 1 - c) for c in range(channels)], dtype=levels.dtype)
    return ops.cast(ops.reshape(ops.sum(levels * weights, axis=-1), (-1, (height // ph) * (width // pw))), "int32")


def scored_positions(corrupted):
    """(B, T) float weights of the positions that count: the corrupted ones of each image; every position of an
    image with none corrupted (evaluation, where nothing is corrupted)."""
    corrupted = ops.cast(corrupted, "float32")
    return ops.where(ops.sum(corrupted, axis=1, keepdims=True) > 0, corrupted, ops.ones_like(corrupted))


def masked_loss_and_accuracy(logits, targets, weights):
    """Cross-entropy and hit rate of (B, T, K) logits against (B, T) targets, averaged per image over ``weights`` (B, T)."""
    per_patch = keras.losses.sparse_categorical_crossentropy(targets, ops.cast(logits, "float32"), from_logits=True)
    count = ops.maximum(ops.sum(weights, axis=1), 1.0)
    hits = ops.cast(ops.cast(ops.argmax(logits, axis=-1), "int32") == targets, "float32")
    return ops.sum(per_patch * weights, axis=1) / count, ops.sum(hits * weights, axis=1) / count


@keras.saving.register_keras_serializable(package=PACKAGE)
class MaskedPatchPrediction(keras.Model):
    """Wraps a keras_vit encoder for masked patch prediction; call -> (logits (B, T, K), targets (B, T), corrupted (B, T)).

    ``encoder`` is a plain ``VisionTransformer`` (any classifier or top):
    its ``patch_embedding_model`` gives the patch embeddings, which are
    corrupted and fed to its ``encoder_model``; the patch tokens after
    ``encoder_norm`` go to a Dense(K) prediction head. Without
    ``training`` nothing is corrupted. ``loss_and_accuracy`` gives the
    per-image loss over corrupted positions only (the ``loss_fn`` of
    ``keras_vit.train.trainer.Trainer``). For Keras' own loop, on every
    backend, the model computes its loss itself: ``model.compile(optimizer)``
    (no ``loss``) then ``model.fit(images or (images, ignored labels))``;
    ``compute_loss`` is the mean of the per-image losses and the metric
    ``accuracy`` the mean per-image hit rate on the positions that count. Save
    ``encoder`` after pre-training; it loads into a classifier through ``weights=``.
    """

    def __init__(self, encoder, corrupt_rate=0.5, mask_rate=0.8, random_rate=0.1, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.encoder = as_vision_transformer(encoder, "MaskedPatchPrediction")
        self.corrupt_rate, self.mask_rate, self.random_rate = corrupt_rate, mask_rate, random_rate
        config = self.encoder.vit_config
        if config["resnet_layers"] is not None or config["include_preprocessing"]:
            raise ValueError(
                "Mean-colour targets need the patches of the image itself: use a plain ViT encoder "
                "(no ResNet stem, no include_preprocessing)."
            )
        self.patch_size = config["patch_size"]
        self.num_prefix_tokens = self.encoder.num_prefix_tokens
        hidden_size = config["hidden_size"]
        self.num_classes = (2**BITS) ** config["channels"]
        self.mask_token = self.add_weight(
            name="mask_token", shape=(1, 1, hidden_size), initializer=keras.initializers.RandomNormal(stddev=0.02)
        )
        self.head = keras.layers.Dense(self.num_classes, kernel_initializer="zeros", name="mpp_head")
        self.head.build((None, None, hidden_size))  # all variables exist before the optimizer is built
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")

    def corruption(self, batch, tokens):
        """Per-position codes (B, T): 0 untouched, 1 [mask], 2 random other patch, 3 corrupted but kept."""
        noise = keras.random.uniform((batch, tokens), seed=self.seed_generator)
        ranks = ops.argsort(ops.argsort(noise, axis=1), axis=1)  # a random permutation per image
        corrupted = ranks < int(round(self.corrupt_rate * tokens))
        kind = keras.random.uniform((batch, tokens), seed=self.seed_generator)
        code = ops.where(kind < self.mask_rate, 1, ops.where(kind < self.mask_rate + self.random_rate, 2, 3))
        return ops.where(corrupted, code, 0)

    def corrupt(self, embeddings):
        """Corrupts (B, T, D) patch embeddings; returns them with the per-position codes of ``corruption``."""
        batch, tokens = ops.shape(embeddings)[0], ops.shape(embeddings)[1]
        codes = self.corruption(batch, tokens)
        flat = ops.reshape(embeddings, (-1, ops.shape(embeddings)[-1]))
        picks = keras.random.randint((batch * tokens,), 0, batch * tokens, seed=self.seed_generator)
        random_patches = ops.reshape(ops.take(flat, picks, axis=0), ops.shape(embeddings))
        mask = ops.cast(self.mask_token, embeddings.dtype)
        expanded = codes[..., None]
        return ops.where(expanded == 1, mask, ops.where(expanded == 2, random_patches, embeddings)), codes

    def call(self, images, training=False):
        embeddings = self.encoder.patch_embedding_model()(images)  # (B, T, D)
        targets = mean_colour_targets(images, self.patch_size)
        if training:
            embeddings, codes = self.corrupt(embeddings)
        else:
            codes = ops.zeros(ops.shape(targets), "int32")
        tokens = self.encoder.encoder_model()(embeddings, training=training)
        logits = self.head(tokens[:, self.num_prefix_tokens :])
        return logits, targets, codes > 0

    def loss_and_accuracy(self, images, labels=None, training=True):
        """Per-image mean cross-entropy over corrupted patches (B,), and per-image hit rate there (B,); labels unused.

        In evaluation (``training=False``, nothing corrupted) every patch counts.
        """
        logits, targets, corrupted = self(images, training=training)
        return masked_loss_and_accuracy(logits, targets, scored_positions(corrupted))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Keras' loss hook (``model.fit``): the mean per-image loss of ``y_pred`` = ``self(x)``, plus ``self.losses``.

        ``y`` (class labels of the images, if the data has them) is not used.
        """
        logits, targets, corrupted = y_pred
        loss, _ = masked_loss_and_accuracy(logits, targets, scored_positions(corrupted))
        total = ops.mean(loss)
        if self.losses:
            total = total + ops.sum(ops.stack(self.losses))
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """Keras' metrics hook: ``loss`` and ``accuracy`` (mean per-image hit rate on the positions that count)."""
        logits, targets, corrupted = y_pred
        _, accuracy = masked_loss_and_accuracy(logits, targets, scored_positions(corrupted))
        self.accuracy_tracker.update_state(accuracy)
        return self.get_metrics_result()

    def get_config(self):
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
            corrupt_rate=self.corrupt_rate,
            mask_rate=self.mask_rate,
            random_rate=self.random_rate,
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)
