"""Cheap, torch-free inspection of dataset uploads: npz archives and ImageFolder zips.

The API calls `sniff_dataset` on every dataset upload to refuse bad files in milliseconds, and
`kdcore.data` reuses the same checks before loading, so both sides agree on what is valid.

npz: only the .npy headers are read for `x_*` (shapes and dtypes, never the pixels); the label
arrays are small and are read in full to check they are class indices. Nothing is unpickled:
object arrays are refused from their header. ImageFolder: the listing of the zip gives the
classes and counts; only the first image is decoded, for its size and colour mode.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal

import numpy as np
from numpy.lib import format as npy_format
from pydantic import BaseModel, Field

from kdcore.archive import DEFAULT_LIMITS, ArchiveLimits, check_zip, open_zip, read_member
from kdcore.errors import BadInputError
from kdcore.text_sniff import TextDatasetInfo, detect_format, sniff_plain_text, sniff_text

Kind = Literal["npz", "imagefolder"]
# How samples are laid out as stored: NxHxW, NxHxWxC, NxCxHxW or NxF.
Layout = Literal["nhw", "nhwc", "nchw", "nf"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
CHANNEL_COUNTS = (1, 3, 4)
MAX_CLASSES = 100_000  # More than any real label set; stops a stray label of 10**9 from sizing tensors.
MAX_NPY_HEADER = 10_000
_SPLITS = ("train", "test")
_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})


class DatasetInfo(BaseModel):
    """What a dataset upload holds, as far as can be told without loading it."""

    kind: Kind
    num_train: int = Field(description="Samples in the training split (before a validation split is taken).")
    num_test: int | None = Field(description="Samples in the archive's own test split, if it has one.")
    sample_shape: list[int] = Field(description="One sample as stored, e.g. [28, 28] or [32, 32, 3].")
    layout: Layout = Field(description="nhw, nhwc, nchw (images) or nf (feature vectors).")
    dtype: str = Field(description="Stored dtype of the samples (uint8 for ImageFolder).")
    num_classes: int | None = Field(description="Max label + 1 (npz) or number of class folders (ImageFolder).")
    class_names: list[str] | None = Field(default=None, description="Class folder names, or the npz's class_names.")
    train_class_counts: list[int] | None = Field(default=None, description="Training samples per class.")
    test_class_counts: list[int] | None = Field(default=None, description="Test samples per class.")
    ignored_files: int = Field(default=0, description="ImageFolder members skipped: not images, or OS clutter.")
    decoded_bytes: int | None = Field(
        default=None, description="ImageFolder: bytes all images take decoded at their own size (from their headers)."
    )


# --------------------------------------------------------------------------------------------- npz


@dataclass(frozen=True)
class NpyHeader:
    """The header of one .npy member of an npz: enough to size and validate it without reading it."""

    key: str
    member: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool

    @property
    def count(self) -> int:
        return math.prod(self.shape)


@dataclass
class LabelledSplit:
    """One split of an npz: the x header (still unread) and the validated labels."""

    x: NpyHeader
    y: np.ndarray  # int64, shape (N,)


@dataclass
class NpzContents:
    """A validated npz: train split, optional test split, their layout and the label space."""

    train: LabelledSplit
    test: LabelledSplit | None
    layout: Layout
    sample_shape: tuple[int, ...]
    num_classes: int
    class_names: list[str] | None = None
    extra_keys: list[str] = field(default_factory=list)


def _read_header(fp: IO[bytes], key: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    try:
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(fp, max_header_size=MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(fp, max_header_size=MAX_NPY_HEADER)
        else:
            raise BadInputError(f"{key}: unsupported .npy format version {version[0]}.{version[1]}")
    except BadInputError:
        raise
    except (ValueError, SyntaxError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise BadInputError(f"{key} is not a valid .npy array: {exc}") from None
    return tuple(int(d) for d in shape), bool(fortran), dtype


def read_npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> NpyHeader:
    """Read and check one member's header: no object/structured dtype, data size as the header says."""
    key = info.filename.removesuffix(".npy")
    with zf.open(info) as fp:
        shape, fortran, dtype = _read_header(fp, key)
        header_bytes = fp.tell()
    if dtype.hasobject:
        raise BadInputError(
            f"{key} holds Python objects (dtype {dtype}); loading it would need pickle, which is refused. "
            "Save plain numeric arrays"
        )
    if dtype.fields is not None:
        raise BadInputError(f"{key} has a structured dtype {dtype}; save plain numeric arrays")
    expected = math.prod(shape) * dtype.itemsize
    if info.file_size - header_bytes < expected:
        raise BadInputError(
            f"{key} is truncated: its header says shape {shape} {dtype} ({expected} bytes) "
            f"but it holds {info.file_size - header_bytes}"
        )
    return NpyHeader(key=key, member=info, shape=shape, dtype=dtype, fortran_order=fortran)


def read_npz_headers(zf: zipfile.ZipFile, infos: Iterable[zipfile.ZipInfo]) -> dict[str, NpyHeader]:
    """Headers of every member of a checked npz, keyed like `np.load` keys them (name without .npy)."""
    headers: dict[str, NpyHeader] = {}
    for info in infos:
        if info.is_dir() or not info.filename.endswith(".npy"):
            raise BadInputError(f"npz member {info.filename!r} is not a .npy array")
        header = read_npy_header(zf, info)
        headers[header.key] = header
    return headers


def read_npy(zf: zipfile.ZipFile, header: NpyHeader) -> np.ndarray:
    """Read one checked member in full, without pickle."""
    try:
        with zf.open(header.member) as fp:
            return npy_format.read_array(fp, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInputError(f"{header.key} cannot be read: {exc}") from None


def x_layout(header: NpyHeader) -> Layout:
    """Check an x array's dtype and rank; say how its samples are laid out."""
    key, shape, dtype = header.key, header.shape, header.dtype
    if dtype != np.uint8 and dtype.kind != "f":
        raise BadInputError(
            f"{key} has dtype {dtype}: store images as uint8 (0-255) and features as float "
            "(e.g. x.astype(np.uint8) or x.astype(np.float32))"
        )
    if len(shape) < 2 or len(shape) > 4:
        raise BadInputError(f"{key} has shape {shape}: expected NxF features, NxHxW or NxHxWxC images (C in 1, 3, 4)")
    if shape[0] == 0:
        raise BadInputError(f"{key} is empty (shape {shape})")
    if 0 in shape[1:]:
        raise BadInputError(f"{key} has an empty sample dimension (shape {shape})")
    if len(shape) == 2:
        return "nf"
    if len(shape) == 3:
        return "nhw"
    if shape[3] in CHANNEL_COUNTS:
        return "nhwc"
    if shape[1] in CHANNEL_COUNTS:
        return "nchw"
    raise BadInputError(
        f"{key} has shape {shape}: 4-D images need 1, 3 or 4 channels, last (NxHxWxC) or second (NxCxHxW)"
    )


def check_labels(key: str, y: np.ndarray) -> np.ndarray:
    """Validate labels as class indices; return them as int64 of shape (N,)."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)  # a column vector of labels is common and unambiguous
    if y.ndim != 1:
        raise BadInputError(f"{key} has shape {y.shape}: labels must be one class index per sample, shape (N,)")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            raise BadInputError(f"{key} has dtype {y.dtype} with NaN or infinite values")
        if not np.all(y == np.round(y)):
            raise BadInputError(f"{key} has dtype {y.dtype} with non-integer values; labels must be class indices")
    elif y.dtype.kind not in "iu":
        raise BadInputError(f"{key} has dtype {y.dtype}; labels must be integer class indices")
    if y.size and y.min() < 0:
        raise BadInputError(f"{key} has negative labels (min {y.min():g}); labels must be 0, 1, ..., K-1")
    if y.size and y.max() >= MAX_CLASSES:
        raise BadInputError(f"{key} has a label of {y.max():g}; at most {MAX_CLASSES} classes are supported")
    return y.astype(np.int64, copy=False)


def _labelled_split(zf: zipfile.ZipFile, headers: dict[str, NpyHeader], x_key: str, y_key: str) -> LabelledSplit:
    x = headers[x_key]
    x_layout(x)
    y_header = headers[y_key]
    if len(y_header.shape) not in (1, 2):
        raise BadInputError(f"{y_key} has shape {y_header.shape}: labels must have shape (N,)")
    if y_header.shape[0] != x.shape[0]:
        raise BadInputError(f"{x_key} has {x.shape[0]} samples but {y_key} has {y_header.shape[0]}")
    if y_header.dtype.kind not in "iuf":
        raise BadInputError(f"{y_key} has dtype {y_header.dtype}; labels must be integer class indices")
    return LabelledSplit(x=x, y=check_labels(y_key, read_npy(zf, y_header)))


def _npz_class_names(zf: zipfile.ZipFile, header: NpyHeader) -> list[str]:
    if header.dtype.kind not in "US" or len(header.shape) != 1:
        raise BadInputError(
            f"class_names has dtype {header.dtype} and shape {header.shape}: expected a 1-D array of strings"
        )
    if header.shape[0] > MAX_CLASSES:
        raise BadInputError(f"class_names has {header.shape[0]} entries; at most {MAX_CLASSES} are supported")
    values = read_npy(zf, header)
    if header.dtype.kind == "S":
        return [v.decode("utf-8", errors="replace") for v in values.tolist()]
    return [str(v) for v in values.tolist()]


def _require_pair(headers: dict[str, NpyHeader], split: str, *, required: bool) -> bool:
    has_x, has_y = f"x_{split}" in headers, f"y_{split}" in headers
    if has_x != has_y:
        missing = f"y_{split}" if has_x else f"x_{split}"
        raise BadInputError(f"npz has {'x' if has_x else 'y'}_{split} but no {missing}: give both or neither")
    if required and not has_x:
        raise BadInputError(f"npz needs x_{split} and y_{split}; it holds: {', '.join(sorted(headers)) or 'nothing'}")
    return has_x


def inspect_npz(zf: zipfile.ZipFile, infos: Iterable[zipfile.ZipInfo]) -> NpzContents:
    """Validate a checked npz: keys, dtypes, shapes, matching lengths, labels; x stays unread."""
    headers = read_npz_headers(zf, infos)
    _require_pair(headers, "train", required=True)
    has_test = _require_pair(headers, "test", required=False)
    train = _labelled_split(zf, headers, "x_train", "y_train")
    layout = x_layout(train.x)
    test = _labelled_split(zf, headers, "x_test", "y_test") if has_test else None
    if test is not None:
        if test.x.shape[1:] != train.x.shape[1:]:
            raise BadInputError(
                f"x_test samples have shape {test.x.shape[1:]} but x_train samples have {train.x.shape[1:]}"
            )
        if (test.x.dtype == np.uint8) != (train.x.dtype == np.uint8):
            raise BadInputError(f"x_test has dtype {test.x.dtype} but x_train has {train.x.dtype}")
    max_label = max(int(s.y.max()) if s.y.size else -1 for s in (train, test) if s is not None)
    num_classes = max_label + 1
    class_names = _npz_class_names(zf, headers["class_names"]) if "class_names" in headers else None
    if class_names is not None:
        if len(class_names) < num_classes:
            raise BadInputError(f"labels go up to {max_label} but class_names has only {len(class_names)} names")
        num_classes = len(class_names)
    known = {"x_train", "y_train", "x_test", "y_test", "class_names"}
    return NpzContents(
        train=train,
        test=test,
        layout=layout,
        sample_shape=train.x.shape[1:],
        num_classes=num_classes,
        class_names=class_names,
        extra_keys=sorted(set(headers) - known),
    )


def _class_counts(y: np.ndarray, num_classes: int) -> list[int]:
    return [int(c) for c in np.bincount(y, minlength=num_classes)]


def _npz_info(contents: NpzContents) -> DatasetInfo:
    train, test = contents.train, contents.test
    return DatasetInfo(
        kind="npz",
        num_train=train.x.shape[0],
        num_test=test.x.shape[0] if test else None,
        sample_shape=list(contents.sample_shape),
        layout=contents.layout,
        dtype=str(train.x.dtype),
        num_classes=contents.num_classes,
        class_names=contents.class_names,
        train_class_counts=_class_counts(train.y, contents.num_classes),
        test_class_counts=_class_counts(test.y, contents.num_classes) if test else None,
    )


# ------------------------------------------------------------------------------------- ImageFolder


@dataclass
class ImageFolderListing:
    """The images of an ImageFolder zip, by split, labelled by index into `class_names` (sorted)."""

    class_names: list[str]
    train: list[tuple[zipfile.ZipInfo, int]]
    test: list[tuple[zipfile.ZipInfo, int]] | None
    ignored: int = 0


@dataclass(frozen=True)
class _FolderLayout:
    head_len: int  # path parts before the class folder
    split_at: int | None  # index of the train/test part within the head, if the zip is split
    top: str | None  # the single extra top-level folder, if there is one


def _is_junk(parts: tuple[str, ...]) -> bool:
    # Hidden files and the clutter macOS and Windows add when zipping a folder.
    return any(p.startswith(".") or p in _JUNK_NAMES for p in parts)


def _is_split_set(names: set[str]) -> bool:
    lowered = {n.lower() for n in names}
    return "train" in lowered and lowered <= set(_SPLITS)


def _folder_layout(files: list[tuple[zipfile.ZipInfo, tuple[str, ...]]]) -> _FolderLayout:
    depth = len(files[0][1])
    for info, parts in files:
        if len(parts) != depth:
            raise BadInputError(
                f"images must all sit at the same folder depth: {files[0][0].filename!r} and "
                f"{info.filename!r} differ; expected <class>/<image>, optionally under one top folder "
                "and train/ and test/"
            )
    tops = {parts[0] for _, parts in files}
    if depth == 2:
        return _FolderLayout(head_len=0, split_at=None, top=None)
    if depth == 3 and _is_split_set(tops):
        return _FolderLayout(head_len=1, split_at=0, top=None)
    if depth == 3 and len(tops) == 1:
        return _FolderLayout(head_len=1, split_at=None, top=next(iter(tops)))
    if depth == 4 and len(tops) == 1 and _is_split_set({parts[1] for _, parts in files}):
        return _FolderLayout(head_len=2, split_at=1, top=next(iter(tops)))
    problem = "is not inside a class folder" if depth < 2 else "does not fit the layout"
    raise BadInputError(
        f"image {files[0][0].filename!r} {problem}: expected <class>/<image>, optionally under one top "
        "folder and/or train/ and test/ folders each holding the class folders"
    )


def _place(parts: tuple[str, ...], layout: _FolderLayout) -> tuple[str, str] | None:
    """(split, class) of a path whose parts run up to the class folder, or None if it lies elsewhere."""
    head = parts[: layout.head_len]
    if layout.top is not None and head[0] != layout.top:
        return None
    split = head[layout.split_at].lower() if layout.split_at is not None else "train"
    if split not in _SPLITS:
        return None
    return split, parts[layout.head_len]


def list_imagefolder(infos: Iterable[zipfile.ZipInfo]) -> ImageFolderListing:
    """Classes and images of a checked ImageFolder zip; classes are sorted names (torchvision's order)."""
    files: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    dirs: list[tuple[str, ...]] = []
    ignored = 0
    for info in infos:
        parts = PurePosixPath(info.filename).parts
        if info.is_dir():
            dirs.append(parts)
        elif _is_junk(parts) or PurePosixPath(info.filename).suffix.lower() not in IMAGE_EXTENSIONS:
            ignored += 1
        else:
            files.append((info, parts))
    if not files:
        raise BadInputError(f"the zip holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in class folders")
    layout = _folder_layout(files)
    placed = [(info, _place(parts, layout)) for info, parts in files]
    # Empty class folders still take a label index, so folder names keep mapping to the same labels.
    classes = {place[1] for _, place in placed if place is not None}
    for parts in dirs:
        if len(parts) == layout.head_len + 1 and not _is_junk(parts):
            place = _place(parts, layout)
            if place is not None:
                classes.add(place[1])
    class_names = sorted(classes)
    if len(class_names) < 2:
        raise BadInputError(f"the zip has {len(class_names)} class folder(s) ({', '.join(class_names)}); need >= 2")
    index = {name: i for i, name in enumerate(class_names)}
    splits: dict[str, list[tuple[zipfile.ZipInfo, int]]] = {"train": [], "test": []}
    for info, place in placed:
        assert place is not None  # every file shares the single top folder by construction
        splits[place[0]].append((info, index[place[1]]))
    has_test = layout.split_at is not None and bool(splits["test"])
    if not splits["train"]:
        raise BadInputError("the zip's train/ folder holds no images")
    return ImageFolderListing(
        class_names=class_names,
        train=splits["train"],
        test=splits["test"] if has_test else None,
        ignored=ignored,
    )


def open_image(data: bytes, name: str, *, max_pixels: int) -> Any:
    """Open an image's header (PIL is lazy) and refuse pixel bombs before anything is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadInputError(f"archive member {name!r} is not a readable image: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadInputError(f"archive member {name!r} is {width}x{height} pixels, more than the limit of {max_pixels}")
    return image


def is_gray(image: Any) -> bool:
    """Grayscale modes, and palette images whose palette is all grays (common for GIFs)."""
    if image.mode in GRAY_MODES:
        return True
    if image.mode != "P":
        return False
    palette = image.getpalette()
    if not palette:
        return False
    rgb = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return bool((rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all())


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ArchiveLimits) -> tuple[int, int, bool]:
    """(width, height, gray) from an image's header: PIL reads a few bytes of the member, decodes none."""
    try:
        with zf.open(info) as stream:
            header = stream.read(64 * 1024)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise BadInputError(f"archive member {info.filename!r} cannot be read: {exc}") from None
    try:
        image = open_image(header, info.filename, max_pixels=limits.max_image_pixels)
    except BadInputError:
        # A header past the first 64 KiB (large EXIF blocks): read the member whole.
        image = open_image(read_member(zf, info), info.filename, max_pixels=limits.max_image_pixels)
    width, height = image.size
    return width, height, is_gray(image)


def _imagefolder_info(zf: zipfile.ZipFile, listing: ImageFolderListing, limits: ArchiveLimits) -> DatasetInfo:
    # Every image's header, not only the first one's: the decoded size is what a job would hold.
    headers = [_header(zf, info, limits) for info, _ in [*listing.train, *(listing.test or [])]]
    width, height, gray = headers[0]
    any_colour = not all(h[2] for h in headers)
    decoded = sum(w * h * (3 if any_colour else 1) for w, h, _ in headers)
    num_classes = len(listing.class_names)

    def counts(items: list[tuple[zipfile.ZipInfo, int]]) -> list[int]:
        tally = Counter(label for _, label in items)
        return [tally.get(i, 0) for i in range(num_classes)]

    return DatasetInfo(
        kind="imagefolder",
        num_train=len(listing.train),
        num_test=len(listing.test) if listing.test is not None else None,
        sample_shape=[height, width] if gray else [height, width, 3],
        layout="nhw" if gray else "nhwc",
        dtype="uint8",
        num_classes=num_classes,
        class_names=listing.class_names,
        train_class_counts=counts(listing.train),
        test_class_counts=counts(listing.test) if listing.test is not None else None,
        ignored_files=listing.ignored,
        decoded_bytes=decoded,
    )


# ------------------------------------------------------------------------------------------- entry


def detect_kind(infos: Iterable[zipfile.ZipInfo]) -> Kind:
    """npz if the zip holds .npy arrays (with x_train), else ImageFolder; by content, not file name."""
    names = [info.filename for info in infos if not info.is_dir()]
    if "x_train.npy" in names or (names and all(name.endswith(".npy") for name in names)):
        return "npz"
    return "imagefolder"


def sniff_dataset(path: str | Path, *, limits: ArchiveLimits | None = None) -> DatasetInfo | TextDatasetInfo:
    """Describe a dataset file (npz, ImageFolder zip, jsonl/csv/tsv rows, or a .txt document) or raise
    BadInputError."""
    limits = limits or DEFAULT_LIMITS
    with open(path, "rb") as handle:
        head = handle.read(64 * 1024)
    if not head.startswith(b"PK"):
        text_format = detect_format(head)
        # By name, as the engine reads it: a .txt is one document (commas or not) unless it holds JSON lines.
        if Path(path).suffix.lower() == ".txt" and text_format != "jsonl":
            return sniff_plain_text(path)
        if text_format is None:
            refuse_a_teacher(path)
            raise BadInputError("not a dataset: not a zip archive (.npz or ImageFolder .zip) and not UTF-8 text "
                                "rows (.jsonl, or .csv/.tsv with a header line)")
        return sniff_text(path, text_format)
    try:
        with open_zip(path, what="dataset", limits=limits) as zf:
            infos = check_zip(zf, limits)
            if detect_kind(infos) == "npz":
                return _npz_info(inspect_npz(zf, infos))
            return _imagefolder_info(zf, list_imagefolder(infos), limits)
    except BadInputError:
        refuse_a_teacher(path)  # a model zip (TorchScript, torch.save, ONNX, Hugging Face) named as such
        raise


def refuse_a_teacher(path: str | Path, *, field: str | None = None) -> None:
    """Raise "this looks like a teacher model" when a file that is no dataset is one (the reverse mistake)."""
    from kdcore.teacher_sniff import sniff_teacher

    try:
        info = sniff_teacher(path)
    except BadInputError:
        return
    raise BadInputError(
        f"this looks like a teacher model ({info.details or info.format}), not a dataset: give it as teacher.file "
        "(uploaded with purpose teacher) and the data as data.train", field=field)
