"""Input pipelines: sources (TFDS mock, image folder, arrays, digits) and the official pre-processing."""

import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from keras_vit.train import data


def _take(dataset, n):
    return [tuple(t.numpy() for t in batch) for batch in dataset.take(n)]


def test_digits_split_is_stratified_and_disjoint():
    train, test = data.digits("train"), data.digits("test")
    assert (train.num_examples, test.num_examples, train.num_classes) == (1437, 360, 10)
    images, labels = next(iter(test.dataset.batch(400)))
    assert images.dtype == tf.uint8 and images.shape[1:] == (8, 8, 1) and int(tf.reduce_max(images)) == 255
    assert np.bincount(labels.numpy()).min() >= 35  # every class in the test split


def test_train_pipeline_shapes_range_and_determinism():
    source = data.digits("train")
    first = _take(data.pipeline(source, 16, 32, True, seed=3), 4)
    again = _take(data.pipeline(source, 16, 32, True, seed=3), 4)
    other = _take(data.pipeline(source, 16, 32, True, seed=4), 1)
    images, labels = first[0]
    assert images.shape == (32, 16, 16, 1) and labels.shape == (32, 10)
    assert -1.0 <= images.min() and images.max() <= 1.0 and images.min() < -0.9
    np.testing.assert_array_equal(labels.sum(1), 1.0)
    for (a, b), (c, d) in zip(first, again):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    assert not np.array_equal(first[0][0], other[0][0])
    resumed = _take(data.pipeline(source, 16, 32, True, seed=3, skip_batches=2), 2)
    for (a, b), (c, d) in zip(first[2:], resumed):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)


def test_a_train_pipeline_gives_the_same_stream_every_time_it_is_iterated():
    # model.fit iterates a dataset once to look at a batch, then again to train: both must see the same stream,
    # past the end of the first pass over the data (45 batches of 32 > 1,437 examples).
    dataset = data.pipeline(data.digits("train"), 8, 32, True, seed=5)
    looked_at = _take(dataset, 1)
    trained_on = _take(dataset, 50)
    np.testing.assert_array_equal(looked_at[0][0], trained_on[0][0])
    np.testing.assert_array_equal(trained_on[46][0], _take(data.pipeline(data.digits("train"), 8, 32, True, seed=5, skip_batches=46), 1)[0][0])
    assert not np.array_equal(trained_on[0][0], trained_on[45][0])


def test_eval_pipeline_is_a_plain_resize_keeping_the_last_batch():
    images = np.arange(2 * 4 * 4 * 3, dtype="uint8").reshape(2, 4, 4, 3) * 2
    source = data.from_arrays(np.concatenate([images] * 3), [0, 1] * 3, num_classes=2)
    batches = _take(data.pipeline(source, 4, 4, False), 10)
    assert [len(b[0]) for b in batches] == [4, 2]
    np.testing.assert_allclose(batches[0][0][0], (images[0] - 127.5) / 127.5, atol=1e-6)


def test_mixup_mixes_each_batch_with_itself_rolled_by_one():
    source = data.digits("train")
    plain_images, plain_labels = _take(data.pipeline(source, 8, 16, True, seed=1), 1)[0]
    images, labels = _take(data.pipeline(source, 8, 16, True, seed=1, mixup_alpha=0.4), 1)[0]
    first = plain_labels.argmax(1)
    differs = np.flatnonzero(first != np.roll(first, 1))[0]
    weight = labels[differs, first[differs]]  # one weight per batch
    assert 0 < weight < 1
    np.testing.assert_allclose(labels, weight * plain_labels + (1 - weight) * np.roll(plain_labels, 1, axis=0), atol=1e-6)
    to_pixels = lambda x: x * 127.5 + 127.5  # noqa: E731  (mixing happens on pixels, before the [-1, 1] mapping)
    expected = weight * to_pixels(plain_images) + (1 - weight) * to_pixels(np.roll(plain_images, 1, axis=0))
    np.testing.assert_allclose(to_pixels(images), expected, atol=1e-3)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name, count in (("cat", 3), ("dog", 2)):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(count):
            size = (20 + i, 30)
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype="uint8")).save(tmp_path / "train" / name / f"{i}.png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    source = data.load_source(f"folder:{tmp_path}", "train")
    assert (source.num_classes, source.num_examples, source.class_names) == (2, 5, ["cat", "dog"])
    images, labels = _take(data.pipeline(source, 12, 5, False), 1)[0]
    assert images.shape == (5, 12, 12, 3) and sorted(labels.argmax(1).tolist()) == [0, 0, 0, 1, 1]
    again = _take(data.pipeline(data.load_source(f"folder:{tmp_path}", "train"), 12, 5, False), 1)[0]
    np.testing.assert_array_equal(again[1], labels)  # the one-off file shuffle is seeded
    train = _take(data.pipeline(source, 12, 4, True, seed=0), 2)
    assert train[0][0].shape == (4, 12, 12, 3)
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.from_folder(tmp_path / "train" / "cat")


def test_tfds_source_with_mock_data():
    with tfds.testing.mock_data(num_examples=12):
        source = data.from_tfds("cifar10", "train", download=True)
        assert source.num_classes == 10 and len(source.class_names) == 10
        images, labels = _take(data.pipeline(source, 8, 4, True, seed=0), 1)[0]
    assert images.shape == (4, 8, 8, 3) and labels.shape == (4, 10)


def test_unprepared_tfds_dataset_is_a_clear_error_without_network(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"'mnist' is not prepared in {tmp_path}.*tfds build mnist --data_dir {tmp_path}"):
        data.from_tfds("mnist", "train", data_dir=str(tmp_path))


def _image_folder(root, splits, size=(10, 12), mode="RGB"):
    """``root/<split>/<class>/<i>.png`` random images; ``splits`` maps split -> {class: count}."""
    rng = np.random.default_rng(0)
    for split, classes in splits.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (*size, 3), dtype="uint8")
                Image.fromarray(pixels).convert(mode).save(root / split / name / f"{i}.png")


def test_splits_share_the_train_class_list_and_a_missing_class_is_a_warning(tmp_path, caplog):
    from keras_vit.train import building, settings

    _image_folder(tmp_path, {"train": {"ant": 2, "bee": 2, "cat": 2}, "test": {"ant": 1, "cat": 2}})
    config = settings.load_config(
        settings.FINETUNE, None, [f"dataset=folder:{tmp_path}", "image_size=8", "batch_size=8", "channels=3"]
    )
    with caplog.at_level(logging.WARNING, logger="keras_vit"):
        logging.getLogger("keras_vit").addHandler(caplog.handler)
        try:
            prepared = building.prepare_data(config, channels=3)
            train, eval_dataset = prepared.train, prepared.eval_dataset
        finally:
            logging.getLogger("keras_vit").removeHandler(caplog.handler)
    assert train.class_names == ["ant", "bee", "cat"] and train.num_classes == 3
    labels = np.concatenate([y for _, y in eval_dataset.as_numpy_iterator()])
    assert labels.shape == (3, 3)  # one-hot over the train split's three classes
    assert sorted(labels.argmax(1).tolist()) == [0, 2, 2]  # "cat" keeps label 2 although "bee" is absent
    assert "has no images of class(es) 'bee'" in caplog.text
    extra = data.load_source(f"folder:{tmp_path}", "test", classes=["ant", "cat"])  # a shared classes= list
    assert extra.num_classes == 2
    (tmp_path / "test" / "dog").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), "uint8")).save(tmp_path / "test" / "dog" / "0.png")
    with pytest.raises(data.ClassListError) as refused:
        data.from_folder(tmp_path / "test", classes=train.class_names)
    assert (refused.value.unknown, refused.value.class_names) == (["dog"], ["ant", "bee", "cat"])


def test_folder_channels_one_decodes_grayscale(tmp_path):
    _image_folder(tmp_path, {"train": {"a": 2}})
    gray = _take(data.from_folder(tmp_path / "train", channels=1).dataset, 2)
    rgb = _take(data.from_folder(tmp_path / "train", channels=3).dataset, 2)
    for (image, _), (colour, _) in zip(gray, rgb):
        assert image.shape == (10, 12, 1)
        luma = colour.astype(float) @ [0.299, 0.587, 0.114]  # ITU-R 601 luma, as PIL and libpng
        np.testing.assert_allclose(image[..., 0], luma, atol=1.01)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        data.from_folder(tmp_path / "train", channels=4)


def _warnings_of(caplog, call):
    """``call()``'s result, the keras_vit warnings it logged gathered in ``caplog``."""
    with caplog.at_level(logging.WARNING, logger="keras_vit"):
        logging.getLogger("keras_vit").addHandler(caplog.handler)
        try:
            return call()
        finally:
            logging.getLogger("keras_vit").removeHandler(caplog.handler)


def test_a_file_that_is_not_an_image_is_named_or_skipped_with_a_count(tmp_path, caplog):
    _image_folder(tmp_path, {"train": {"a": 2, "b": 1}})
    (tmp_path / "train" / "b" / "saved_page.jpg").write_text("<html>not an image</html>")
    (tmp_path / "train" / "a" / "empty.png").write_bytes(b"")
    with pytest.raises(data.UndecodableImagesError) as refused:
        data.from_folder(tmp_path / "train")
    assert sorted(path.name for path, _ in refused.value.files) == ["empty.png", "saved_page.jpg"]
    assert refused.value.files[0][1] == data.undecodable_reason(refused.value.files[0][0])
    source = _warnings_of(caplog, lambda: data.from_folder(tmp_path / "train", skip_undecodable=True))
    assert source.num_examples == 3 and len(_take(source.dataset, 10)) == 3  # every kept file decodes
    assert "Skipped 2 file(s)" in caplog.text


def _encoded(pixels, format, **options):
    import io

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format, **options)
    return buffer.getvalue()


def test_a_truncated_jpeg_or_png_is_named_or_skipped(tmp_path, caplog):
    """Their first bytes are right: they used to pass the listing and kill training at the first step, naming no file."""
    _image_folder(tmp_path, {"train": {"a": 2, "b": 2}})
    pixels = np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype="uint8")
    for name, format in (("a/cut.jpg", "JPEG"), ("b/cut.png", "PNG")):
        encoded = _encoded(pixels, format)
        (tmp_path / "train" / name).write_bytes(encoded[: len(encoded) * 2 // 3])
    with pytest.raises(data.UndecodableImagesError) as refused:
        data.from_folder(tmp_path / "train")
    assert sorted(str(path.relative_to(tmp_path / "train")) for path, _ in refused.value.files) == ["a/cut.jpg", "b/cut.png"]
    source = _warnings_of(caplog, lambda: data.from_folder(tmp_path / "train", skip_undecodable=True))
    assert "Skipped 2 file(s)" in caplog.text and "cut.jpg is a truncated or corrupt JPEG file" in caplog.text
    batches = list(data.pipeline(source, 8, 2, False).as_numpy_iterator())  # one pass: every kept file decodes
    assert source.num_examples == 4 and sum(len(labels) for _, labels in batches) == 4


def test_a_jpeg_with_data_after_its_end_is_kept(tmp_path):
    """Motion photos append a video after the JPEG's end: the file does not end as a JPEG does, yet decodes."""
    pixels = np.random.default_rng(2).integers(0, 255, (16, 16, 3), dtype="uint8")
    (tmp_path / "a").mkdir()
    encoded = _encoded(pixels, "JPEG", quality=95)
    (tmp_path / "a" / "motion.jpg").write_bytes(encoded + b"ftypmp42" + bytes(300))
    source = data.from_folder(tmp_path)
    (image, _), = _take(source.dataset, 1)
    np.testing.assert_array_equal(image, tf.io.decode_jpeg(encoded).numpy())


def test_a_file_corrupt_inside_is_dropped_by_the_pipeline_with_skip_undecodable(tmp_path):
    _image_folder(tmp_path, {"train": {"a": 3}})
    (tmp_path / "train" / "a" / "inside.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200) + b"\xff\xd9")  # whole, not a JPEG
    assert data.undecodable_reason(tmp_path / "train" / "a" / "inside.jpg") is None  # the listing cannot tell
    with pytest.raises(tf.errors.InvalidArgumentError):
        _take(data.from_folder(tmp_path / "train").dataset, 4)
    source = data.from_folder(tmp_path / "train", skip_undecodable=True)
    assert len(_take(source.dataset, 4)) == 3


def test_hidden_entries_and_macos_zip_metadata_are_not_data(tmp_path, caplog):
    _image_folder(tmp_path, {"train": {"cat": 2, "dog": 1}})
    for folder in ("__MACOSX/cat", ".thumbnails", "cat/.cache"):
        (tmp_path / "train" / folder).mkdir(parents=True)
        (tmp_path / "train" / folder / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "train" / "cat" / "._1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    source = _warnings_of(caplog, lambda: data.from_folder(tmp_path / "train"))
    assert source.class_names == ["cat", "dog"] and source.num_examples == 3 and caplog.text == ""


def test_every_format_tensorflow_decodes_is_read_and_the_rest_named(tmp_path, caplog):
    rng = np.random.default_rng(3)
    pixels = {name: rng.integers(0, 255, (12, 10, 3), dtype="uint8") for name in ("png", "bmp", "gif", "webp", "jpg")}
    expected = {}
    for name, format, options in (("png", "PNG", {}), ("bmp", "BMP", {}), ("gif", "GIF", {}), ("webp", "WEBP", {"lossless": True}), ("jpg", "JPEG", {})):
        encoded = _encoded(pixels[name], format, **options)
        (tmp_path / name).mkdir()
        (tmp_path / name / f"0.{name}").write_bytes(encoded)
        import io

        expected[name] = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))  # PIL's decode: the reference
    (tmp_path / "png" / "scan.tiff").write_bytes(_encoded(pixels["png"], "TIFF"))
    (tmp_path / "png" / "notes.txt").write_text("labels")
    source = _warnings_of(caplog, lambda: data.from_folder(tmp_path, seed=0))
    assert source.class_names == ["bmp", "gif", "jpg", "png", "webp"] and source.num_examples == 5
    assert "Left out 2 file(s)" in caplog.text and "(extensions .tiff, .txt)" in caplog.text
    for channels in (3, 1):
        decoded = {source.class_names[label]: image for image, label in _take(data.from_folder(tmp_path, channels=channels).dataset, 5)}
        for name, image in decoded.items():
            reference = expected[name].astype(float)
            if channels == 1:
                reference = reference @ [0.299, 0.587, 0.114]  # ITU-R 601 luma
            tolerance = 4.01 if name == "jpg" else (1.01 if channels == 1 else 0)  # chroma upsampling differs; luma rounding
            assert image.shape == (12, 10, channels), name
            np.testing.assert_allclose(image.reshape(reference.shape), reference, atol=tolerance, err_msg=name)


def test_a_broken_symbolic_link_is_named_or_skipped(tmp_path, caplog):
    _image_folder(tmp_path, {"train": {"a": 2}})
    (tmp_path / "train" / "a" / "moved.png").symlink_to(tmp_path / "elsewhere" / "moved.png")
    with pytest.raises(data.UndecodableImagesError) as refused:
        data.from_folder(tmp_path / "train")
    assert [path.name for path, _ in refused.value.files] == ["moved.png"]
    source = _warnings_of(caplog, lambda: data.from_folder(tmp_path / "train", skip_undecodable=True))
    assert source.num_examples == 2 and "moved.png is a broken symbolic link" in caplog.text


# --- arrays and class lists that would give other pixels or labels than the user meant -------------------------

_PIXELS = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 1))


@pytest.mark.parametrize("images, labels, num_classes, name", [
    (_PIXELS / 255.0, [0, 1], 2, "images"),  # floats in [0, 1]: rounded to black before
    (_PIXELS / 127.5 - 1, [0, 1], 2, "images"),  # [-1, 1]
    (_PIXELS.astype("uint16") * 257, [0, 1], 2, "images"),  # 16-bit
    (np.full((2, 4, 4, 1), np.nan), [0, 1], 2, "images"),
    (_PIXELS, [-1, 0], 3, "labels"),
    (_PIXELS, [5, 0], 3, "labels"),
    (_PIXELS, [1.7, 0], 3, "labels"),  # truncated to 1 before
    (_PIXELS, [0, 1], 0, "num_classes"),
])
def test_from_arrays_refuses_what_would_become_other_pixels_or_labels(images, labels, num_classes, name):
    with pytest.raises(data.ArraysError) as refused:
        data.from_arrays(images, labels, num_classes)
    assert refused.value.name == name


def test_from_arrays_takes_pixels_of_any_number_type_and_whole_float_labels():
    source = data.from_arrays(np.full((2, 4, 4, 1), 200.4), np.array([1.0, 0.0]), 2, class_names=["a", "b"])
    images, labels = next(iter(source.dataset.batch(2)))
    assert images.dtype == tf.uint8 and int(tf.reduce_min(images)) == int(tf.reduce_max(images)) == 200
    assert labels.numpy().tolist() == [1, 0] and (source.num_classes, source.num_examples) == (2, 2)
    assert data.from_arrays(_PIXELS.astype("int64"), [0, 2]).num_classes == 3
    with pytest.raises(data.ArraysError) as refused:
        data.from_arrays(_PIXELS, [0, 1], 2, class_names=["a"])
    assert (refused.value.name, refused.value.expected) == ("class_names", "2 (num_classes)")


def test_a_class_listed_twice_is_refused(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), "uint8")).save(tmp_path / name / "0.png")
    with pytest.raises(data.ClassListError) as refused:
        data.from_folder(tmp_path, classes=["cat", "dog", "cat"])  # the cats got labels 0 and 2
    assert (refused.value.repeated, refused.value.unknown, refused.value.root) == (["cat"], [], tmp_path)


def test_data_error_messages_name_the_files_and_the_way_out():
    # the one message-text test of each folder error; the other tests read their fields
    assert str(data.ClassListError("r", ["a", "a"], repeated=["a"])) == (
        "The class list ['a', 'a'] names ['a'] more than once: each class is one label; list it once.")
    assert str(data.ClassListError("r", ["a"], unknown=["b"])) == (
        "r has class folders that are not in the class list ['a']: ['b']. Add them to classes= (in the train split "
        "too), or move them out.")
    assert str(data.UndecodableImagesError([("r/a.png", "is not an image"), ("r/b.png", "is cut")])) == (
        "r/a.png is not an image; 1 more file(s) cannot be decoded either. Remove or replace such files, or pass "
        "skip_undecodable=True to leave them out.")
