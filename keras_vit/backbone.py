"""``Backbone``: the weights-side machinery of a keras_vit model, a functional ``keras.Model`` base class (as
keras-hub's ``Backbone``): quantization (Keras' own ``quantize``, its policies stored in the config as a
``DTypePolicyMap``), LoRA (Keras' own ``enable_lora``) with its factors in ``.lora.h5`` files, and the
dequantized twin of a quantized model.

A subclass builds its graph and calls ``_init_backbone(policy, quantized)`` after ``keras.Model.__init__``; its
config's ``"dtype"`` is ``_dtype_config()``; it rebuilds from ``get_config()`` (``dequantized_copy``).
"""

import hashlib
import numbers

import h5py
import keras
import numpy as np

from keras_vit.arguments import ArgumentError
from keras_vit.errors import CheckpointMismatchError

LORA_TARGETS = ("query", "value")
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


def model_policy(dtype):
    """``(policy, quantized)`` of a builder's ``dtype``: the float policy the layers are built with, and
    ``{path: quantized DTypePolicy}`` of a quantized model's config (``_dtype_config``), applied after the build
    (``_init_backbone``). A quantized policy name is a ``ValueError`` naming the way to get one."""
    policy = keras.dtype_policies.get(dtype) if dtype is not None else keras.config.dtype_policy()
    quantized = _quantized_entries(policy)
    if quantized:  # a quantized model's config: built in float, then quantized by Keras
        policy = policy.default_policy
    if not isinstance(policy, keras.dtype_policies.DTypePolicyMap) and policy.quantization_mode is not None:
        raise ArgumentError(
            "dtype", policy.name, "a float policy (quantize after loading the weights)",
            f"dtype={policy.name!r} is a quantized policy: build the model with its source precision "
            f"(dtype={policy.name.split('_from_')[-1]!r}), load its weights, then call "
            f"model.quantize({policy.quantization_mode!r})."
        )
    return policy, quantized


def head_policy(policy):
    """The classifier head's dtype under a model's ``policy``: float32 under a mixed policy (logits are always
    float32); a policy map says it itself."""
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy
    return "float32" if policy.compute_dtype != policy.variable_dtype else policy


class Backbone(keras.Model):
    """A functional ``keras.Model`` with Keras' quantization and LoRA reaching every projection, and their state
    (quantized layers' policies, LoRA factors) kept through ``.keras`` files and ``.lora.h5`` files."""

    def _init_backbone(self, policy, quantized):
        """After ``keras.Model.__init__``: the model's own policy is the layers' (Keras' compile reads it: a
        mixed_float16 model gets loss scaling); the layers of ``quantized`` (``model_policy``) are quantized, each by
        its own ``quantize``, as in the model that was saved (a layer under a map would not save: Keras' layers
        read their mode off the policy they hold)."""
        self._base_policy = policy.default_policy if isinstance(policy, keras.dtype_policies.DTypePolicyMap) else policy
        self.dtype_policy = self._base_policy
        _quantize_paths(self, quantized)

    def _changed(self):
        """Called when layers change (quantized, LoRA merged): a subclass drops what it built on the old layers."""

    def _dtype_config(self):
        """The policy name; with quantized layers a serialized ``DTypePolicyMap`` of their policies by path."""
        policies = {layer.path: _resolved_policy(layer) for layer in _nested_layers(self.layers)
                    if layer.quantization_mode is not None}
        if not policies:
            return self._base_policy.name
        return keras.dtype_policies.serialize(
            keras.dtype_policies.DTypePolicyMap(default_policy=self._base_policy, policy_map=policies)
        )

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
        self._changed()

    def enable_lora(self, rank, target_names=LORA_TARGETS, train_head=True):
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
            raise ArgumentError(
                "target_names", unknown or list(names), "names of the model's projections",
                f"target_names {unknown or names} name no projection of {self.name}: LoRA targets are "
                f"{', '.join(sorted({layer.name for layer in projections}))}."
            )
        self._enable_lora(rank, [layer for layer in projections if layer.name in names], train_head)

    def _enable_lora(self, rank, targets, train_head=True):
        """LoRA of ``rank`` on the layers ``targets`` (see ``enable_lora``); checked before anything changes."""
        if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
            raise ArgumentError("rank", rank, "a positive int", f"The LoRA rank must be a positive int, got {rank!r}.")
        widest = min(targets, key=_lora_rank_limit)
        limit = _lora_rank_limit(widest)
        if rank > limit:
            raise ArgumentError(
                "rank", rank, f"at most {limit}",
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
        self._changed()

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
            raise ArgumentError("path", path, "a file named '*.lora.h5'",
                                f"LoRA weights go to a file named '*.lora.h5', got {path!r}.")
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
    if policies and isinstance(model, Backbone):
        model._changed()


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
    """A model of ``model``'s class computing in its source precision with the effective weights of a quantized one.

    For converters that cannot take Keras' integer products (TFLite); ``model`` itself is unchanged.
    """
    config = model.get_config()
    policy = keras.dtype_policies.get(config["dtype"])
    config["dtype"] = (policy.default_policy if isinstance(policy, keras.dtype_policies.DTypePolicyMap) else policy).name
    twin = type(model).from_config(config)
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
