"""Checks of a checkpoint's content before it reaches a model: its arrays agree with each other, and are finite.

* ``check_consistent``: the arrays of a ViT checkpoint share its dimensions
  (hidden size, MLP size, heads, head size, representation size, classes);
  an array that disagrees with the others is named, with the shape the
  others call for. Works on shapes alone, before anything is allocated.
* ``check_finite``: NaN or infinite values make every output NaN; refused
  unless the caller allows them.

Names are the canonical official ones (``keras_vit.pretrained.names``).
"""

import collections

import numpy as np

from keras_vit.pretrained.names import BLOCK_KEY, POSEMB, normalize_names
from keras_vit.pretrained.npz import stand_ins

_D, _M, _H, _K, _R, _N = "hidden size", "MLP size", "heads", "head size", "representation size", "classes"
_DIMENSIONS = (_D, _M, _H, _K, _R, _N)
_BLOCK_LAYOUTS = {
    "LayerNorm_0/scale": (_D,), "LayerNorm_0/bias": (_D,), "LayerNorm_2/scale": (_D,), "LayerNorm_2/bias": (_D,),
    "MlpBlock_3/Dense_0/kernel": (_D, _M), "MlpBlock_3/Dense_0/bias": (_M,),
    "MlpBlock_3/Dense_1/kernel": (_M, _D), "MlpBlock_3/Dense_1/bias": (_D,),
    "MultiHeadDotProductAttention_1/out/kernel": (_H, _K, _D), "MultiHeadDotProductAttention_1/out/bias": (_D,),
    **{f"MultiHeadDotProductAttention_1/{part}/kernel": (_D, _H, _K) for part in ("query", "key", "value")},
    **{f"MultiHeadDotProductAttention_1/{part}/bias": (_H, _K) for part in ("query", "key", "value")},
}
_LAYOUTS = {
    "embedding/kernel": (None, None, None, _D), "embedding/bias": (_D,), "cls": (1, 1, _D), POSEMB: (1, None, _D),
    "Transformer/encoder_norm/scale": (_D,), "Transformer/encoder_norm/bias": (_D,),
    "pre_logits/kernel": (_D, _R), "pre_logits/bias": (_R,), "head/bias": (_N,),
}
_LISTED = 3


def _layout(name, has_pre_logits):
    """The shape of official array ``name`` in dimension names (ints: fixed sizes, None: free), or None if unknown."""
    block = BLOCK_KEY.match(name)
    if block:
        return _BLOCK_LAYOUTS.get(f"{block[2]}/{block[3]}")
    if name == "head/kernel":
        return (_R if has_pre_logits else _D, _N)
    return _LAYOUTS.get(name)


def check_consistent(shapes, label):
    """Refuses (``ValueError``) official arrays ``{name: shape}`` that disagree on the ViT's dimensions.

    Each dimension (hidden size, MLP size, ...) takes the value most arrays
    give it; an array whose shape differs from what those values call for
    is named in one line. Arrays of unknown names (ResNet stems, optimizer
    state, other layouts) are not checked.
    """
    shapes = {name: tuple(array.shape) for name, array in normalize_names(stand_ins(shapes)).items()}
    has_pre_logits = "pre_logits/kernel" in shapes
    layouts = {name: _layout(name, has_pre_logits) for name in shapes}
    votes = collections.defaultdict(collections.Counter)
    for name, layout in layouts.items():
        if layout is not None and len(layout) == len(shapes[name]):
            for dimension, size in zip(layout, shapes[name]):
                if isinstance(dimension, str):
                    votes[dimension][size] += 1
    agreed = {dimension: counts.most_common(1)[0][0] for dimension, counts in votes.items()}

    def expected(name):
        layout = layouts[name]
        actual = shapes[name] if len(shapes[name]) == len(layout) else ("?",) * len(layout)
        return tuple(agreed.get(d, "?") if isinstance(d, str) else (a if d is None else d) for d, a in zip(layout, actual))

    wrong = sorted(name for name, layout in layouts.items() if layout is not None and expected(name) != shapes[name])
    if not wrong:
        return
    involved = {d for name in wrong for d in layouts[name]}
    described = " and ".join(f"{d} {agreed[d]}" for d in _DIMENSIONS if d in involved and d in agreed) or "its layout"
    listed = "; ".join(f"{name!r} shaped {expected(name)} (it is {shapes[name]})" for name in wrong[:_LISTED])
    more = f" (and {len(wrong) - _LISTED} more)" if len(wrong) > _LISTED else ""
    raise ValueError(
        f"{label}: its arrays disagree with each other: the others describe a ViT with {described}, which needs "
        f"{listed}{more}. The file was damaged or edited: export or download it again."
    )


def _nonfinite_count(array):
    """How many values of a checkpoint array are NaN or infinite (bfloat16 bit patterns included)."""
    if array.dtype.itemsize == 2 and array.dtype.kind in "Vu":  # bfloat16: exponent bits all ones
        return int(np.count_nonzero((np.ascontiguousarray(array).view(np.uint16) & 0x7F80) == 0x7F80))
    if array.dtype.kind not in "fc":
        return 0
    if np.isfinite(np.sum(array, dtype=np.float32 if array.dtype.itemsize < 4 else array.dtype)):
        return 0  # a finite sum has no NaN or infinity in it (the exact count runs only when it is not)
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def check_finite(arrays, label):
    """Refuses (``ValueError``) ``{name: array}`` with NaN or infinite values, naming the arrays that hold them."""
    bad = {name: count for name, count in ((n, _nonfinite_count(a)) for n, a in arrays.items()) if count}
    if not bad:
        return
    listed = ", ".join(f"{name!r} ({count} of {np.size(arrays[name])} values)" for name, count in list(bad.items())[:_LISTED])
    more = f" and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
    raise ValueError(
        f"{label}: {len(bad)} array(s) hold NaN or infinite values: {listed}{more}; a model loaded with them outputs "
        "NaN. The file is damaged or comes from a diverged run: use another checkpoint, or load it anyway with "
        "keras_vit.load_weights(model, path, allow_nonfinite=True)."
    )
