"""Tests of ensemble_kd.data: loaders, splits, validation messages, augmentation, image folders."""
from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import UPRIGHT, write_sideways
from PIL import Image
from sklearn.datasets import load_digits

from ensemble_kd import imagefolder
from ensemble_kd.config import DataConfig
from ensemble_kd.data import DataError, augment_batch, channel_stats, load_data, planted_groups, validate_split

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keep extracted archives and decoded tensors out of ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ENSEMBLE_KD_CACHE", str(cache))
    return cache


def _row_counter(*xs: torch.Tensor) -> Counter:
    return Counter(row.numpy().tobytes() for x in xs for row in x.flatten(1))


# ---------------------------------------------------------------- digits

def test_digits_shapes_splits_and_partition():
    s = load_data(DataConfig(name="digits", val_fraction=0.15), seed=0)
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10 and s.name == "digits"
    assert s.class_names == [str(d) for d in range(10)]
    assert len(s.y_test) == 450  # ceil(0.25 * 1797)
    assert len(s.y_val) == 203 and len(s.y_train) == 1144  # ceil(0.15 * 1347), the rest
    for x, y in ((s.x_train, s.y_train), (s.x_val, s.y_val), (s.x_test, s.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and len(x) == len(y)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # train, val and test together are exactly the original images (a partition, duplicates included)
    original = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)
    assert _row_counter(s.x_train, s.x_val, s.x_test) == _row_counter(original)


def test_digits_deterministic_and_test_set_fixed_across_seeds():
    a = load_data(DataConfig(name="digits"), seed=0)
    b = load_data(DataConfig(name="digits"), seed=0)
    c = load_data(DataConfig(name="digits"), seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    assert torch.equal(a.x_test, c.x_test) and torch.equal(a.y_test, c.y_test)
    assert not torch.equal(a.x_val, c.x_val)
    assert a.fingerprint() == c.fingerprint()  # same data set, another split of train/val
    assert len(a.fingerprint()) == 16


def test_digits_val_is_stratified():
    s = load_data(DataConfig(name="digits", val_fraction=0.2), seed=3)
    train_counts = torch.bincount(s.y_train, minlength=10)
    val_counts = torch.bincount(s.y_val, minlength=10)
    expected = 0.2 * (train_counts + val_counts).double()
    assert torch.all((val_counts.double() - expected).abs() <= 1.0)


def test_digits_mean_std_match_x_train():
    s = load_data(DataConfig(name="digits"), seed=0)
    assert s.mean == pytest.approx([float(s.x_train.mean())], abs=1e-6)
    assert s.std == pytest.approx([float(s.x_train.std(unbiased=False))], abs=1e-6)


def test_train_limit_subsamples_stratified_and_rejects_too_small():
    s = load_data(DataConfig(name="digits", train_limit=200, val_fraction=0.25), seed=0)
    assert len(s.y_train) + len(s.y_val) == 200 and len(s.y_val) == 50
    assert torch.all(torch.bincount(torch.cat([s.y_train, s.y_val]), minlength=10) >= 19)
    with pytest.raises(DataError, match="data.train_limit = 5"):
        load_data(DataConfig(name="digits", train_limit=5), seed=0)


def test_unknown_data_set_name():
    with pytest.raises(DataError, match="choose from"):
        load_data(DataConfig(name="imagenet"), seed=0)


def test_channel_stats_by_hand():
    flat = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    mean, std = channel_stats(flat)
    assert mean == pytest.approx([1.0, 2.0]) and std == pytest.approx([1.0, 1.0])
    images = torch.tensor([[[[0.0, 0.0]], [[1.0, 1.0]]], [[[1.0, 1.0]], [[1.0, 1.0]]]])  # (2, 2, 1, 2)
    mean, std = channel_stats(images)
    assert mean == pytest.approx([0.5, 1.0]) and std == pytest.approx([0.5, 1e-6])  # constant channel clamped


# ---------------------------------------------------------------- synthetic

def test_synthetic_deterministic_shapes_and_groups():
    cfg = DataConfig(name="synthetic", synthetic_classes=12, synthetic_groups=3, synthetic_per_class=40,
                     synthetic_dim=16)
    a, b, c = load_data(cfg, 0), load_data(cfg, 0), load_data(cfg, 1)
    assert a.input_shape == (16,) and a.num_classes == 12 and len(a.mean) == 16 and len(a.std) == 16
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_val, b.x_val)
    assert not torch.equal(a.x_train, c.x_train) and torch.equal(a.x_test, c.x_test)
    assert torch.all(torch.bincount(torch.cat([a.y_train, a.y_val])) == 40)
    assert torch.all(torch.bincount(a.y_test) == 20)
    assert planted_groups(cfg) == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def test_synthetic_classes_confuse_only_within_their_group():
    cfg = DataConfig(name="synthetic")
    s = load_data(cfg, 0)
    group_of = torch.zeros(s.num_classes, dtype=torch.long)
    for g, members in enumerate(planted_groups(cfg)):
        group_of[members] = g
    centroids = torch.stack([s.x_train[s.y_train == c].mean(0) for c in range(s.num_classes)])
    predicted = torch.cdist(s.x_test, centroids).argmin(1)
    accuracy = float((predicted == s.y_test).float().mean())
    assert 0.5 < accuracy < 0.99  # well above chance (1/12), yet classes do overlap
    wrong = predicted != s.y_test
    assert wrong.sum() > 0 and torch.all(group_of[predicted[wrong]] == group_of[s.y_test[wrong]])


def test_planted_groups_rejects_more_groups_than_classes():
    with pytest.raises(DataError, match="synthetic_groups"):
        planted_groups(DataConfig(synthetic_classes=2, synthetic_groups=3))


# ---------------------------------------------------------------- validate_split

def _x(n=4):
    return torch.rand(n, 1, 2, 2)


@pytest.mark.parametrize("labels, pattern", [
    ([0, 1, 5, 7], r"in \[0, 3\); found 2 labels outside, e\.g\. 5 at index 2"),
    ([0, -1, 2, 1], r"found 1 label outside, e\.g\. -1 at index 1"),
])
def test_validate_split_labels_out_of_range(labels, pattern):
    with pytest.raises(DataError, match=pattern):
        validate_split(_x(), torch.tensor(labels), 3, "test")


def test_validate_split_float_labels():
    with pytest.raises(DataError, match=r"dtype torch.float32.*\.long\(\)"):
        validate_split(_x(), torch.tensor([0.0, 1.0, 2.0, 1.0]), 3, "train")


def test_validate_split_nan_pixels_counted():
    x = _x()
    x[2, 0, 0, 0] = float("nan")
    x[3, 0, 1, 1] = float("inf")
    with pytest.raises(DataError, match=r"val inputs contain 2 NaN or infinite values \(first in example 2\)"):
        validate_split(x, torch.tensor([0, 1, 2, 1]), 3, "val")


def test_validate_split_empty_class_named():
    with pytest.raises(DataError, match=r"class 'bird' has no training examples \(1 class empty: 'bird'\)"):
        validate_split(_x(), torch.tensor([0, 0, 2, 2]), 3, "train", class_names=["cat", "bird", "dog"])
    validate_split(_x(), torch.tensor([0, 0, 2, 2]), 3, "test")  # a test set may lack a class


def test_validate_split_length_mismatch_and_ndim():
    with pytest.raises(DataError, match="4 inputs but 3 labels"):
        validate_split(_x(), torch.tensor([0, 1, 2]), 3, "train")
    with pytest.raises(DataError, match=r"shape \(4, 2, 2\)"):
        validate_split(torch.rand(4, 2, 2), torch.tensor([0, 1, 2, 1]), 3, "train")


# ---------------------------------------------------------------- augment_batch

def test_augment_flip_gives_identity_or_mirror():
    x = torch.rand(64, 3, 5, 6)
    before = x.clone()
    out = augment_batch(x, flip=True, crop_pad=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, before) and out.shape == x.shape
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(a != b for a, b in zip(same, mirrored))  # each image exactly one of the two
    assert any(same) and any(mirrored)


def test_augment_crop_is_shifted_window_of_padded_image():
    pad = 2
    x = torch.rand(32, 2, 4, 5) + 0.5  # no zeros inside, so padding is recognisable
    before = x.clone()
    out = augment_batch(x, flip=False, crop_pad=pad, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, before) and out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    all_offsets = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    offsets = []
    for i in range(len(x)):
        matches = [(dy, dx) for dy, dx in all_offsets
                   if torch.equal(out[i], padded[i, :, dy:dy + 4, dx:dx + 5])]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) > 1 and any(dy != dx for dy, dx in offsets)  # rows and columns drawn apart


def test_augment_crop_by_hand():
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    out = augment_batch(x, flip=False, crop_pad=1, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    candidates = [padded[0, 0, dy:dy + 3, dx:dx + 3] for dy in range(3) for dx in range(3)]
    assert any(torch.equal(out[0, 0], c) for c in candidates)
    # the window at offset (0, 0) shifts the image down-right: top row and left column are padding
    assert torch.equal(candidates[0], torch.tensor([[0.0, 0, 0], [0, 1, 2], [0, 4, 5]]))


def test_augment_deterministic_noop_and_flat():
    x = torch.rand(16, 1, 6, 6)
    a = augment_batch(x, True, 2, torch.Generator().manual_seed(7))
    b = augment_batch(x, True, 2, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert augment_batch(x, False, 0, torch.Generator()) is x
    with pytest.raises(DataError, match="data.flip=false"):
        augment_batch(torch.rand(4, 8), True, 0, torch.Generator())


# ---------------------------------------------------------------- imagefolder

def _write_image(path: Path, value, size=(4, 3), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def _make_folder(root: Path, classes=("cat", "dog"), per_class=6, test_per_class=2, mode="RGB") -> Path:
    for split, count in (("train", per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            for i in range(count):
                value = (40 * c + i, 7, 200) if mode == "RGB" else 40 * c + i
                _write_image(root / split / name / f"{i:03d}.png", value, mode=mode)
    return root


def _folder_cfg(root, **kwargs) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), val_fraction=0.25, **kwargs)


def test_imagefolder_loads_with_class_names_and_pixels(tmp_path):
    root = _make_folder(tmp_path / "pets", classes=("dog", "cat"))
    s = load_data(_folder_cfg(root), seed=0)
    assert s.class_names == ["cat", "dog"]  # sorted folder names
    assert s.input_shape == (3, 3, 4)  # PIL size (4, 3) is width 4, height 3
    assert len(s.y_train) + len(s.y_val) == 12 and len(s.y_test) == 4
    # every test image is one colour: class c, image i -> (40c + i, 7, 200) / 255
    expected = {(float(40 * c + i), 7.0, 200.0) for c in range(2) for i in range(2)}
    seen = {tuple(round(float(v) * 255) * 1.0 for v in img[:, 0, 0]) for img in s.x_test}
    assert seen == expected
    for img, label in zip(s.x_test, s.y_test):  # labels follow the sorted names, not the writing order
        assert s.class_names[int(label)] == ("dog", "cat")[round(float(img[0, 0, 0]) * 255) // 40]


def test_imagefolder_gray_stays_one_channel_and_mixed_becomes_rgb(tmp_path):
    gray = _make_folder(tmp_path / "gray", mode="L")
    assert load_data(_folder_cfg(gray), 0).input_shape == (1, 3, 4)
    _write_image(gray / "test" / "cat" / "color.png", (255, 0, 0))
    s = load_data(_folder_cfg(gray), 0)
    assert s.input_shape == (3, 3, 4)
    gray_image = s.x_train[0]
    assert torch.equal(gray_image[0], gray_image[1]) and torch.equal(gray_image[1], gray_image[2])


def test_imagefolder_turns_exif_rotated_photos_upright(tmp_path):
    root = _make_folder(tmp_path / "phone", mode="L")
    for split, count in (("train", 6), ("test", 2)):
        for i in range(count):
            write_sideways(root / split / "cat" / f"{i:03d}.png")  # replaces the upright cats
    s = load_data(_folder_cfg(root), 0)
    assert s.input_shape == (1, 3, 4)  # height 3, width 4: as shown, not as stored (4 high, 3 wide)
    cats = s.x_test[s.y_test == s.class_names.index("cat")]
    assert len(cats) == 2 and all(torch.equal(img[0], torch.from_numpy(UPRIGHT / np.float32(255))) for img in cats)


def test_imagefolder_scales_16_bit_greyscale_to_8_bits_instead_of_clipping(tmp_path):
    root = tmp_path / "deep"
    levels = {"dark": 257 * 20, "light": 257 * 200}  # 16-bit values of 8-bit 20 and 200
    for split, count in (("train", 6), ("test", 2)):
        for name, level in levels.items():
            for i in range(count):
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((3, 4), level, dtype=np.uint16)).save(path)  # a 16-bit PNG
    s = load_data(_folder_cfg(root), 0)
    assert s.input_shape == (1, 3, 4)
    seen = {s.class_names[int(label)]: round(float(img.mean()) * 255) for img, label in zip(s.x_test, s.y_test)}
    assert seen == {"dark": 20, "light": 200}  # clipping at 255 would have made both white


def test_imagefolder_says_once_per_split_that_it_dropped_alpha_and_made_grey_images_rgb(
        tmp_path, caplog: pytest.LogCaptureFixture):
    root = _make_folder(tmp_path / "mixed", mode="L")
    for split, count in (("train", 6), ("test", 2)):
        for i in range(count):
            _write_image(root / split / "dog" / f"{i:03d}.png", (10, 20, 30, 0), mode="RGBA")
    for attempt in ("decoded", "cached"):
        caplog.clear()
        with caplog.at_level("WARNING"):
            s = load_data(_folder_cfg(root), 0)
        assert s.input_shape == (3, 3, 4), attempt
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 2, (attempt, warnings)  # one line for train, one for test
        for split, line in zip(("train", "test"), warnings):
            assert line.startswith(f"{split} images in {root}")
            assert "alpha channel" in line and "greyscale among colour images" in line, line


def test_imagefolder_uses_tensor_cache(tmp_path, monkeypatch, private_cache):
    root = _make_folder(tmp_path / "pets")
    first = load_data(_folder_cfg(root), 0)
    assert len(list(private_cache.glob("pets-*/tensors/*.pt"))) == 2

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(imagefolder, "decode_image", no_decoding)
    again = load_data(_folder_cfg(root), 0)
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    _write_image(root / "train" / "cat" / "new.png", (1, 2, 3))  # a changed folder is decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        load_data(_folder_cfg(root), 0)


def test_imagefolder_mixed_sizes_named_and_image_size_fixes_it(tmp_path):
    root = _make_folder(tmp_path / "pets")
    _write_image(root / "train" / "dog" / "big.png", (0, 0, 0), size=(8, 8))
    with pytest.raises(DataError, match=r"train/cat/000.png is 4x3 but train/dog/big.png is 8x8.*data.image_size"):
        load_data(_folder_cfg(root), 0)
    assert load_data(_folder_cfg(root, image_size=5), 0).input_shape == (3, 5, 5)


def test_imagefolder_unreadable_file_named(tmp_path):
    root = _make_folder(tmp_path / "pets")
    (root / "train" / "dog" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"cannot read image train/dog/broken.png \(class 'dog'"):
        load_data(_folder_cfg(root), 0)


def test_imagefolder_test_class_missing_in_train(tmp_path):
    root = _make_folder(tmp_path / "pets")
    _write_image(root / "test" / "fox" / "0.png", (1, 1, 1))
    with pytest.raises(DataError, match=r"test/fox .*no matching train/fox"):
        load_data(_folder_cfg(root), 0)


def test_imagefolder_empty_class_and_missing_split(tmp_path):
    root = _make_folder(tmp_path / "pets")
    (root / "train" / "owl").mkdir()
    with pytest.raises(DataError, match=r"class folder train/owl .*holds no image files"):
        load_data(_folder_cfg(root), 0)
    other = _make_folder(tmp_path / "other")
    for f in (other / "test").rglob("*.png"):
        f.unlink()
    for d in sorted((other / "test").iterdir()):
        d.rmdir()
    (other / "test").rmdir()
    with pytest.raises(DataError, match=r"has no test/ folder"):
        load_data(_folder_cfg(other), 0)


def test_imagefolder_archive_extracted_once_into_cache(tmp_path, monkeypatch, private_cache):
    folder = _make_folder(tmp_path / "src" / "mydata")
    archive = tmp_path / "mydata.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="mydata")  # one top-level folder holding train/ and test/
    s = load_data(_folder_cfg(archive), 0)
    assert s.class_names == ["cat", "dog"] and s.input_shape == (3, 3, 4)
    (cache_dir,) = private_cache.glob("mydata-*")
    assert (cache_dir / "extracted" / "mydata" / "train" / "cat" / "000.png").is_file()
    assert not list(cache_dir.glob(".extracting-*"))  # no half-done staging folder left behind

    def no_extraction(*args, **kwargs):
        raise AssertionError("extracted again")

    monkeypatch.setattr(imagefolder, "_safe_extract", no_extraction)
    again = load_data(_folder_cfg(archive), 0)
    assert torch.equal(s.x_test, again.x_test)


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data(_folder_cfg(tmp_path / "nowhere"), 0)


# ---------------------------------------------------------------- torchvision

@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason=f"no MNIST copy at {SHARED_DATA}")
def test_mnist_from_shared_data():
    s = load_data(DataConfig(name="mnist", root=str(SHARED_DATA), train_limit=500, val_fraction=0.2), seed=0)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert len(s.y_train) == 400 and len(s.y_val) == 100 and len(s.y_test) == 10_000
    assert 0.10 < s.mean[0] < 0.16  # MNIST's pixel mean is 0.1307
    assert float(s.x_test.max()) == 1.0 and s.x_test.dtype == torch.float32


def test_missing_torchvision_root_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match=r"MNIST/raw.*data\.download=true"):
        load_data(DataConfig(name="mnist", root=str(tmp_path / "none")), seed=0)
