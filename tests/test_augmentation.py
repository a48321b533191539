"""The training pipeline's RandAugment branch (``randaugment=[num_ops, magnitude]``) on pixels in [0, 255]."""

import numpy as np
import pytest

from keras_vit.train import data


def _batches(source, randaugment, count=2):
    dataset = data.pipeline(source, 16, 32, True, seed=2, randaugment=randaugment, crop_area=None, flip=False, cache=False)
    return [tuple(t.numpy() for t in batch) for batch in dataset.take(count)]


@pytest.mark.parametrize("channels", [3, 1])
def test_randaugment_changes_the_images_not_the_labels_and_keeps_their_range(channels):
    rng = np.random.default_rng(0)
    source = data.from_arrays(rng.integers(0, 256, (96, 16, 16, channels)), rng.integers(0, 5, 96), 5)
    plain = _batches(source, None)
    augmented = _batches(source, [2, 10])
    untouched = _batches(source, [0, 10])  # no operation drawn: the branch itself changes nothing
    for (x, y), (a, b), (u, v) in zip(plain, augmented, untouched):
        np.testing.assert_array_equal(u, x)
        np.testing.assert_array_equal(v, y)
        np.testing.assert_array_equal(b, y)
        assert a.shape == x.shape and a.dtype == np.float32
        assert -1.0 <= a.min() and a.max() <= 1.0
        changed = np.mean([not np.allclose(a[i], x[i], atol=1e-3) for i in range(len(a))])
        assert changed > 0.5, changed
        # pixels were augmented on the [0, 255] scale they are in: the overall brightness stays in its range
        assert abs(a.mean() - x.mean()) < 0.5, (a.mean(), x.mean())


def test_a_magnitude_keras_cannot_apply_is_refused():
    source = data.from_arrays(np.zeros((4, 8, 8, 3)), np.zeros(4), 2)
    with pytest.raises(ValueError) as raised:
        data.pipeline(source, 8, 2, True, randaugment=[2, 15])
    assert "15" in str(raised.value) and "10" in str(raised.value)
