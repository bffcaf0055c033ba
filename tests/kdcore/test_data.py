"""kdcore.data_sniff, kdcore.data and kdcore.augment on small files made here and on the real MNIST subset."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kdcore.archive import ArchiveLimits
from kdcore.augment import augment_is_random, build_augment, check_augment_fits, flip_crop, shift
from kdcore.data import DataBundle, Preprocess, check_labels_fit, load_data, split_indices
from kdcore.data_sniff import sniff_dataset
from kdcore.errors import BadInputError, MismatchError
from kdcore.limits import ResourceLimitError
from kdcore.spec import DataSpec

REPO = Path(__file__).parents[2]
SHARED_DATA = Path(__file__).parents[3] / "shared" / "data"


# ----------------------------------------------------------------------------------- helpers


def spec(**fields: Any) -> DataSpec:
    return DataSpec(train="unused", **fields)


def save_npz(path: Path, **arrays: Any) -> Path:
    np.savez_compressed(path, **arrays)
    return path


def digits(n: int = 50, classes: int = 5, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    y = (np.arange(n) % classes).astype(np.int64)
    return x, y


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def gray(value: int, size: int = 6) -> np.ndarray:
    return np.full((size, size), value, dtype=np.uint8)


def load(path: Path, test_path: Path | None = None, **fields: Any) -> DataBundle:
    return load_data(spec(**fields), train_path=path, test_path=test_path)


# --------------------------------------------------------------------------------------- npz


def test_npz_uint8_images_load_as_nchw_uint8(tmp_path: Path) -> None:
    x, y = digits(50, classes=5, size=8)
    xt, yt = digits(20, classes=5, size=8, seed=1)
    path = save_npz(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    bundle = load(path, val_fraction=0.2)
    assert bundle.input_shape == (1, 8, 8)
    assert bundle.num_classes == 5
    assert bundle.class_names == ["0", "1", "2", "3", "4"]
    assert bundle.train.x.dtype == torch.uint8 and bundle.train.x.shape == (40, 1, 8, 8)
    assert bundle.train.y.dtype == torch.int64
    assert bundle.val is not None and len(bundle.val) == 10
    assert bundle.test is not None and torch.equal(bundle.test.x[:, 0], torch.from_numpy(xt))
    assert bundle.test_origin == "archive"
    assert bundle.eval_set() == ("test", bundle.test)
    assert "40 train, 10 val, 20 test" in bundle.source


def test_npz_without_test_split_evaluates_on_val(tmp_path: Path) -> None:
    x, y = digits(30)
    bundle = load(save_npz(tmp_path / "d.npz", x_train=x, y_train=y), val_fraction=0.1)
    assert bundle.test is None and bundle.test_origin is None
    assert bundle.val is not None and bundle.eval_set() == ("val", bundle.val)
    nothing = load(tmp_path / "d.npz", val_fraction=0.0)
    assert nothing.val is None and nothing.eval_set() is None and len(nothing.train) == 30


def test_npz_float_features(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(40, 7)).astype(np.float64)
    y = np.arange(40) % 4
    path = save_npz(tmp_path / "f.npz", x_train=x, y_train=y)
    info = sniff_dataset(path)
    assert (info.layout, info.sample_shape, info.dtype) == ("nf", [7], "float64")
    bundle = load(path, val_fraction=0.0, normalize={"mean": [1.0], "std": [2.0]})
    assert bundle.input_shape == (7,)
    assert bundle.train.x.dtype == torch.float32
    expected = (torch.from_numpy(x).float() - 1.0) / 2.0
    assert torch.equal(bundle.preprocess(bundle.train.x), expected)


def test_npz_nhwc_color_becomes_nchw(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(12, 5, 6, 3), dtype=np.uint8)
    y = np.arange(12) % 3
    path = save_npz(tmp_path / "c.npz", x_train=x, y_train=y)
    assert sniff_dataset(path).layout == "nhwc"
    bundle = load(path, val_fraction=0.0)
    assert bundle.input_shape == (3, 5, 6)
    assert torch.equal(bundle.train.x, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert bundle.train.x.is_contiguous()


def test_npz_float_nchw_images(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random(size=(10, 3, 9, 9), dtype=np.float32)
    path = save_npz(tmp_path / "n.npz", x_train=x, y_train=np.arange(10) % 2)
    bundle = load(path, val_fraction=0.0)
    assert bundle.input_shape == (3, 9, 9)
    assert torch.equal(bundle.train.x, torch.from_numpy(x))


def test_npz_class_names_key(tmp_path: Path) -> None:
    x, y = digits(20, classes=3)
    names = np.array(["cat", "dog", "eel", "fox"])
    path = save_npz(tmp_path / "n.npz", x_train=x, y_train=y, class_names=names)
    assert sniff_dataset(path).class_names == ["cat", "dog", "eel", "fox"]
    bundle = load(path)
    assert bundle.num_classes == 4 and bundle.class_names == ["cat", "dog", "eel", "fox"]


def test_float_labels_with_integer_values_are_accepted(tmp_path: Path) -> None:
    x, y = digits(20)
    bundle = load(save_npz(tmp_path / "d.npz", x_train=x, y_train=y.astype(np.float32)), val_fraction=0.0)
    assert bundle.train.y.dtype == torch.int64 and torch.equal(bundle.train.y, torch.from_numpy(y))


# ------------------------------------------------------------------------------ npz refusals


def test_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))  # unpickling creates the marker file

    x = np.empty(3, dtype=object)
    x[:] = [Payload(), Payload(), Payload()]
    path = save_npz(tmp_path / "evil.npz", x_train=x, y_train=np.arange(3))
    with pytest.raises(BadInputError, match=r"x_train holds Python objects.*pickle"):
        sniff_dataset(path)
    with pytest.raises(BadInputError, match=r"x_train holds Python objects"):
        load(path)
    assert not marker.exists()
    np.load(path, allow_pickle=True)["x_train"]  # the payload is real: pickle would have run it
    assert marker.exists()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x_train": np.zeros((10, 4, 4), np.uint8), "y_train": np.zeros(9, np.int64)},
            "x_train has 10 samples but y_train has 9",
        ),
        (
            {"x_train": np.zeros((4, 4, 4), np.uint8), "y_train": np.array([0, 1, 0.5, 1], np.float32)},
            "y_train has dtype float32 with non-integer values",
        ),
        (
            {"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.array(["a", "b"])},
            "y_train has dtype <U1; labels must be integer class indices",
        ),
        (
            {"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.array([0, -1])},
            "y_train has negative labels",
        ),
        (
            {"x_train": np.zeros((2, 4, 4), np.int64), "y_train": np.array([0, 1])},
            "x_train has dtype int64: store images as uint8",
        ),
        (
            {"x_train": np.zeros((2, 5, 6, 7), np.uint8), "y_train": np.array([0, 1])},
            "4-D images need 1, 3 or 4 channels",
        ),
        ({"x_train": np.zeros(2, np.float32), "y_train": np.array([0, 1])}, "x_train has shape (2,)"),
        ({"x_train": np.zeros((0, 4), np.float32), "y_train": np.zeros(0, np.int64)}, "x_train is empty"),
        (
            {"x": np.zeros((2, 4), np.float32), "y": np.array([0, 1])},
            "npz needs x_train and y_train; it holds: x, y",
        ),
        (
            {
                "x_train": np.zeros((2, 4), np.float32),
                "y_train": np.array([0, 1]),
                "x_test": np.zeros((1, 4)),
            },
            "npz has x_test but no y_test",
        ),
        (
            {
                "x_train": np.zeros((2, 4, 4), np.uint8),
                "y_train": np.array([0, 1]),
                "x_test": np.zeros((2, 5, 5), np.uint8),
                "y_test": np.array([0, 1]),
            },
            "x_test samples have shape (5, 5) but x_train samples have (4, 4)",
        ),
    ],
)
def test_bad_npz_is_refused_naming_key_and_reason(tmp_path: Path, arrays: dict[str, Any], message: str) -> None:
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BadInputError) as sniffed:
        sniff_dataset(path)
    assert message in str(sniffed.value)
    with pytest.raises(BadInputError) as loaded:
        load(path)
    assert message in str(loaded.value)


def test_npz_with_non_npy_member_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.npz"
    np.savez(path, x_train=np.zeros((2, 3), np.float32), y_train=np.array([0, 1]))
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("notes.txt", b"hello")
    with pytest.raises(BadInputError, match=r"npz member 'notes.txt' is not a .npy array"):
        sniff_dataset(path)


def test_truncated_npy_header_claims_are_refused(tmp_path: Path) -> None:
    # A header claiming far more data than the member holds must not make the loader allocate it.
    buffer = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 28)}
    np.lib.format.write_array_header_1_0(buffer, header)
    path = make_zip(tmp_path / "liar.npz", {"x_train.npy": buffer.getvalue(), "y_train.npy": b""})
    with pytest.raises(BadInputError, match="x_train is truncated"):
        sniff_dataset(path)


def test_not_a_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(BadInputError, match="not a zip archive"):
        sniff_dataset(path)


def test_nan_features_are_refused(tmp_path: Path) -> None:
    x = np.zeros((4, 3), np.float32)
    x[2, 1] = np.nan
    with pytest.raises(BadInputError, match="x_train contains NaN"):
        load(save_npz(tmp_path / "nan.npz", x_train=x, y_train=np.arange(4) % 2))


# --------------------------------------------------------------------------- splits and tests


def test_val_split_is_deterministic_disjoint_and_stratified(tmp_path: Path) -> None:
    n = 1000
    x = np.arange(n, dtype=np.float32)[:, None]  # each sample's feature is its own id
    y = np.repeat(np.arange(4), [100, 200, 300, 400])
    path = save_npz(tmp_path / "ids.npz", x_train=x, y_train=y)
    first = load_data(spec(val_fraction=0.2), train_path=path, seed=7)
    again = load_data(spec(val_fraction=0.2), train_path=path, seed=7)
    other = load_data(spec(val_fraction=0.2), train_path=path, seed=8)
    assert first.val is not None and again.val is not None and other.val is not None
    train_ids = set(first.train.x[:, 0].long().tolist())
    val_ids = set(first.val.x[:, 0].long().tolist())
    assert len(val_ids) == 200 and not train_ids & val_ids and train_ids | val_ids == set(range(n))
    assert torch.equal(first.val.x, again.val.x) and torch.equal(first.train.y, again.train.y)
    assert not torch.equal(first.val.x, other.val.x)
    assert np.bincount(first.val.y.numpy()).tolist() == [20, 40, 60, 80]
    assert torch.equal(first.val.y, torch.from_numpy(y[first.val.x[:, 0].long().numpy()]))


def test_split_indices_edge_cases() -> None:
    y = np.array([0, 1, 1])
    train, val = split_indices(y, 0.01, seed=0)
    assert len(val) == 1 and len(train) == 2  # at least one validation sample
    train, val = split_indices(y, 0.99, seed=0)
    assert len(train) == 1  # at least one training sample
    with pytest.raises(BadInputError, match=r"set data\.val_fraction to 0"):
        split_indices(np.array([0]), 0.1, seed=0)


def test_separate_test_file_overrides_and_must_match_shape(tmp_path: Path) -> None:
    x, y = digits(30, size=8)
    train = save_npz(tmp_path / "train.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    xt, yt = digits(12, size=8, seed=3)
    test = save_npz(tmp_path / "test.npz", x_train=xt, y_train=yt)  # a test file may use either key pair
    bundle = load(train, test)
    assert bundle.test_origin == "file" and bundle.test is not None and len(bundle.test) == 12
    assert "12 test from test.npz" in bundle.source

    wrong = save_npz(tmp_path / "wrong.npz", x_test=digits(5, size=9)[0], y_test=np.zeros(5, np.int64))
    with pytest.raises(MismatchError) as exc:
        load(train, wrong)
    assert exc.value.field == "data.test"
    assert "test samples have shape (1, 9, 9) but training samples have (1, 8, 8)" in str(exc.value)

    floats = save_npz(tmp_path / "floats.npz", x_test=np.zeros((5, 8, 8), np.float32), y_test=np.zeros(5))
    with pytest.raises(MismatchError, match="both must be uint8 images or both float"):
        load(train, floats)


def test_image_size_resizes_npz_images_too(tmp_path: Path) -> None:
    x, y = digits(10, size=16)
    bundle = load(save_npz(tmp_path / "u.npz", x_train=x, y_train=y), image_size=28, val_fraction=0.0)
    assert bundle.input_shape == (1, 28, 28) and bundle.train.x.dtype == torch.uint8


def test_labels_beyond_teacher_outputs(tmp_path: Path) -> None:
    x = np.zeros((12, 4, 4), np.uint8)
    y = np.arange(12)
    bundle = load(save_npz(tmp_path / "d.npz", x_train=x, y_train=y), val_fraction=0.25)
    assert bundle.num_classes == 12
    with pytest.raises(MismatchError, match="labels go up to 11 but the teacher has 10 outputs"):
        check_labels_fit(bundle, 10)
    check_labels_fit(bundle, 12)


# ------------------------------------------------------------------------------- Preprocess


def test_preprocess_values_are_exact() -> None:
    x = torch.tensor([0, 51, 102, 255], dtype=torch.uint8).reshape(1, 1, 2, 2)
    pre = Preprocess([0.5], [0.25], (1, 2, 2))
    expected = torch.tensor([-2.0, -1.2, -0.4, 2.0]).reshape(1, 1, 2, 2)
    out = pre(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert torch.equal(out, (x.float() / 255.0 - 0.5) / 0.25)


def test_preprocess_per_channel_and_float_input() -> None:
    x = torch.full((2, 3, 2, 2), 255, dtype=torch.uint8)
    pre = Preprocess([0.0, 0.5, 1.0], [1.0, 0.5, 2.0], (3, 2, 2))
    out = pre(x)
    assert out[:, 0].eq(1.0).all() and out[:, 1].eq(1.0).all() and out[:, 2].eq(0.0).all()
    floats = torch.ones(2, 3, 2, 2)  # float data is only normalised, not divided by 255
    assert pre(floats)[:, 1].eq(1.0).all()
    torch.testing.assert_close(pre.zero_value, torch.tensor([0.0, -1.0, -0.5]))
    assert sorted(name for name, _ in pre.named_buffers()) == ["mean", "std"]


def test_preprocess_normalize_length_must_match_channels() -> None:
    with pytest.raises(MismatchError) as exc:
        Preprocess([0.1, 0.2], [1.0], (3, 8, 8))
    assert exc.value.field == "data.normalize.mean"
    assert "has 2 values but the data has 3 channels" in str(exc.value)
    with pytest.raises(MismatchError) as exc:
        Preprocess([0.1], [1.0, 2.0], (1, 8, 8))
    assert exc.value.field == "data.normalize.std"


def test_load_data_checks_normalize_against_channels(tmp_path: Path) -> None:
    x, y = digits(10)
    path = save_npz(tmp_path / "d.npz", x_train=x, y_train=y)
    with pytest.raises(MismatchError, match=r"data\.normalize\.mean"):
        load(path, normalize={"mean": [0.1, 0.2, 0.3], "std": [1.0]})


# ------------------------------------------------------------------------------ ImageFolder


def test_imagefolder_gray_zip(tmp_path: Path) -> None:
    members = {
        "dog/1.png": png(gray(10)),
        "dog/2.png": png(gray(20)),
        "cat/1.png": png(gray(30)),
        "cat/2.PNG": png(gray(40)),
        "cat/3.jpg": png(gray(50)),  # the decoder trusts content, not the extension
        "cat/notes.txt": b"not an image",
        "__MACOSX/cat/._1.png": b"resource fork",
        ".DS_Store": b"finder",
        "eel/": b"",  # an empty class folder still takes its label
    }
    path = make_zip(tmp_path / "pets.zip", members)
    info = sniff_dataset(path)
    assert info.kind == "imagefolder"
    assert info.class_names == ["cat", "dog", "eel"] and info.num_classes == 3
    assert info.train_class_counts == [3, 2, 0] and info.num_test is None
    assert info.sample_shape == [6, 6] and info.ignored_files == 3
    bundle = load(path, val_fraction=0.0)
    assert bundle.input_shape == (1, 6, 6) and bundle.class_names == ["cat", "dog", "eel"]
    assert bundle.num_classes == 3
    by_value = {int(x[0, 0, 0]): int(label) for x, label in zip(bundle.train.x, bundle.train.y, strict=True)}
    assert by_value == {10: 1, 20: 1, 30: 0, 40: 0, 50: 0}


def test_imagefolder_mixed_color_becomes_rgb_with_splits_under_a_top_folder(tmp_path: Path) -> None:
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 200
    members = {
        "data/train/a/1.png": png(red),
        "data/train/a/2.png": png(gray(7, 4)),
        "data/train/b/1.png": png(gray(9, 4)),
        "data/test/a/1.png": png(gray(11, 4)),
        "data/test/b/1.png": png(red),
    }
    path = make_zip(tmp_path / "mixed.zip", members)
    info = sniff_dataset(path)
    assert (info.num_train, info.num_test, info.test_class_counts) == (3, 2, [1, 1])
    bundle = load(path, val_fraction=0.0)
    assert bundle.input_shape == (3, 4, 4)
    assert bundle.test is not None and bundle.test.x.shape == (2, 3, 4, 4) and bundle.test_origin == "archive"
    gray_sample = bundle.train.x[bundle.train.x[:, 0, 0, 0] == 7][0]
    assert gray_sample.eq(7).all()  # gray images replicated into all three channels
    assert bundle.test.y.tolist() == [0, 1]


def test_imagefolder_sizes_must_agree_unless_image_size_is_set(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "sizes.zip", {"a/1.png": png(gray(1, 6)), "b/1.png": png(gray(2, 9))})
    with pytest.raises(BadInputError, match=r"images differ in size.*set data.image_size"):
        load(path, val_fraction=0.0)
    bundle = load(path, val_fraction=0.0, image_size=8)
    assert bundle.input_shape == (1, 8, 8)


def test_imagefolder_gray_palette_gif_stays_one_channel(tmp_path: Path) -> None:
    def gif(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(gray(value, 5)).convert("P").save(buffer, format="GIF")
        return buffer.getvalue()

    path = make_zip(tmp_path / "gif.zip", {"a/1.gif": gif(40), "b/1.gif": gif(80)})
    assert sniff_dataset(path).sample_shape == [5, 5]
    bundle = load(path, val_fraction=0.0)
    assert bundle.input_shape == (1, 5, 5)
    assert sorted(int(v) for v in bundle.train.x[:, 0, 0, 0]) == [40, 80]


def test_imagefolder_sixteen_bit_png_is_scaled(tmp_path: Path) -> None:
    deep = np.full((4, 4), 65535, dtype=np.uint16)
    path = make_zip(tmp_path / "deep.zip", {"a/1.png": png(deep), "b/1.png": png(gray(3, 4))})
    bundle = load(path, val_fraction=0.0)
    assert bundle.train.x[bundle.train.y == 0].eq(255).all()


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"a/1.png": png(gray(1))}, "1 class folder(s) (a); need >= 2"),
        ({"1.png": png(gray(1)), "2.png": png(gray(1))}, "is not inside a class folder"),
        ({"a/1.png": png(gray(1)), "b/c/1.png": png(gray(1))}, "same folder depth"),
        ({"a/1.png": b"garbage", "b/1.png": png(gray(1))}, "'a/1.png' is not a readable image"),
        ({"readme.txt": b"hi"}, "holds no images"),
        ({"../a/1.png": png(gray(1)), "b/1.png": png(gray(1))}, "'../a/1.png' has a '..' component"),
    ],
)
def test_bad_imagefolder_is_refused(tmp_path: Path, members: dict[str, bytes], message: str) -> None:
    path = make_zip(tmp_path / "bad.zip", members)
    with pytest.raises(BadInputError) as exc:
        load(path, val_fraction=0.0)
    assert message in str(exc.value)


def test_image_pixel_bomb_is_refused(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "big.zip", {"a/1.png": png(gray(0, 64)), "b/1.png": png(gray(0, 8))})
    with pytest.raises(BadInputError, match=r"'a/1.png' is 64x64 pixels, more than the limit of 1000"):
        load_data(spec(val_fraction=0.0), train_path=path, limits=ArchiveLimits(max_image_pixels=1000))


def test_decoded_image_bytes_are_bounded(tmp_path: Path) -> None:
    members = {f"{c}/{i}.png": png(gray(0, 32)) for c in "ab" for i in range(4)}
    path = make_zip(tmp_path / "many.zip", members)
    # Counted from the headers before decoding: the limit is reached at the fourth 32x32 image.
    with pytest.raises(ResourceLimitError, match=r"images up to 'a/3.png' take 4,096 bytes.*4,000.*data\.image_size"):
        load_data(spec(val_fraction=0.0), train_path=path, limits=ArchiveLimits(max_decoded_bytes=4000))


def test_imagefolder_test_file_maps_labels_by_class_name(tmp_path: Path) -> None:
    train = make_zip(tmp_path / "train.zip", {f"{c}/{i}.png": png(gray(i)) for c in "abc" for i in range(3)})
    test = make_zip(tmp_path / "test.zip", {"b/1.png": png(gray(1)), "c/1.png": png(gray(2))})
    bundle = load(train, test, val_fraction=0.0)
    assert bundle.test is not None and bundle.test.y.tolist() == [1, 2]  # b, c in train's label space
    unknown = make_zip(tmp_path / "unknown.zip", {"b/1.png": png(gray(1)), "zebra/1.png": png(gray(2))})
    with pytest.raises(MismatchError, match="test classes zebra are not among the training classes"):
        load(train, unknown, val_fraction=0.0)
    bigger = make_zip(tmp_path / "bigger.zip", {"b/1.png": png(gray(1, 7)), "c/1.png": png(gray(2, 7))})
    with pytest.raises(MismatchError, match="test samples have shape"):
        load(train, bigger, val_fraction=0.0)


# ---------------------------------------------------------------------------------- augment


def single_pixels(n: int, size: int = 12) -> torch.Tensor:
    x = torch.zeros(n, 1, size, size)
    x[:, 0, size // 2, size // 2] = 1.0
    return x


def test_build_augment_names() -> None:
    assert build_augment("none") is None and not augment_is_random("none")
    assert build_augment("shift") is not None and augment_is_random("shift")
    assert build_augment("flip_crop") is not None and augment_is_random("flip_crop")
    with pytest.raises(ValueError, match="unknown augment"):
        build_augment("rotate")


def test_shift_moves_pixels_by_at_most_two_and_repeats_with_the_seed() -> None:
    x = single_pixels(64)
    out = shift(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert out.sum(dim=(1, 2, 3)).eq(1.0).all()  # the pixel is never lost within +-2 of the centre
    rows, cols = out[:, 0].nonzero()[:, 1], out[:, 0].nonzero()[:, 2]
    assert (rows - 6).abs().max() <= 2 and (cols - 6).abs().max() <= 2
    assert len({(int(r), int(c)) for r, c in zip(rows, cols, strict=True)}) > 10  # really random per sample
    again = shift(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert not torch.equal(out, shift(x, torch.Generator().manual_seed(1)))


def test_shift_is_a_zero_filled_translation() -> None:
    x = torch.rand(16, 2, 7, 7) + 1.0  # strictly positive, so zeros can only come from the padding
    out = shift(x, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        crops = [padded[i, :, r : r + 7, c : c + 7] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], crop) for crop in crops)


def test_flip_crop_shape_fill_and_determinism() -> None:
    x = torch.rand(32, 3, 10, 10) + 1.0
    augment = build_augment("flip_crop", fill=[-1.0, -2.0, -3.0])
    assert augment is not None
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out, augment(x, torch.Generator().manual_seed(0)))
    for channel, value in enumerate((-1.0, -2.0, -3.0)):
        values = set(out[:, channel].unique().tolist())
        assert values <= set(x[:, channel].unique().tolist()) | {value}
    flipped = flip_crop(torch.arange(4.0).reshape(1, 1, 1, 4).repeat(200, 1, 1, 1), torch.Generator())
    assert flipped.shape == (200, 1, 1, 4)


def test_image_augments_refuse_feature_data() -> None:
    check_augment_fits("shift", (1, 28, 28))
    check_augment_fits("none", (784,))
    with pytest.raises(MismatchError) as exc:
        check_augment_fits("flip_crop", (784,))
    assert exc.value.field == "data.augment"


# -------------------------------------------------------------------------- torch-free sniff


def test_sniff_and_archive_do_not_import_torch(tmp_path: Path) -> None:
    x, y = digits(10)
    npz = save_npz(tmp_path / "d.npz", x_train=x, y_train=y)
    folder = make_zip(tmp_path / "f.zip", {"a/1.png": png(gray(1)), "b/1.png": png(gray(2))})
    code = (
        "import sys\n"
        "from kdcore.data_sniff import sniff_dataset\n"
        "import kdcore.archive\n"
        f"assert sniff_dataset({str(npz)!r}).num_train == 10\n"
        f"assert sniff_dataset({str(folder)!r}).num_classes == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------- real data


@pytest.mark.skipif(
    not (SHARED_DATA / "mnist_small.npz").exists(),
    reason="../shared/data/mnist_small.npz is not on this machine",
)
def test_real_mnist_small() -> None:
    path = SHARED_DATA / "mnist_small.npz"
    info = sniff_dataset(path)
    assert (info.num_train, info.num_test, info.sample_shape, info.dtype) == (6000, 1000, [28, 28], "uint8")
    assert info.num_classes == 10
    assert info.train_class_counts == [592, 671, 581, 608, 623, 514, 608, 651, 551, 601]
    bundle = load_data(spec(normalize={"mean": [0.1307], "std": [0.3081]}), train_path=path, seed=0)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    assert bundle.val is not None and len(bundle.train) == 5400 and len(bundle.val) == 600
    assert bundle.test is not None and len(bundle.test) == 1000
    counts = np.bincount(torch.cat([bundle.train.y, bundle.val.y]).numpy())
    assert counts.tolist() == info.train_class_counts
    batch = bundle.preprocess(bundle.train.x[:2000])
    assert abs(float(batch.mean())) < 0.1 and abs(float(batch.std()) - 1.0) < 0.1


@pytest.mark.skipif(not (SHARED_DATA / "mnist.npz").exists(), reason="../shared/data/mnist.npz is not on this machine")
def test_real_mnist_loads_fast() -> None:
    start = time.perf_counter()
    bundle = load_data(spec(), train_path=SHARED_DATA / "mnist.npz")
    elapsed = time.perf_counter() - start
    assert len(bundle.train) + len(bundle.val or []) == 60000
    assert elapsed < 5.0, f"mnist.npz took {elapsed:.2f} s to load"
