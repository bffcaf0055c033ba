"""docs/data.md's ImageFolder layouts, built exactly as the page draws them, and loaded as it says they load."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdcore.data import load_data
from kdcore.data_sniff import sniff_dataset
from kdcore.errors import BadInputError, MismatchError
from kdcore.spec import DataSpec

DOC = Path(__file__).resolve().parents[2] / "docs" / "data.md"


def _drawn_trees() -> dict[str, list[str]]:
    """The file paths of each zip in the page's tree figure, read column by column from the drawing."""
    figure = re.search(r"```text\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert figure is not None
    lines = figure.group(1).splitlines()
    names = lines[0].split()
    starts = [lines[0].index(name) for name in names]
    trees = {}
    for number, name in enumerate(names):
        end = starts[number + 1] if number + 1 < len(names) else None
        stack: list[str] = []
        files = []
        for line in lines[1:]:
            cell = line[starts[number]:end].rstrip()
            entry = re.search(r"[\w.]+/?$", cell)
            if not entry:
                continue
            depth = entry.start() // 4  # each level of the drawing indents by 4
            stack[depth - 1:] = [entry.group().rstrip("/")]
            if not entry.group().endswith("/"):
                files.append("/".join(stack))
        trees[name] = files
    return trees


def _png(value: int, *, mode: str = "L", size: tuple[int, int] = (6, 6), kind: str = "PNG") -> bytes:
    colour: int | tuple[int, ...] = value if mode in ("L", "P") else (value, 255 - value, 0, 128)[:len(mode)]
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format=kind)
    return buffer.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _image(name: str) -> bytes:
    # Each image says its class by its brightness, so a loaded label can be checked against its pixels.
    return _png(40 if "/cat/" in f"/{name}" else 200, kind="JPEG" if name.endswith(".jpg") else "PNG")


def _load(train: Path, test: Path | None = None, **spec: object):
    return load_data(DataSpec(train=str(train), test=str(test) if test else None, **spec), train_path=train,
                     test_path=test)


def test_the_page_draws_the_four_layouts() -> None:
    assert _drawn_trees() == {
        "flat.zip": ["cat/001.png", "cat/002.png", "dog/003.jpg"],
        "under-a-folder.zip": ["pets/cat/001.png", "pets/dog/003.jpg"],
        "split.zip": ["train/cat/001.png", "train/dog/003.jpg", "test/cat/101.png", "test/dog/104.png"],
        "split-under-a-folder.zip": [],  # its class folders are drawn empty: the same as split.zip under pets/
    }


@pytest.mark.parametrize("name", ["flat.zip", "under-a-folder.zip", "split.zip"])
def test_each_drawn_tree_loads_with_the_classes_in_sorted_order(tmp_path: Path, name: str) -> None:
    files = _drawn_trees()[name]
    path = _zip(tmp_path / name, {member: _image(member) for member in files})
    data = _load(path, val_fraction=0.0)
    assert data.class_names == ["cat", "dog"] and data.input_shape == (1, 6, 6)
    train_files = [f for f in files if not f.startswith("test/")]
    assert len(data.train) == len(train_files)
    for x, y in zip(data.train.x, data.train.y, strict=True):  # cat (label 0) dark, dog (label 1) bright
        assert (int(x.float().mean()) > 128) == bool(y)
    if name == "split.zip":
        assert data.test is not None and len(data.test) == 2 and data.test_origin == "archive"
    else:
        assert data.test is None


def test_the_split_tree_under_a_top_folder_loads_its_test_split(tmp_path: Path) -> None:
    files = [f"pets/{member}" for member in _drawn_trees()["split.zip"]]
    data = _load(_zip(tmp_path / "split-under-a-folder.zip", {f: _image(f) for f in files}), val_fraction=0.0)
    assert data.class_names == ["cat", "dog"] and len(data.train) == 2
    assert data.test is not None and len(data.test) == 2


def test_train_and_test_folders_in_any_case(tmp_path: Path) -> None:
    members = {"Train/cat/1.png": _png(40), "Train/dog/2.png": _png(200), "TEST/dog/3.png": _png(200)}
    data = _load(_zip(tmp_path / "cased.zip", members), val_fraction=0.0)
    assert data.test is not None and data.test.y.tolist() == [1]


def test_two_top_folders_that_are_not_train_and_test_are_refused(tmp_path: Path) -> None:
    members = {"a/cat/1.png": _png(40), "b/dog/2.png": _png(200)}
    with pytest.raises(BadInputError, match="does not fit the layout"):
        _load(_zip(tmp_path / "two.zip", members))


def test_images_at_different_depths_are_refused(tmp_path: Path) -> None:
    members = {"cat/1.png": _png(40), "dog/more/2.png": _png(200)}
    with pytest.raises(BadInputError, match="same folder depth"):
        _load(_zip(tmp_path / "deep.zip", members))


def test_a_separate_test_zip_is_matched_by_folder_name(tmp_path: Path) -> None:
    train = _zip(tmp_path / "train.zip", {"ant/1.png": _png(10), "bee/2.png": _png(100), "cat/3.png": _png(200)})
    # Fewer classes in the test zip: "cat" is its class 1 but the training data's class 2.
    test = _zip(tmp_path / "test.zip", {"bee/8.png": _png(100), "cat/9.png": _png(200)})
    data = _load(train, test, val_fraction=0.0)
    assert data.test is not None and data.test.y.tolist() == [1, 2] and data.test_origin == "file"
    with pytest.raises(MismatchError, match="test classes dog are not among the training classes"):
        _load(train, _zip(tmp_path / "other.zip", {"ant/1.png": _png(1), "dog/1.png": _png(1)}), val_fraction=0.0)


def test_a_full_split_zip_as_the_test_file_lends_its_test_folder(tmp_path: Path) -> None:
    train = _zip(tmp_path / "train.zip", {"cat/1.png": _png(40), "dog/2.png": _png(200)})
    full = _zip(tmp_path / "full.zip", {"train/cat/1.png": _png(40), "train/dog/2.png": _png(200),
                                         "test/dog/3.png": _png(200), "test/dog/4.png": _png(200)})
    data = _load(train, full, val_fraction=0.0)
    assert data.test is not None and data.test.y.tolist() == [1, 1]


def test_class_order_is_sorted_by_code_point_and_keeps_empty_folders(tmp_path: Path) -> None:
    members = {"2/a.png": _png(1), "10/b.png": _png(2), "ant/c.png": _png(3), "Zebra/d.png": _png(4)}
    path = tmp_path / "order.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr(zipfile.ZipInfo("empty/"), b"")  # a class folder with no images yet
    data = _load(path, val_fraction=0.0)
    assert data.class_names == ["10", "2", "Zebra", "ant", "empty"] and data.num_classes == 5
    assert sniff_dataset(path).class_names == data.class_names  # what the upload's info says


def test_clutter_and_other_files_are_skipped_and_counted(tmp_path: Path) -> None:
    members = {"cat/1.png": _png(40), "dog/2.PNG": _png(200), "README.txt": b"hello", "cat/.DS_Store": b"x",
               "__MACOSX/cat/._1.png": b"x", "dog/Thumbs.db": b"x"}
    path = _zip(tmp_path / "clutter.zip", members)
    assert len(_load(path, val_fraction=0.0).train) == 2
    assert sniff_dataset(path).ignored_files == 4


def test_grayscale_images_give_one_channel_and_sixteen_bits_are_scaled(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16)).save(buffer, format="PNG")  # 16-bit white
    data = _load(_zip(tmp_path / "gray.zip", {"cat/1.png": _png(40), "dog/2.png": buffer.getvalue()}),
                 val_fraction=0.0)
    assert data.input_shape == (1, 6, 6)
    assert data.train.x[data.train.y == 1].max().item() == 255  # scaled to 8 bits, not clipped to garbage


def test_one_colour_image_makes_every_image_rgb_and_alpha_is_dropped(tmp_path: Path) -> None:
    members = {"cat/1.png": _png(40), "dog/2.png": _png(200, mode="RGBA")}
    data = _load(_zip(tmp_path / "mixed.zip", members), val_fraction=0.0)
    assert data.input_shape == (3, 6, 6)
    gray = data.train.x[data.train.y == 0][0]
    assert (gray[0] == gray[1]).all() and (gray[1] == gray[2]).all() and int(gray[0, 0, 0]) == 40  # repeated
    colour = data.train.x[data.train.y == 1][0]
    assert colour[:, 0, 0].tolist() == [200, 55, 0]  # RGB of the RGBA pixel, the alpha gone


def test_the_test_split_takes_the_training_channels(tmp_path: Path) -> None:
    train = _zip(tmp_path / "train.zip", {"cat/1.png": _png(40, mode="RGB"), "dog/2.png": _png(200, mode="RGB")})
    test = _zip(tmp_path / "test.zip", {"cat/3.png": _png(40), "dog/4.png": _png(200)})
    data = _load(train, test, val_fraction=0.0)
    assert data.test is not None and tuple(data.test.x.shape[1:]) == (3, 6, 6)


def test_sizes_must_agree_unless_image_size_resizes_them(tmp_path: Path) -> None:
    path = _zip(tmp_path / "sizes.zip", {"cat/1.png": _png(40, size=(6, 6)), "dog/2.png": _png(200, size=(10, 4))})
    with pytest.raises(BadInputError, match=r"images differ in size.*set data\.image_size"):
        _load(path, val_fraction=0.0)
    data = _load(path, val_fraction=0.0, image_size=8)
    assert data.input_shape == (1, 8, 8)  # square: the aspect ratio is not kept
    assert data.train.x[data.train.y == 1].float().mean().item() == pytest.approx(200, abs=1)


def test_pixels_are_scaled_to_one_then_normalised(tmp_path: Path) -> None:
    data = _load(_zip(tmp_path / "n.zip", {"cat/1.png": _png(0), "dog/2.png": _png(255)}), val_fraction=0.0,
                 normalize={"mean": [0.5], "std": [0.25]})
    inputs = data.preprocess(data.train.x)
    assert sorted({round(v, 4) for v in inputs.flatten().tolist()}) == [-2.0, 2.0]
