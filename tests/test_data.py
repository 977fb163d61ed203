"""Embedded data sets, user data sets and latent encoding (offline)."""

import numpy as np
import pytest
import torch
from helpers import tiny_vae
from PIL import Image

from dp_diffusers.data import (
    DataError,
    check_resolution,
    dataset_latents,
    dataset_to_tensors,
    encode_latents,
    label_names,
    load_image_dataset,
    load_private_digits,
    load_public_digits,
    make_canaries,
    resolve_columns,
    uci_preprocessing,
)


def test_public_digits_are_mnist_5k():
    ds = load_public_digits()
    assert len(ds) == 5000
    assert label_names(ds, "label") == [str(i) for i in range(10)]
    assert np.bincount(ds["label"]).tolist() == [500] * 10
    img = ds[0]["image"]
    assert img.size == (28, 28) and img.mode == "L"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.max() > 200 and arr.min() == 0


def test_uci_preprocessing_scales_the_bounding_box_into_8x8_counts_keeping_the_aspect():
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[0, 4:24, 10:20] = 255  # a 20x10 bar: fills the height, half the width, centred
    images[1, 2:4, 3:5] = 200  # a tiny square: scaled up to the whole box
    out = uci_preprocessing(images)  # images[2] is empty: stays empty
    assert out.shape == (3, 8, 8)
    assert np.array_equal(out[0][:, 2:6], np.full((8, 4), 255.0)) and out[0][:, [0, 1, 6, 7]].max() == 0
    assert np.array_equal(out[1], np.full((8, 8), 255.0))
    assert not out[2].any()
    values = np.unique(uci_preprocessing(load_public_digits().with_format("numpy")[:64]["image"]))
    assert set(values) <= set(np.rint(np.arange(17) * 255 / 16))  # 0..16 on-pixel counts, scaled like the UCI digits
    assert {0.0, 255.0} <= set(values)


def test_public_digits_8x8_are_the_public_digits_in_the_private_format():
    public, in_8x8 = load_public_digits(), load_image_dataset("public-digits-8x8")
    assert len(in_8x8) == 5000 and in_8x8["label"] == public["label"]
    assert in_8x8[0]["image"].size == load_private_digits("train")[0]["image"].size == (8, 8)
    boxes = np.stack([np.asarray(image) for image in in_8x8.select(range(100))["image"]]) > 0
    assert (boxes.any(axis=1).all(axis=1) | boxes.any(axis=2).all(axis=1)).all()  # the long side spans the box


def test_private_digits_split_is_fixed_disjoint_and_stratified():
    train, test = load_private_digits("train"), load_private_digits("test")
    assert len(train) + len(test) == 1797
    assert len(test) == 360
    to_bytes = lambda ds: {np.asarray(x).tobytes() + bytes([y]) for x, y in zip(ds["image"], ds["label"])}  # noqa: E731
    train_set, test_set = to_bytes(train), to_bytes(test)
    assert not (train_set & test_set) or len(train_set & test_set) < 5  # a few duplicate digits exist in UCI
    assert to_bytes(load_private_digits("train")) == train_set  # same split every time
    counts = np.bincount(test["label"])
    assert counts.min() >= 34 and counts.max() <= 38
    assert train[0]["image"].size == (8, 8)
    with pytest.raises(ValueError, match="split"):
        load_private_digits("validation")


def test_the_tuning_set_is_carved_from_the_train_split_and_never_holds_a_held_out_image():
    to_bytes = lambda ds: sorted(np.asarray(x).tobytes() + bytes([y]) for x, y in zip(ds["image"], ds["label"]))  # noqa: E731
    train, test = to_bytes(load_private_digits("train")), to_bytes(load_private_digits("test"))
    tuning, validation = (to_bytes(load_image_dataset("private-digits-tuning", split=s)) for s in ("train", "test"))
    assert (len(tuning), len(validation)) == (1149, 288)
    assert sorted(tuning + validation) == train  # exactly the train split's images, split in two
    assert len(set(validation) & set(test)) < 5  # as between train and test: the few duplicate UCI digits


@pytest.mark.parametrize("channels", [1, 3])
def test_tensors_are_resized_and_scaled(channels):
    pixels, labels = dataset_to_tensors(load_private_digits("test"), 16, channels)
    assert pixels.shape == (360, channels, 16, 16)
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.max() > 0.9 and pixels.min() < -0.99
    assert labels.dtype == torch.long and set(labels.tolist()) == set(range(10))


def test_labels_map_by_name_onto_model_classes():
    _, labels = dataset_to_tensors(load_private_digits("test"), 8, 1, class_names=[str(i) for i in reversed(range(10))])
    _, plain = dataset_to_tensors(load_private_digits("test"), 8, 1)
    assert torch.equal(labels, 9 - plain)
    with pytest.raises(DataError, match=r"288 of 360 rows \(rows 1, 2, 3, 4, 5, \.\.\. \(288 in all\)\) have labels "
                       "that are not among the model's 2 classes"):  # counts and rows: never a label
        dataset_to_tensors(load_private_digits("test"), 8, 1, class_names=["0", "1"])


def make_folder(root, n_per_class=3, size=12, mode="L"):
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(np.full((size, size), 40 * i, np.uint8)).convert(mode).save(root / cls / f"{i}.png")
    return root


def test_imagefolder_with_labels(tmp_path):
    ds = load_image_dataset(train_data_dir=str(make_folder(tmp_path / "data")))
    image_column, label_column = resolve_columns(ds)
    assert (image_column, label_column) == ("image", "label")
    assert label_names(ds, label_column) == ["cat", "dog"]
    pixels, labels = dataset_to_tensors(ds, 16, 3, image_column, label_column)
    assert pixels.shape == (6, 3, 16, 16) and labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image_dataset(train_data_dir=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        load_image_dataset(train_data_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="exactly one"):
        load_image_dataset()
    ds = load_private_digits("test")
    with pytest.raises(DataError, match="columns"):
        resolve_columns(ds, image_column="pixels")
    with pytest.raises(DataError, match="columns"):
        resolve_columns(ds, label_column="class")
    corrupt = make_folder(tmp_path / "corrupt")
    (corrupt / "cat" / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="cannot be read"):
        dataset_to_tensors(load_image_dataset(train_data_dir=str(corrupt)), 16, 1)


def test_canaries_are_reproducible_distinct_and_split_in_two():
    inserted_x, inserted_y, heldout_x, heldout_y = make_canaries(32, 3, 16, 10, seed=7)

    assert inserted_x.shape == heldout_x.shape == (32, 3, 16, 16) and inserted_y.shape == heldout_y.shape == (32,)
    assert set(torch.cat([inserted_x, heldout_x]).unique().tolist()) == {-1.0, 1.0}
    assert 0 <= min(inserted_y.min(), heldout_y.min()) and max(inserted_y.max(), heldout_y.max()) < 10
    everything = torch.cat([inserted_x, heldout_x]).flatten(1)
    assert len(everything.unique(dim=0)) == 64  # no canary repeats another, across the halves included
    again = make_canaries(32, 3, 16, 10, seed=7)  # what the evaluation rebuilds from the run's record
    assert all(torch.equal(a, b) for a, b in zip((inserted_x, inserted_y, heldout_x, heldout_y), again))
    assert not torch.equal(make_canaries(32, 3, 16, 10, seed=8)[0], inserted_x)
    with pytest.raises(ValueError, match="num_canaries"):
        make_canaries(0, 1, 16, 10, seed=0)


def test_resolution_must_divide_by_vae_factor():
    vae = tiny_vae()
    check_resolution(16, vae)
    with pytest.raises(DataError, match="divisible by the autoencoder's downsampling factor 2"):
        check_resolution(15, vae)


def test_latents_are_streamed_in_batches_equal_the_whole_set_encoding_and_are_cached(tmp_path, monkeypatch):
    import numpy as np

    from dp_diffusers.data import encoding  # where dataset_latents reads its batches of pixels

    vae = tiny_vae().eval()
    dataset = load_private_digits("test").select(range(10))
    pixels, _ = dataset_to_tensors(dataset, 16, 1)
    latents = encode_latents(vae, pixels)
    assert latents.shape == (10, 3, 8, 8)
    seen = []  # the pixels that ever exist at once
    real = encoding.pixel_batches

    def counted(*args, **kwargs):
        for batch in real(*args, **kwargs):
            seen.append(len(batch))
            yield batch

    monkeypatch.setattr(encoding, "pixel_batches", counted)
    streamed = dataset_latents(dataset, vae, 16, batch_size=4)
    assert seen == [4, 4, 2]  # never more than one batch of pixels
    torch.testing.assert_close(streamed, latents)
    cached = dataset_latents(dataset, vae, 16, cache_dir=str(tmp_path), batch_size=4)
    torch.testing.assert_close(cached, latents)
    files = list(tmp_path.glob("latents-*.npy"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp*"))
    np.save(files[0], np.zeros(latents.shape, dtype=np.float32))  # a second call must read the cache, not re-encode
    assert torch.equal(dataset_latents(dataset, vae, 16, cache_dir=str(tmp_path)), torch.zeros_like(latents))
    other = tiny_vae().eval()
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(0.1)  # another autoencoder: another key, encoded anew
    torch.testing.assert_close(dataset_latents(dataset, other, 16, cache_dir=str(tmp_path)),
                               encode_latents(other, pixels))  # fmt: skip
    assert len(list(tmp_path.glob("latents-*.npy"))) == 2


def test_concurrent_cache_writers_do_not_collide(tmp_path, monkeypatch):
    """Two ranks writing the same cache: each uses its own temporary file, the result is complete."""
    import os

    import numpy as np

    vae = tiny_vae().eval()
    dataset = load_private_digits("test").select(range(4))
    written = []
    real_header = np.lib.format.write_array_header_2_0

    def recording_header(file, header):  # each cache file a writer starts
        written.append(file.name)
        return real_header(file, header)

    monkeypatch.setattr(np.lib.format, "write_array_header_2_0", recording_header)
    for pid in (1001, 1002):  # what two processes would do
        monkeypatch.setattr(os, "getpid", lambda pid=pid: pid)
        dataset_latents(dataset, vae, 16, cache_dir=str(tmp_path))
        for done in tmp_path.glob("latents-*.npy"):  # so that the next "process" writes too
            done.unlink()
    assert len(set(written)) == 2 and all(".tmp" in name for name in written)
    assert not list(tmp_path.glob("*.tmp*"))


def test_an_unreadable_image_fails_streamed_encoding_with_its_index(tmp_path):
    folder = tmp_path / "data" / "a"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="Image 3 of the data set cannot be read"):
        dataset_latents(load_image_dataset(train_data_dir=str(tmp_path / "data")), tiny_vae().eval(), 16)
