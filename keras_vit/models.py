"""The Vision Transformer model: ``VisionTransformer``, a functional ``keras.Model`` built from its arguments.

``VisionTransformer`` is a registered functional ``keras.Model`` subclass (the style of keras-hub's
``Backbone``): its layer names mirror the official module tree (``embedding``, ``cls``, ``posembed_input``,
``encoderblock_0`` ..., ``encoder_norm``, ``pre_logits``, ``head``), its config is the builder's arguments, its
structure is one ``keras_vit.architecture.Architecture`` (``model.architecture``), and it answers for itself:
``features`` (pooled pre-logits, token sequence, every block's output and attention weights on request),
``official_weights``, ``patch_embedding_model`` and ``encoder_model``; ``quantize``, ``enable_lora`` and dtype
policies are Keras' own and survive ``.keras`` saving.

Why a subclass and not a function over a model: the model already knows its own structure when it is built, so
the features are sub-graphs of its own graph (no ``Lambda`` layers, no code elsewhere walking ``model.layers``);
the configuration survives ``.keras`` saving as plain builder arguments; and a functional model keeps Keras'
summary, plotting, ``model.layers`` and weight layout (``.weights.h5`` files written before this class existed
still load).

``.keras`` files saved before ``VisionTransformer`` existed load as plain functional models that predict as
before; the features API needs a ``VisionTransformer``: convert such a file once with
``keras_vit.from_official_checkpoint(path).save(new_path)``.
"""

import copy
import hashlib
import numbers
import re
import weakref

import h5py
import keras
import numpy as np

from keras_vit import configs, resnet
from keras_vit.architecture import Architecture, unknown_arguments_error
from keras_vit.layers import (
    LAYER_NORM_EPSILON,
    PACKAGE,
    AttentionWeights,
    Dropout,
    Patches,
    TokenPooling,
    TransformerBlock,
    official_weights as layer_official_weights,
)
from keras_vit.layers import heads as heads_lib
from keras_vit.layers.embedding import PadToMultiple, position_embedding
from keras_vit.layers.tokens import prefix_token_layers
from keras_vit.preprocessing import check_pixels
from keras_vit.pretrained.names import CheckpointMismatchError, official_scope

_FEATURE_MODELS = weakref.WeakKeyDictionary()  # model -> {key: sub-model sharing its layers}
_LORA_TARGETS = ("query", "value")
_QUANTIZABLE = (keras.layers.Dense, keras.layers.EinsumDense)
_CODE_MODES = ("int8", "int4", "gptq", "awq")  # quantization modes whose kernels hold integer codes


def _nested_layers(layers):
    """Every layer of ``layers`` and inside them (through their attributes), depth first, each once."""
    seen = set()

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        yield layer
        for value in vars(layer).values():
            for child in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(child, keras.layers.Layer):
                    yield from visit(child)

    for layer in layers:
        yield from visit(layer)


def _lora_rank_limit(layer):
    """The largest rank a LoRA update of ``layer`` can have: Keras factors its kernel (..., out) as (..., r) @ (r, out),
    a matrix of (product of the leading axes, out)."""
    shape = tuple(layer.kernel.shape)
    return min(int(np.prod(shape[:-1])), shape[-1])


def _base_kernel(layer):
    """The kernel variable of a LoRA layer, without the update (its ``kernel`` property adds the update)."""
    return next(weight for weight in layer.weights if weight.name == "kernel")


def _lora_base_digest(layers):
    """SHA-256 of the frozen weights (kernels and biases) that the LoRA factors of ``layers`` adapt, by path."""
    digest = hashlib.sha256()
    for layer in sorted(layers, key=lambda layer: layer.path):
        digest.update(layer.path.encode())
        for weight in (_base_kernel(layer), layer.bias):
            if weight is not None:
                digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def _resolved_policy(layer):
    """A layer's own ``DTypePolicy``: the entry for its path when it was given a ``DTypePolicyMap``, the map's
    default for a layer that has no path (one never built, such as a ``Dropout``), as Keras resolves it."""
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy[layer.path] if layer.path else policy.default_policy
    return policy


def _output_dtype(policy):
    """The head's dtype: float32 under a mixed policy (logits are always float32); a policy map says it itself."""
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy
    return "float32" if policy.compute_dtype != policy.variable_dtype else policy


@keras.saving.register_keras_serializable(package=PACKAGE)
class VisionTransformer(keras.Model):
    """A Vision Transformer, a functional ``keras.Model`` built from its configuration.

    Input: images (B, H, W, channels), float in [-1, 1] for official weights (see
    ``keras_vit.preprocess_input``), or pixels in [0, 255] with ``include_preprocessing=True``. Output:

    * ``include_top=True``: (B, classes) logits (``classifier_activation=None``) or activations (e.g.
      ``"softmax"``), always float32;
    * ``include_top=False, pooling=None``: the token sequence after ``encoder_norm``, (B, T, hidden_size);
    * ``include_top=False, pooling="token"|"avg"|"max"|"map"``: (B, hidden_size), or (B, representation_size)
      with a representation layer.

    Args:
        image_size: int or (height, width); each a multiple of the token stride.
        patch_size: int or (height, width).
        hidden_size, num_layers, num_heads, mlp_dim: Transformer shape (D, L, N, M).
        classifier: ``"token"`` (class token, read at position 0), ``"gap"`` (no class token, mean of the grid
            tokens), ``"map"`` (no class token, big_vision's multi-head attention pooling ``MAPHead``) or
            ``"unpooled"`` (no class token and no pooling; needs ``include_top=False``).
        representation_size: adds the official pre-logits layer (Dense(representation_size) + tanh) before the
            head.
        include_top: whether to add the classification head ``head``.
        classes: number of head outputs.
        classifier_activation: activation of the head; ``None`` gives logits.
        pooling: with ``include_top=False``: ``None`` (token sequence), ``"token"`` (class token), ``"avg"``
            (alias ``"gap"``) or ``"max"`` over the grid tokens (prefix tokens left out), or ``"map"`` (a new
            MAP head). Ignored when ``include_top=True`` (the classifier decides).
        num_register_tokens: K learned register tokens after the class token (no position embedding; no head
            reads them).
        posemb: ``"learn"`` (learned table, the 2020 models) or ``"sincos2d"`` (fixed 2-D sin-cos, big_vision's
            ``posemb_sincos_2d``; computed, not stored).
        posemb_class_token: with a learned table and a class token, whether the class token has a row (the 2020
            models, True) or the table covers the grid only, added before the class token (big_vision, False).
        dropout_rate: dropout after the position embeddings, the attention output and both MLP layers (official
            placement).
        attention_dropout_rate: dropout on the attention weights.
        stochastic_depth_rate: drop-path rate of the last block; block i uses ``rate * i / (num_layers - 1)``.
        gelu: ``"tanh"`` (official approximation) or ``"erf"`` (exact).
        remat: gradient checkpointing of every Transformer block in training (see ``TransformerBlock``).
        channels: input channels.
        resnet_layers: units per stage of a hybrid's ResNet stem, e.g. ``(3, 4, 9)``; ``()`` is the root alone;
            ``None`` is a plain ViT. The patch size then applies to the feature map.
        resnet_width_factor: ResNet width = 64 x this factor.
        include_preprocessing: adds ``(x - 127.5) / 127.5`` as the first layer (``Rescaling``, named
            ``preprocessing``), so the model takes pixels in [0, 255]. Default False: the model takes [-1, 1].
        variant: the official variant this geometry is (e.g. ``"ViT-B_16"``), which picks weights families;
            inferred from the geometry when None (stored in the config either way).
        class_names: optional list of the K class names, stored with the model
            (``decode_predictions(scores, model=model)`` reads them).
        input_tensor: optional ``keras.Input`` to use as the model's input (not serialized: a reloaded model gets
            its own input).
        name: model name.
        dtype: the dtype policy of every layer (a name such as ``"mixed_bfloat16"``, a ``keras.DTypePolicy`` or a
            ``DTypePolicyMap``); default: Keras' global policy when the model is built. Stored in the config, so a
            ``.keras`` file reloads with it; the head computes in float32 under mixed precision.
    """

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        classifier="token",
        representation_size=None,
        include_top=True,
        classes=1000,
        classifier_activation=None,
        pooling=None,
        num_register_tokens=0,
        posemb="learn",
        posemb_class_token=True,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        stochastic_depth_rate=0.0,
        gelu="tanh",
        remat=False,
        channels=3,
        resnet_layers=None,
        resnet_width_factor=1,
        include_preprocessing=False,
        native_image_size=None,
        dynamic_padding=False,
        variant=None,
        class_names=None,
        input_tensor=None,
        name="vit",
        dtype=None,
        **kwargs,
    ):
        unknown = set(kwargs) - {"trainable"}
        if unknown:
            raise unknown_arguments_error(unknown, BUILDER_ARGUMENTS, "VisionTransformer")
        arch = Architecture.from_arguments(
            image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_layers=num_layers,
            num_heads=num_heads, mlp_dim=mlp_dim, classifier=classifier, representation_size=representation_size,
            include_top=include_top, classes=classes, pooling=pooling, num_register_tokens=num_register_tokens,
            posemb=posemb, posemb_class_token=posemb_class_token, gelu=gelu, channels=channels,
            resnet_layers=resnet_layers, resnet_width_factor=resnet_width_factor,
            native_image_size=native_image_size, dynamic_padding=dynamic_padding,
        )
        found_variant = configs.variant_of(arch)
        if variant is not None and variant != found_variant:
            raise ValueError(
                f"variant={variant!r} does not describe this geometry ({found_variant or 'no official variant'}): "
                "leave it None, it is inferred."
            )
        if class_names is not None:
            if isinstance(class_names, (str, bytes)) or not hasattr(class_names, "__iter__"):
                raise ValueError(f"class_names must be a list of names, one per class, got {class_names!r}.")
            class_names = [str(n) for n in class_names]
            if arch.classes is not None and len(class_names) != arch.classes:
                raise ValueError(f"class_names has {len(class_names)} names for {arch.classes} classes.")
        policy = keras.dtype_policies.get(dtype) if dtype is not None else keras.config.dtype_policy()
        quantized = _quantized_entries(policy)
        if quantized:  # a quantized model's config (``_dtype_config``): built in float, then quantized by Keras
            policy = policy.default_policy
        if not isinstance(policy, keras.dtype_policies.DTypePolicyMap) and policy.quantization_mode is not None:
            raise ValueError(
                f"dtype={policy.name!r} is a quantized policy: build the model with its source precision "
                f"(dtype={policy.name.split('_from_')[-1]!r}), load its weights, then call "
                f"model.quantize({policy.quantization_mode!r})."
            )

        inputs = input_tensor if input_tensor is not None else keras.Input((*arch.image_size, channels), name="image")
        x = inputs
        if include_preprocessing:
            x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, dtype=policy, name="preprocessing")(x)
        if dynamic_padding:
            x = PadToMultiple(arch.token_stride, dtype=policy, name="pad")(x)
        if resnet_layers is not None:
            x = resnet.resnet_stem(x, resnet_layers, resnet_width_factor, dtype=policy)
        pixels = x  # the patch embedding's input: each call's token grid comes from its size
        x = Patches(patch_size, hidden_size, dtype=policy, name="embedding")(x)
        prefix_layers = [layer for _, layer in prefix_token_layers(arch.prefix_tokens, policy)]
        posemb_layer = position_embedding(arch, policy)
        # The 2020 models add the position embeddings after the class token, which has a row; the others to the
        # grid tokens, before any prefix token.
        at = arch.posemb_prefix_rows
        token_layers = [*prefix_layers[:at], posemb_layer, *prefix_layers[at:],
                        Dropout(dropout_rate, dtype=policy, name="dropout")]
        for layer in token_layers:
            x = layer(x, pixels) if layer is posemb_layer else layer(x)
        for i in range(num_layers):
            x = TransformerBlock(
                num_heads,
                mlp_dim,
                dropout_rate=dropout_rate,
                attention_dropout_rate=attention_dropout_rate,
                stochastic_depth_rate=stochastic_depth_rate * i / max(num_layers - 1, 1),
                gelu=gelu,
                remat=remat,
                dtype=policy,
                name=f"encoderblock_{i}",
            )(x)
        x = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, dtype=policy, name="encoder_norm")(x)
        x = heads_lib.head(x, arch, classifier_activation, dtype=policy, output_dtype=_output_dtype(policy))
        super().__init__(inputs, x, name=name, **kwargs)
        self._architecture = arch
        self._token_layer_names = [layer.name for layer in token_layers]
        self._base_policy = policy.default_policy if isinstance(policy, keras.dtype_policies.DTypePolicyMap) else policy
        # The model's own policy is the layers' (Keras' compile reads it: a mixed_float16 model gets loss scaling).
        self.dtype_policy = self._base_policy
        # Each quantized layer gets its own policy from its own ``quantize``, as in the model that was saved (a
        # layer under a map would not save: Keras' layers read their mode off the policy they hold).
        _quantize_paths(self, quantized)
        self._vit_config = dict(
            image_size=arch.image_size,
            patch_size=arch.patch_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            classifier=classifier,
            representation_size=representation_size,
            include_top=include_top,
            classes=classes,
            classifier_activation=keras.activations.serialize(keras.activations.get(classifier_activation))
            if classifier_activation is not None and not isinstance(classifier_activation, str)
            else classifier_activation,
            pooling=pooling,
            num_register_tokens=num_register_tokens,
            posemb=posemb,
            posemb_class_token=bool(posemb_class_token),
            dropout_rate=dropout_rate,
            attention_dropout_rate=attention_dropout_rate,
            stochastic_depth_rate=stochastic_depth_rate,
            gelu=gelu,
            remat=remat,
            channels=channels,
            resnet_layers=arch.resnet_layers,
            resnet_width_factor=resnet_width_factor,
            include_preprocessing=include_preprocessing,
            native_image_size=arch.native_image_size,
            dynamic_padding=arch.dynamic_padding,
            variant=found_variant,
            class_names=class_names,
        )

    # --- configuration ------------------------------------------------------------------------------------------

    def get_config(self):
        return {
            **copy.deepcopy(dict(self._vit_config)),
            "name": self.name,
            "trainable": self.trainable,
            "dtype": self._dtype_config(),
        }

    def _dtype_config(self):
        """The policy name; with quantized layers a serialized ``DTypePolicyMap`` of their policies by path."""
        policies = {layer.path: _resolved_policy(layer) for layer in _nested_layers(self.layers)
                    if layer.quantization_mode is not None}
        if not policies:
            return self._base_policy.name
        return keras.dtype_policies.serialize(
            keras.dtype_policies.DTypePolicyMap(default_policy=self._base_policy, policy_map=policies)
        )

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @property
    def vit_config(self):
        """The builder arguments of this model (a copy): ``VisionTransformer(**model.vit_config)`` rebuilds it."""
        return copy.deepcopy(dict(self._vit_config))

    @property
    def architecture(self):
        """The model's ``keras_vit.architecture.Architecture``."""
        return self._architecture

    @property
    def token_stride(self):
        """Image pixels per token, (rows, columns): patch size x ResNet stride."""
        return self._architecture.token_stride

    @property
    def grid(self):
        """The token grid (gh, gw); None for a side of a model that takes any size (see ``grid_for``)."""
        return self._architecture.grid

    def grid_for(self, images):
        """The token grid (gh, gw) of ``images`` (B, H, W, C) or of an (H, W) size, for a model of any size."""
        shape = tuple(getattr(images, "shape", images))
        return self._architecture.grid_for(*(shape[1:3] if len(shape) == 4 else shape[:2]))

    @property
    def num_prefix_tokens(self):
        """Tokens before the grid tokens: the class token and register tokens."""
        return self._architecture.num_prefix_tokens

    @property
    def class_names(self):
        """The names of the classes given when the model was built, or None."""
        return self._vit_config["class_names"]

    def _check_images(self, images):
        """A one-line ``ValueError`` naming the expected input for images of another rank or channel count."""
        shape = getattr(images, "shape", None)
        if shape is None:
            return
        try:
            rank = len(shape)
        except (TypeError, ValueError):  # a TensorFlow shape of unknown rank
            return
        channels = self._vit_config["channels"]
        if rank != 4 or shape[-1] not in (None, channels):
            height, width = ("H" if side is None else side for side in self._architecture.image_size)
            raise ValueError(
                f"{self.name} expects images shaped (batch, {height}, {width}, {channels}), got {tuple(shape)}."
            )
        arch = self._architecture
        if arch.dynamic and not arch.dynamic_padding:
            for side, size, step in zip(("height", "width"), shape[1:3], arch.token_stride):
                if isinstance(size, int) and size % step:
                    raise ValueError(
                        f"{self.name} takes images whose {side} is a multiple of {step}, got {size}: resize them, "
                        "or build the model with dynamic_padding=True (zeros added at the bottom and right)."
                    )

    def __call__(self, *args, **kwargs):
        images = args[0] if args else kwargs.get("inputs")
        self._check_images(images)
        if self._vit_config["include_preprocessing"] and isinstance(images, np.ndarray):
            # NumPy input only: its range is at hand (graphs, predict and fit are never checked)
            check_pixels(images, f"{self.name} (include_preprocessing=True)")
        return super().__call__(*args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        self._check_images(inputs)  # also on the JAX backend, whose trainer calls ``call`` directly
        return super().call(inputs, training=training, mask=mask)

    # --- weights: official names, quantization, LoRA ---------------------------------------------------------

    def official_weights(self):
        """``{official checkpoint name: variable}`` of every weight (``keras_vit.pretrained`` reads and writes them)."""
        return official_weights(self)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Keras' ``Model.quantize`` on every projection (attention, MLP, MAP head, pre-logits, head).

        ``mode``: ``"int8"``, ``"int4"`` or ``"float8"`` (or a ``config``). By default only ``Dense`` and
        ``EinsumDense`` layers are visited (convolutions, normalizations and embeddings stay as they are);
        ``filters`` is Keras' argument and replaces that choice. The quantized model saves to ``.keras`` and
        reloads quantized (its config holds the layers' dtype policies). LoRA factors are merged into their
        kernels first and removed (``merge_lora``), so the quantized model computes what its file holds.
        """
        if filters is None:
            filters = lambda layer: isinstance(layer, _QUANTIZABLE)  # noqa: E731
        self.merge_lora()
        super().quantize(mode, config=config, filters=filters, **kwargs)
        _FEATURE_MODELS.pop(self, None)

    def enable_lora(self, rank, target_names=_LORA_TARGETS, train_head=True):
        """LoRA (Hu et al., 2021) on the projections named ``target_names`` (keras-hub's semantics).

        Every weight is frozen except the new low-rank factors of the layers named in ``target_names``
        (attention ``query``/``key``/``value``/``out``, the MLP's ``Dense_0``/``Dense_1``) and, with
        ``train_head``, the classifier ``head`` (and ``pre_logits``). The outputs are unchanged right after
        enabling (the second factor starts at zero). Saving a ``.keras`` file merges the factors into the
        kernels; ``save_lora_weights`` stores the factors alone. ``rank``: a positive int, at most the rank a
        target's update can have (its kernel's output size per head, e.g. the head size for ``query``); a name
        that is no projection of the model, or a rank out of range, is a ``ValueError`` before anything changes.
        """
        names = (target_names,) if isinstance(target_names, str) else tuple(target_names)
        projections = [layer for layer in _nested_layers(self.layers) if hasattr(layer, "enable_lora")]
        unknown = sorted(set(names) - {layer.name for layer in projections})
        if unknown or not names:
            raise ValueError(
                f"target_names {unknown or names} name no projection of {self.name}: LoRA targets are "
                f"{', '.join(sorted({layer.name for layer in projections}))}."
            )
        self._enable_lora(rank, [layer for layer in projections if layer.name in names], train_head)

    def _enable_lora(self, rank, targets, train_head=True):
        """LoRA of ``rank`` on the layers ``targets`` (see ``enable_lora``); checked before anything changes."""
        if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"The LoRA rank must be a positive int, got {rank!r}.")
        widest = min(targets, key=_lora_rank_limit)
        limit = _lora_rank_limit(widest)
        if rank > limit:
            raise ValueError(
                f"LoRA rank {rank} is above {limit}, the rank of an update of the {widest.name!r} projection (kernel "
                f"{tuple(widest.kernel.shape)}): a higher rank adds factors, not expressiveness; use rank <= {limit}."
            )
        enabled = [layer.path for layer in targets if layer.lora_enabled]
        if enabled:
            raise ValueError(f"LoRA is already enabled on {enabled[0]}: enable it once per model.")
        self.trainable = True
        for layer in _nested_layers(self.layers):
            layer.trainable = False
        for layer in targets:
            layer.trainable = True
            layer.enable_lora(int(rank))
            if layer.bias is not None:
                layer.bias.trainable = False
        if train_head:
            for name in ("pre_logits", "head"):
                if any(layer.name == name for layer in self.layers):
                    self.get_layer(name).trainable = True
        self._lora = {"rank": int(rank), "paths": [layer.path for layer in targets]}

    def merge_lora(self):
        """Adds each LoRA update to its layer's kernel (what saving a ``.keras`` file does) and removes the factors:
        the model computes the same and has no LoRA left (its layers stay as trainable as they were). Nothing to
        do without LoRA. ``quantize`` calls it first."""
        if not getattr(self, "_lora", None):
            return
        for layer in self._lora_layers():
            if layer.quantization_mode is not None:
                raise ValueError(
                    f"{layer.path} is quantized: its LoRA update merges when the model is saved (model.save), "
                    "which quantizes the merged kernel again."
                )
            _base_kernel(layer).assign(layer.kernel)  # Keras' kernel property: kernel + (alpha / rank) * A @ B
            del layer.lora_kernel_a, layer.lora_kernel_b  # untracked by Keras' Layer.__delattr__
            layer.lora_enabled, layer.lora_rank, layer.lora_alpha = False, None, None
        del self._lora
        _FEATURE_MODELS.pop(self, None)

    def _lora_layers(self):
        paths = getattr(self, "_lora", {}).get("paths")
        if not paths:
            raise ValueError(f"{self.name} has no LoRA layers: call enable_lora(rank) first.")
        by_path = {layer.path: layer for layer in _nested_layers(self.layers)}
        return [by_path[path] for path in paths]

    def save_lora_weights(self, path):
        """Writes the LoRA factors (and rank) to ``path`` (``.lora.h5``), keyed by layer path, with a digest of the
        frozen weights they adapt (``load_lora_weights`` checks it)."""
        path = str(path)
        if not path.endswith(".lora.h5"):
            raise ValueError(f"LoRA weights go to a file named '*.lora.h5', got {path!r}.")
        layers = self._lora_layers()
        with h5py.File(path, "w") as file:
            file.attrs["rank"] = self._lora["rank"]
            file.attrs["base_sha256"] = _lora_base_digest(layers)
            for layer in layers:
                group = file.create_group(layer.path)
                group["a"] = keras.ops.convert_to_numpy(layer.lora_kernel_a)
                group["b"] = keras.ops.convert_to_numpy(layer.lora_kernel_b)

    def load_lora_weights(self, path):
        """Reads factors written by ``save_lora_weights`` (enabling LoRA on their layers with their rank first when
        the model has none).

        Checked before anything changes (a refused file leaves the model as it was): the factors must be those
        of this model's layers, rank and shapes (else a ``CheckpointMismatchError`` with the ``missing``,
        ``unexpected`` and ``mis_shaped`` factors), and have been trained on this base model: the frozen weights
        they adapt must be the ones they were saved with (files that carry their digest).
        """
        factors = {}
        with h5py.File(str(path), "r") as file:
            rank, base = int(file.attrs["rank"]), file.attrs.get("base_sha256")

            def read(name, item):
                if isinstance(item, h5py.Group) and "a" in item:
                    factors[name] = (item["a"][()], item["b"][()])

            file.visititems(read)
        current = getattr(self, "_lora", None)
        projections = {layer.path: layer for layer in _nested_layers(self.layers) if hasattr(layer, "enable_lora")}
        targets = current["paths"] if current else [name for name in factors if name in projections]
        model_rank = current["rank"] if current else rank
        missing = [f"{name}/lora_kernel_{part}" for name in targets if name not in factors for part in "ab"]
        unexpected = [f"{name}/lora_kernel_{part}" for name in factors if name not in targets for part in "ab"]
        mis_shaped = []
        for name in set(targets) & set(factors):
            shape = tuple(projections[name].kernel.shape)
            wanted = (shape[:-1] + (model_rank,), (model_rank, shape[-1]))
            mis_shaped += [(f"{name}/lora_kernel_{part}", array.shape, want)
                           for part, array, want in zip("ab", factors[name], wanted) if array.shape != want]
        if missing or unexpected or mis_shaped:
            raise CheckpointMismatchError(
                str(path), missing, unexpected, mis_shaped,
                summary=f"it holds rank-{rank} LoRA factors of {len(factors)} layers",
                advice="Load LoRA factors onto the model they were trained on, without LoRA enabled or with the "
                "same rank and targets.",
            )
        if base is not None and base != _lora_base_digest([projections[name] for name in targets]):
            raise CheckpointMismatchError(
                str(path), summary="its factors were trained on another base model (the frozen weights they adapt "
                "differ from this model's)",
                advice="Load them onto the model they were trained from (the same pretrained or fine-tuned weights).",
            )
        if not current:
            self._enable_lora(rank, [projections[name] for name in targets])
        layers = {layer.path: layer for layer in self._lora_layers()}
        for name, (a, b) in factors.items():
            layers[name].lora_kernel_a.assign(a)
            layers[name].lora_kernel_b.assign(b)

    # --- features -------------------------------------------------------------------------------------------

    def _cached(self, key, build):
        models = _FEATURE_MODELS.setdefault(self, {})
        if key not in models:
            models[key] = build()
        return models[key]

    def _blocks(self):
        return [self.get_layer(f"encoderblock_{i}") for i in range(self._vit_config["num_layers"])]

    def _feature_tensors(self, blocks, attention):
        tokens = self.get_layer("encoder_norm").output
        arch = self._architecture
        if arch.classes is not None:
            pre_logits = self.get_layer("head").input
        elif arch.pooling is not None:
            pre_logits = self.outputs[0]
        else:
            method = "token" if arch.class_token else "gap"
            pre_logits = TokenPooling(method, self.num_prefix_tokens, name="features_pool")(tokens)
        out = {"pre_logits": pre_logits, "tokens": tokens}
        if blocks:
            out["blocks"] = [block.output for block in self._blocks()]
        if attention:
            # A layer of its own per block: a second, two-output node of the block would trip Keras' graph
            # check, which sizes every node of a layer by its first node's outputs.
            out["attention"] = [
                AttentionWeights(block, name=f"{block.name}_attention")(block.input) for block in self._blocks()
            ]
            pool = self.get_layer("pool") if arch.pooling is not None else None
            if hasattr(pool, "attention_weights"):  # a pooling that attends (MAPHead)
                out["pooling_attention"] = AttentionWeights(pool, name="pool_attention")(pool.input)
        return out

    def feature_model(self, output=None, blocks=False, attention=False):
        """A ``keras.Model`` sharing this model's layers: images -> the features of ``features`` (a dict).

        ``output="pre_logits"`` or ``"tokens"`` makes a model with that single output instead. Built once per
        argument set and cached.
        """

        def build():
            tensors = self._feature_tensors(blocks, attention)
            outputs = tensors if output is None else tensors[output]
            return keras.Model(self.inputs[0], outputs, name=f"{self.name}_features")

        return self._cached(("features", output, blocks, attention), build)

    def features(self, images, blocks=False, attention=False, training=False):
        """Everything the model computes on ``images``, as a dict of tensors.

        * ``"pre_logits"``: (B, F), what the head reads (F = hidden size or representation size); for a model
          without pooling, the class token (token models) or the mean grid token after ``encoder_norm``;
        * ``"tokens"``: (B, T, D), the token sequence after ``encoder_norm``
          (T = ``num_prefix_tokens`` + gh * gw);
        * ``"blocks"`` (``blocks=True``): L tensors (B, T, D), each block's output;
        * ``"attention"`` (``attention=True``): L tensors (B, N, T, T) float32, each block's attention weights;
        * ``"pooling_attention"`` (``attention=True``, MAP pooling): (B, N, 1, gh * gw) float32, the probe's
          attention over the grid tokens.
        """
        return self.feature_model(blocks=blocks, attention=attention)(images, training=training)

    def position_embeddings(self):
        """The position embeddings of the grid tokens, (gh * gw, D) NumPy: the learned table's grid rows, or the
        fixed sin-cos values."""
        layer = self.get_layer("posembed_input")
        if self._architecture.posemb == "learn":
            table = keras.ops.convert_to_numpy(layer.pos_embedding)[0, self._architecture.posemb_prefix_rows :]
        else:
            table = layer.table()[0]
        return np.asarray(table, np.float32)

    def patch_embedding_model(self):
        """images (B, H, W, C) -> patch embeddings (B, gh * gw, D) (after a hybrid's ResNet), sharing layers."""
        return self._cached(
            ("patches",), lambda: keras.Model(self.inputs[0], self.get_layer("embedding").output, name=f"{self.name}_patches")
        )

    def encoder_model(self):
        """patch embeddings (B, gh * gw, D) -> tokens after ``encoder_norm`` (B, T, D), sharing layers.

        Runs position embeddings, prefix tokens, dropout, the blocks and the final norm; ``training`` reaches the
        dropout and the blocks.
        """

        def build():
            grid, hidden = self.grid, self._vit_config["hidden_size"]
            if None in grid:
                raise ValueError(f"encoder_model needs a fixed token grid; {self.name} takes any image size.")
            embeddings = keras.Input((grid[0] * grid[1], hidden), name="embeddings")
            x = embeddings
            names = self._token_layer_names + [f"encoderblock_{i}" for i in range(self._vit_config["num_layers"])]
            for name in names + ["encoder_norm"]:
                x = self.get_layer(name)(x)
            return keras.Model(embeddings, x, name=f"{self.name}_encoder")

        return self._cached(("encoder",), build)


BUILDER_ARGUMENTS = tuple(
    name for name in VisionTransformer.__init__.__code__.co_varnames[1 : VisionTransformer.__init__.__code__.co_argcount]
)


_LEGACY_PROJECTION = re.compile(r"^(.*/MultiHeadDotProductAttention_\d+)/(query|key|value|out)_(kernel|bias)$")


def current_variable_path(path):
    """Today's ``variable.path`` for one written by keras_vit <= 0.1.0 at 410d757, whose attention layers held their
    projections as variables (``.../MultiHeadDotProductAttention_1/query_kernel`` is now
    ``.../MultiHeadDotProductAttention_1/query/kernel``); other paths unchanged. For readers of stored paths, such as
    the training checkpoints."""
    return _LEGACY_PROJECTION.sub(r"\1/\2/\3", path)


def official_weights(model):
    """``{official checkpoint name: variable}`` of a keras_vit model, by the names its layers declare.

    Also serves plain functional models saved by keras_vit before ``VisionTransformer`` existed. A layer with
    weights that has no official counterpart is a ``ValueError``.
    """
    weights = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        declared = layer_official_weights(layer)
        if declared is None:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) has no counterpart in the official checkpoints; "
                "only models built by keras_vit.vision_transformer can load them."
            )
        scope = official_scope(layer.name)
        weights.update({"/".join(p for p in (scope, name) if p): v for name, v in declared.items()})
    return weights


def official_arrays(model):
    """The weights of a keras_vit model as ``{official name: float32 array}``, ready to save as an official .npz.

    A layer quantized to integer codes (``holds_codes``) gives its effective weights, the float kernel it applies
    (``dequantized_copy``), never its codes.
    """
    if holds_codes(model):
        model = dequantized_copy(as_vision_transformer(model, "Reading the weights of a quantized model"))
    return {name: np.asarray(keras.ops.convert_to_numpy(v), np.float32) for name, v in official_weights(model).items()}


def holds_codes(model):
    """Whether a layer of ``model`` is quantized to integer codes (int8, int4, GPTQ, AWQ): its ``kernel`` variable
    then holds codes, not weights (float8 layers keep float kernels)."""
    return any(layer.quantization_mode in _CODE_MODES for layer in _nested_layers(model.layers))


def quantize_like(model, reference):
    """Quantizes the float layers of ``model`` that are quantized in ``reference`` (same paths), each in its mode
    and configuration, with Keras' own ``quantize`` (float8 layers start with fresh scales)."""
    _quantize_paths(model, {layer.path: _resolved_policy(layer) for layer in _nested_layers(reference.layers)
                            if layer.quantization_mode})


def _quantized_entries(policy):
    """``{path: quantized DTypePolicy}`` of a ``DTypePolicyMap`` (a quantized model's config); {} otherwise.

    Its other entries are left out: the builder gives those layers their policies (the head's float32)."""
    if not isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return {}
    return {path: policy[path] for path in policy if policy[path].quantization_mode is not None}


def _quantize_paths(model, policies):
    """Quantizes the layers of ``model`` at the paths of ``policies`` ({path: quantized DTypePolicy}) with Keras'
    own ``quantize``, each in its policy's mode and int4 block size. GPTQ and AWQ need calibration data: a
    ``ValueError``."""
    groups = {}
    for path, policy in policies.items():
        mode = policy.quantization_mode
        if mode in ("gptq", "awq"):
            raise ValueError(
                f"{path} is {mode.upper()}-quantized, which needs calibration data to quantize again: load the "
                "weights into the float model, then quantize it."
            )
        block_size = getattr(policy, "block_size", None) if mode == "int4" else None
        groups.setdefault((mode, block_size), set()).add(path)
    for (mode, block_size), paths in groups.items():
        config = None if block_size in (None, -1) else keras.quantizers.Int4QuantizationConfig(block_size=block_size)
        keras.Model.quantize(model, mode, config=config, filters=lambda layer, paths=paths: layer.path in paths)
    if policies:
        _FEATURE_MODELS.pop(model, None)


def _effective_kernel(quantized, shape):
    """The float kernel of ``shape`` that a quantized ``Dense`` or ``EinsumDense`` (on (B, T, ...) inputs whose
    kernel lists the input axes first) applies, read back through the layer: one-hot inputs, which every Keras
    quantization mode represents exactly, give the kernel's rows plus the bias."""
    if isinstance(quantized, keras.layers.EinsumDense):
        in_shape = tuple(shape[: len(quantized.equation.split(",")[0]) - 2])
        fan_in = int(np.prod(in_shape))
        probe = np.eye(fan_in, dtype="float32").reshape((1, fan_in, *in_shape))
    else:
        fan_in = shape[0]
        probe = np.eye(fan_in, dtype="float32")
    response = np.asarray(keras.ops.convert_to_numpy(quantized(probe)), np.float32).reshape((fan_in, -1))
    if quantized.bias is not None:
        response = response - np.asarray(keras.ops.convert_to_numpy(quantized.bias), np.float32).reshape(1, -1)
    return response.reshape(shape)


def dequantized_copy(model):
    """A ``VisionTransformer`` computing in its source precision with the effective weights of a quantized one.

    For converters that cannot take Keras' integer products (TFLite); ``model`` itself is unchanged.
    """
    config = model.get_config()
    policy = keras.dtype_policies.get(config["dtype"])
    config["dtype"] = (policy.default_policy if isinstance(policy, keras.dtype_policies.DTypePolicyMap) else policy).name
    twin = VisionTransformer(**config)
    originals = {layer.path: layer for layer in _nested_layers(model.layers)}
    quantized = {path for path, layer in originals.items() if layer.quantization_mode is not None}
    variables = {variable.path: variable for variable in model.variables}
    for layer in _nested_layers(twin.layers):
        if layer.path in quantized:
            layer.kernel.assign(_effective_kernel(originals[layer.path], tuple(layer.kernel.shape)))
    for variable in twin.variables:
        if variable.path.rsplit("/", 1)[0] not in quantized or variable.path.endswith("/bias"):
            variable.assign(variables[variable.path])
    return twin


def as_vision_transformer(model, what="this function"):
    """``model`` itself when it is a ``VisionTransformer``; otherwise a ``TypeError`` saying how to convert it."""
    if isinstance(model, VisionTransformer):
        return model
    raise TypeError(
        f"{what} needs a keras_vit.VisionTransformer, got a {type(model).__name__}. A model loaded from a .keras "
        "file saved by keras_vit before VisionTransformer existed is a plain functional model: convert the file "
        "once with keras_vit.from_official_checkpoint('old.keras').save('new.keras')."
    )


def vision_transformer(*args, input_tensor=None, **config):
    """Builds a ``VisionTransformer`` (see its arguments); ``input_tensor`` as in ``keras.applications``.

    An ``input_tensor`` that is a ``keras.Input`` becomes the model's input. One computed by other layers is
    connected through a wrapping functional model whose inputs are the tensor's sources; the ViT is then its
    layer named ``config["name"]`` (``model.get_layer(name)`` for the features API).
    """
    if input_tensor is None:
        return VisionTransformer(*args, **config)
    config = {**dict(zip(BUILDER_ARGUMENTS, args)), **config}
    if not keras.backend.is_keras_tensor(input_tensor):
        raise TypeError(f"input_tensor must be a Keras tensor (e.g. keras.Input(...)), got {type(input_tensor).__name__}.")
    shape = tuple(input_tensor.shape[1:])
    if len(shape) != 3 or None in shape[:2]:
        raise ValueError(f"input_tensor must be shaped (batch, height, width, channels) with a fixed size, got {input_tensor.shape}.")
    config.update(image_size=shape[:2], channels=shape[2])
    sources = keras.utils.get_source_inputs(input_tensor)
    if len(sources) == 1 and sources[0] is input_tensor:
        return VisionTransformer(input_tensor=input_tensor, **config)
    vit = VisionTransformer(**config)
    return keras.Model(sources, vit(input_tensor), name=f"{vit.name}_on_input_tensor")
