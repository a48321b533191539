"""The Vision Transformer model: ``VisionTransformer``, a functional ``keras.Model`` built from its arguments.

A registered functional ``keras.Model`` subclass (as keras-hub's ``Backbone``; quantization and LoRA come from
``keras_vit.backbone.Backbone``, checkpoint names from ``keras_vit.official_names``). Its layer names mirror the
official module tree (``embedding``, ``cls``, ``posembed_input``, ``encoderblock_0`` ..., ``encoder_norm``,
``pre_logits``, ``head``); its config is the builder's arguments, declared once as the fields of ``Architecture``
(structure, ``model.architecture``) and ``ModelOptions`` (the rest), from which the signature, docstring, config
and unknown-argument suggestions derive (``ARGUMENTS``). It answers for itself: ``features`` (sub-graphs of its
own graph: no ``Lambda`` layers, no code elsewhere walking ``model.layers``), ``patch_embedding_model``,
``encoder_model``. ``.keras`` files saved before it existed load as plain functional models that predict as
before; convert one once with ``keras_vit.from_official_checkpoint(path).save(new_path)`` for the features API.
"""

import copy
import inspect
import weakref

import keras
import numpy as np

from keras_vit import arguments, official_names, resnet
from keras_vit.architecture import Architecture, ModelOptions
from keras_vit.backbone import Backbone, head_policy, model_policy
from keras_vit.layers import PACKAGE, AttentionWeights, Dropout, LayerNorm, Patches, TokenPooling, TransformerBlock
from keras_vit.layers import heads as heads_lib
from keras_vit.layers.embedding import PadToMultiple, position_embedding
from keras_vit.layers.tokens import prefix_token_layers
from keras_vit.preprocessing import check_pixels, input_settings, normalization

_FEATURE_MODELS = weakref.WeakKeyDictionary()  # model -> {key: sub-model sharing its layers}
_KERAS_ARGUMENTS = ("input_tensor", "name", "dtype")


@keras.saving.register_keras_serializable(package=PACKAGE)
class VisionTransformer(Backbone):
    """A Vision Transformer, a functional ``keras.Model`` built from its configuration.

    Input: images (B, H, W, channels), float in [-1, 1] for official weights (see
    ``keras_vit.preprocess_input``), or pixels in [0, 255] with ``include_preprocessing=True``. Output:

    * ``include_top=True``: (B, classes) logits (``classifier_activation=None``) or activations (e.g.
      ``"softmax"``), always float32;
    * ``include_top=False, pooling=None``: the token sequence after ``encoder_norm``, (B, T, hidden_size);
    * ``include_top=False, pooling="token"|"avg"|"max"|"map"``: (B, hidden_size), or (B, representation_size)
      with a representation layer.

    Args:
{args}
        input_tensor: optional ``keras.Input`` to use as the model's input (not serialized: a reloaded model gets
            its own input).
        name: model name.
        dtype: the dtype policy of every layer (a name such as ``"mixed_bfloat16"``, a ``keras.DTypePolicy`` or a
            ``DTypePolicyMap``); default: Keras' global policy when the model is built. Stored in the config, so a
            ``.keras`` file reloads with it; the head computes in float32 under mixed precision.
    """

    def __init__(self, *args, input_tensor=None, name="vit", dtype=None, **kwargs):
        given = arguments.bind(ARGUMENT_FIELDS, args, kwargs, "VisionTransformer", (*_KERAS_ARGUMENTS, "trainable"))
        arch, options = arguments.make(Architecture, given), arguments.make(ModelOptions, given)
        variant, class_names = options.resolved_for(arch)
        policy, quantized = model_policy(dtype)

        inputs = input_tensor if input_tensor is not None else keras.Input((*arch.image_size, arch.channels), name="image")
        x = inputs
        if options.include_preprocessing:
            scale, offset = normalization(options.preprocessing, arch.channels)
            x = keras.layers.Rescaling(scale, offset=offset, dtype=policy, name="preprocessing")(x)
        if arch.dynamic_padding:
            x = PadToMultiple(arch.token_stride, dtype=policy, name="pad")(x)
        if arch.resnet_layers is not None:
            x = resnet.resnet_stem(x, arch.resnet_layers, arch.resnet_width_factor, dtype=policy)
        pixels = x  # the patch embedding's input: each call's token grid comes from its size
        x = Patches(arch.patch_size, arch.hidden_size, use_bias=not arch.pre_norm, dtype=policy, name="embedding")(x)
        prefix_layers = [layer for _, layer in prefix_token_layers(arch.prefix_tokens, policy)]
        posemb_layer = position_embedding(arch, policy)
        # The 2020 models add the position embeddings after the class token, which has a row; the others to the
        # grid tokens, before any prefix token.
        at = arch.posemb_prefix_rows
        token_layers = [*prefix_layers[:at], posemb_layer, *prefix_layers[at:],
                        Dropout(options.dropout_rate, dtype=policy, name="dropout")]
        if arch.pre_norm:
            token_layers.append(LayerNorm(epsilon=arch.layer_norm_epsilon, dtype=policy, name="pre_norm"))
        for layer in token_layers:
            x = layer(x, pixels) if layer is posemb_layer else layer(x)
        for i in range(arch.num_layers):
            x = TransformerBlock(
                arch.num_heads,
                arch.mlp_dim,
                dropout_rate=options.dropout_rate,
                attention_dropout_rate=options.attention_dropout_rate,
                stochastic_depth_rate=options.stochastic_depth_rate * i / max(arch.num_layers - 1, 1),
                gelu=arch.gelu,
                layer_norm_epsilon=arch.layer_norm_epsilon,
                layer_scale=arch.layer_scale,
                qkv_bias=arch.qkv_bias,
                qk_norm=arch.qk_norm,
                remat=options.remat,
                dtype=policy,
                name=f"encoderblock_{i}",
            )(x)
        if not arch.fc_norm:  # with fc_norm the final norm comes after pooling (heads_lib.head)
            x = keras.layers.LayerNormalization(epsilon=arch.layer_norm_epsilon, dtype=policy, name="encoder_norm")(x)
        tokens_layer = "encoder_norm" if not arch.fc_norm else f"encoderblock_{arch.num_layers - 1}"
        x = heads_lib.head(x, arch, options.classifier_activation, dtype=policy, output_dtype=head_policy(policy))
        super().__init__(inputs, x, name=name, **kwargs)
        self._architecture = arch
        self._token_layer_names = [layer.name for layer in token_layers]
        self._tokens_layer_name = tokens_layer  # the encoder's output: after the final norm, or un-normed (fc_norm)
        self._init_backbone(policy, quantized)
        self._vit_config = {**arguments.config_of(given, arch, options), "variant": variant, "class_names": class_names}

    # --- configuration ------------------------------------------------------------------------------------------

    def get_config(self):
        return {
            **copy.deepcopy(dict(self._vit_config)),
            "name": self.name,
            "trainable": self.trainable,
            "dtype": self._dtype_config(),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @property
    def vit_config(self):
        """The builder arguments of this model (a copy): ``VisionTransformer(**model.vit_config)`` rebuilds it."""
        return copy.deepcopy(dict(self._vit_config))

    @property
    def preprocessing(self):
        """The input pipeline this model's weights expect (``keras_vit.preprocessing.input_settings``: mean, std,
        interpolation, crop_pct, crop_mode); ``keras_vit.preprocess_input(images, model=model)`` reads it."""
        return input_settings(self._vit_config.get("preprocessing"))

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

    def official_weights(self):
        """``{official checkpoint name: variable}`` of every weight (``keras_vit.pretrained`` reads and writes them)."""
        return official_names.official_weights(self)

    # --- input checks -------------------------------------------------------------------------------------------

    def _check_images(self, images):
        """A one-line ``ValueError`` naming the expected input for images of another rank or channel count."""
        shape = getattr(images, "shape", None)
        if shape is None:
            return
        try:
            rank = len(shape)
        except (TypeError, ValueError):  # a TensorFlow shape of unknown rank
            return
        arch = self._architecture
        if rank != 4 or shape[-1] not in (None, arch.channels):
            height, width = ("H" if side is None else side for side in arch.image_size)
            raise ValueError(
                f"{self.name} expects images shaped (batch, {height}, {width}, {arch.channels}), got {tuple(shape)}."
            )
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

    def _changed(self):
        _FEATURE_MODELS.pop(self, None)

    # --- features -------------------------------------------------------------------------------------------

    def _cached(self, key, build):
        models = _FEATURE_MODELS.setdefault(self, {})
        if key not in models:
            models[key] = build()
        return models[key]

    def _blocks(self):
        return [self.get_layer(f"encoderblock_{i}") for i in range(self._architecture.num_layers)]

    def _feature_tensors(self, blocks, attention):
        tokens = self.get_layer(self._tokens_layer_name).output
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
        * ``"tokens"``: (B, T, D), the token sequence after ``encoder_norm`` (un-normed with ``fc_norm``, as
          timm's ``forward_features``) (T = ``num_prefix_tokens`` + gh * gw);
        * ``"blocks"`` (``blocks=True``): L tensors (B, T, D), each block's output;
        * ``"attention"`` (``attention=True``): L tensors (B, N, T, T) float32, each block's attention weights;
        * ``"pooling_attention"`` (``attention=True``, MAP pooling): (B, N, 1, gh * gw) float32, the probe's
          attention over the grid tokens.
        """
        return self.feature_model(blocks=blocks, attention=attention)(images, training=training)

    def position_embeddings(self):
        """The position embeddings of the grid tokens, (gh * gw, D) NumPy: the learned table's grid rows, or the
        fixed sin-cos values."""
        return self.get_layer("posembed_input").grid_embeddings()

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
            grid, hidden = self.grid, self._architecture.hidden_size
            if None in grid:
                raise ValueError(f"encoder_model needs a fixed token grid; {self.name} takes any image size.")
            embeddings = keras.Input((grid[0] * grid[1], hidden), name="embeddings")
            x = embeddings
            names = self._token_layer_names + [f"encoderblock_{i}" for i in range(self._architecture.num_layers)]
            for name in names + ["encoder_norm"] * (not self._architecture.fc_norm):
                x = self.get_layer(name)(x)
            return keras.Model(embeddings, x, name=f"{self.name}_encoder")

        return self._cached(("encoder",), build)


ARGUMENT_FIELDS = arguments.declared(Architecture, ModelOptions)
ARGUMENTS = (*(field.name for field in ARGUMENT_FIELDS), *_KERAS_ARGUMENTS)
arguments.set_signature(VisionTransformer, ARGUMENT_FIELDS, [
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
    for name, default in (("input_tensor", None), ("name", "vit"), ("dtype", None))
] + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])


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
    config = {**dict(zip(ARGUMENTS, args)), **config}
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
