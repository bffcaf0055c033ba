"""Loading training data for the engine: npz arrays or ImageFolder zips into tensors.

Images stay uint8 (NxCxHxW) in memory, four times smaller than float32; `Preprocess` turns a
batch into normalised float32 on the training device, where it is fast. Every file goes through
the same checks as `kdcore.data_sniff` first, so the API and the engine agree on what is valid.

Splits:
* train: the file's training data minus the validation share.
* val: a seeded, class-stratified `val_fraction` of train (None when val_fraction is 0).
* test: the separate test file (`data.test`) if given, else the archive's own test split
  (npz x_test/y_test, ImageFolder test/), else None; the engine then evaluates on val.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdcore.archive import DEFAULT_LIMITS, ArchiveLimits, check_zip, open_zip, read_member
from kdcore.data_sniff import (
    GRAY_MODES,
    ImageFolderListing,
    Layout,
    NpyHeader,
    check_labels,
    detect_kind,
    inspect_npz,
    is_gray,
    list_imagefolder,
    open_image,
    read_npy,
    read_npz_headers,
    refuse_a_teacher,
    x_layout,
)
from kdcore.errors import BadInputError, MismatchError
from kdcore.limits import ResourceLimitError
from kdcore.spec import DataSpec

_DECODE_CHUNK = 512  # images read from the zip per batch handed to the decoding threads
_RESIZE_CHUNK_BYTES = 64 * 2**20  # float32 working set of one resize step


@dataclass
class ArrayDataset:
    """Samples and labels held as tensors: x uint8 NxCxHxW (images) or float32, y int64 N."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


class Preprocess(nn.Module):
    """Stored batch → the float32 input the models take: uint8 / 255, then (x - mean) / std per channel.

    Buffers, so `.to(device)` moves it; a batch on another device is moved to the buffers' device
    first, so uint8 batches cross the bus at a quarter of the float size.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], input_shape: tuple[int, ...]) -> None:
        super().__init__()
        channels = input_shape[0]
        what = "channels" if len(input_shape) == 3 else "features"
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, channels):
                raise MismatchError(
                    f"has {len(values)} values but the data has {channels} {what}: give 1 or {channels}",
                    field=f"data.normalize.{name}",
                )
        view = (1, -1, 1, 1) if len(input_shape) == 3 else (1, -1)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).reshape(view))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).reshape(view))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.mean.device:
            x = x.to(self.mean.device, non_blocking=True)
        x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        return (x - self.mean) / self.std

    @property
    def zero_value(self) -> torch.Tensor:
        """What a stored 0 (black) becomes after preprocessing, per channel: the fill for padding."""
        return (-self.mean / self.std).reshape(-1)


@dataclass
class DataBundle:
    """Everything the engine needs about the data of one job."""

    train: ArrayDataset
    val: ArrayDataset | None
    test: ArrayDataset | None
    input_shape: tuple[int, ...]  # one sample as the model sees it: (C, H, W) or (F,)
    num_classes: int
    class_names: list[str]
    source: str
    preprocess: Preprocess
    test_origin: Literal["file", "archive"] | None = None

    def eval_set(self) -> tuple[str, ArrayDataset] | None:
        """The split final metrics are computed on: test if there is one, else val."""
        if self.test is not None:
            return "test", self.test
        if self.val is not None:
            return "val", self.val
        return None


@dataclass
class _Loaded:
    """One file's contents before splitting."""

    kind: str
    train: ArrayDataset
    test: ArrayDataset | None
    num_classes: int
    class_names: list[str] | None  # names the file itself gives (folders, npz class_names)


# ---------------------------------------------------------------------------------------- npz


def _to_tensor(array: np.ndarray, layout: Layout) -> torch.Tensor:
    if array.dtype != np.uint8:
        # float16/64 and non-native byte orders all become native float32, what the models take.
        array = array.astype(np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if layout == "nhw":
        return tensor.unsqueeze(1)
    if layout == "nhwc":
        return tensor.permute(0, 3, 1, 2).contiguous()
    return tensor


def _read_x(zf: zipfile.ZipFile, header: NpyHeader) -> torch.Tensor:
    tensor = _to_tensor(read_npy(zf, header), x_layout(header))
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise BadInputError(f"{header.key} contains NaN or infinite values")
    return tensor


def _check_decoded(nbytes: int, limits: ArchiveLimits, what: str, advice: str) -> None:
    if nbytes > limits.max_decoded_bytes:
        raise ResourceLimitError(
            f"{what} take {nbytes:,} bytes in memory, more than the limit of {limits.max_decoded_bytes:,} "
            f"(max_dataset_bytes, set by DISTILLERY_MAX_DATASET_BYTES); {advice}",
            field="data.train",
        )


def _npz_bytes(header: NpyHeader) -> int:
    # Everything but uint8 becomes float32 (`_to_tensor`).
    return header.count * (1 if header.dtype == np.uint8 else 4)


def _load_npz(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], limits: ArchiveLimits = DEFAULT_LIMITS) -> _Loaded:
    contents = inspect_npz(zf, infos)
    splits = [s.x for s in (contents.train, contents.test) if s is not None]
    _check_decoded(sum(_npz_bytes(x) for x in splits), limits, "the npz samples", "use fewer samples")
    train = ArrayDataset(_read_x(zf, contents.train.x), torch.from_numpy(contents.train.y))
    test = None
    if contents.test is not None:
        test = ArrayDataset(_read_x(zf, contents.test.x), torch.from_numpy(contents.test.y))
    return _Loaded("npz", train, test, contents.num_classes, contents.class_names)


def _load_npz_test_file(zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> _Loaded:
    """A separate test npz may hold x_test/y_test (preferred) or just x_train/y_train, or both."""
    headers = read_npz_headers(zf, infos)
    if "x_test" in headers and "y_test" in headers:
        x_key, y_key = "x_test", "y_test"
    elif "x_train" in headers and "y_train" in headers:
        x_key, y_key = "x_train", "y_train"
    else:
        raise BadInputError(f"test npz needs x_test and y_test; it holds: {', '.join(sorted(headers)) or 'nothing'}")
    x_header, y_header = headers[x_key], headers[y_key]
    x_layout(x_header)
    y = check_labels(y_key, read_npy(zf, y_header))
    if len(y) != x_header.shape[0]:
        raise BadInputError(f"{x_key} has {x_header.shape[0]} samples but {y_key} has {len(y)}")
    dataset = ArrayDataset(_read_x(zf, x_header), torch.from_numpy(y))
    num_classes = int(y.max()) + 1 if y.size else 0
    return _Loaded("npz", dataset, None, num_classes, None)


# -------------------------------------------------------------------------------- ImageFolder


def _gray_uint8(image: Any) -> Any:
    """16-bit and float grayscale → 8-bit L; PIL's own convert would clip instead of scale."""
    from PIL import Image

    if image.mode.startswith("I;16") or (image.mode == "I" and np.asarray(image).max() > 255):
        array = np.asarray(image, dtype=np.float64) / 257.0
    elif image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
    else:
        return image.convert("L")
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))  # 2-D uint8 -> mode L


def _decode(data: bytes, name: str, *, size: int | None, mode: str | None, max_pixels: int) -> np.ndarray:
    """One image → HxW (grayscale) or HxWx3 uint8; `mode` forces L or RGB, else the image decides."""
    from PIL import Image

    image = open_image(data, name, max_pixels=max_pixels)
    try:
        target = mode or ("L" if is_gray(image) else "RGB")
        if target == "L":
            image = _gray_uint8(image) if image.mode in GRAY_MODES else image.convert("L")
        else:
            image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadInputError(f"archive member {name!r} cannot be decoded: {exc}") from None


def _decode_all(
    zf: zipfile.ZipFile,
    items: list[tuple[zipfile.ZipInfo, int]],
    *,
    size: int | None,
    mode: str | None,
    limits: ArchiveLimits,
) -> list[np.ndarray]:
    # The zip is read in this thread (ZipFile is not meant for concurrent reads); PIL decodes in threads.
    workers = max(1, min(8, os.cpu_count() or 1))
    decoded: list[np.ndarray] = []
    total = projected = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(items), _DECODE_CHUNK):
            chunk = [info for info, _ in items[start : start + _DECODE_CHUNK]]
            blobs = [read_member(zf, info) for info in chunk]
            # Counted from each image's header before any pixel is decoded (or resized up).
            for blob, info in zip(blobs, chunk, strict=True):
                projected += _decoded_size(blob, info.filename, size=size, mode=mode, limits=limits)
                _check_decoded(projected, limits, f"the images up to {info.filename!r}",
                               "use fewer or smaller images, or set data.image_size to a smaller size")
            arrays = list(
                pool.map(
                    lambda blob, info: _decode(
                        blob, info.filename, size=size, mode=mode, max_pixels=limits.max_image_pixels
                    ),
                    blobs,
                    chunk,
                )
            )
            decoded.extend(arrays)
            # Images compress well, so the zip's own size limits do not bound the decoded pixels.
            total += sum(a.nbytes for a in arrays)
            if total > limits.max_decoded_bytes:
                raise BadInputError(
                    f"the images decode to more than {limits.max_decoded_bytes} bytes (limit reached at "
                    f"{chunk[-1].filename!r}); set data.image_size to a smaller size"
                )
    return decoded


def _decoded_size(blob: bytes, name: str, *, size: int | None, mode: str | None, limits: ArchiveLimits) -> int:
    """Bytes one image will take once decoded (and resized), from its header alone."""
    image = open_image(blob, name, max_pixels=limits.max_image_pixels)
    width, height = (size, size) if size is not None else image.size
    channels = 1 if (mode or ("L" if is_gray(image) else "RGB")) == "L" else 3
    return int(width) * int(height) * channels


def _stack_images(
    arrays: list[np.ndarray], items: list[tuple[zipfile.ZipInfo, int]], channels: int, limits: ArchiveLimits
) -> torch.Tensor:
    height, width = arrays[0].shape[:2]
    for array, (info, _) in zip(arrays, items, strict=True):
        if array.shape[:2] != (height, width):
            raise BadInputError(
                f"images differ in size: {items[0][0].filename!r} is {width}x{height} but "
                f"{info.filename!r} is {array.shape[1]}x{array.shape[0]}"
                "; set data.image_size to resize them all"
            )
    total = len(arrays) * channels * height * width
    if total > limits.max_decoded_bytes:
        raise BadInputError(
            f"{len(arrays)} images of {width}x{height}x{channels} take {total} bytes, more than the limit of "
            f"{limits.max_decoded_bytes}; set data.image_size to a smaller size"
        )
    out = np.empty((len(arrays), height, width, channels), dtype=np.uint8)
    for i, array in enumerate(arrays):
        out[i] = array[..., None] if array.ndim == 2 else array  # H x W x 1 broadcasts to 3 channels
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _image_split(
    zf: zipfile.ZipFile,
    items: list[tuple[zipfile.ZipInfo, int]],
    *,
    size: int | None,
    channels: int | None,
    limits: ArchiveLimits,
) -> ArrayDataset:
    mode = None if channels is None else ("L" if channels == 1 else "RGB")
    arrays = _decode_all(zf, items, size=size, mode=mode, limits=limits)
    if channels is None:
        # All grayscale → one channel; any colour image → everything RGB (gray ones broadcast when stacked).
        channels = 1 if all(a.ndim == 2 for a in arrays) else 3
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return ArrayDataset(_stack_images(arrays, items, channels, limits), labels)


def _load_imagefolder(
    zf: zipfile.ZipFile,
    listing: ImageFolderListing,
    *,
    size: int | None,
    channels: int | None,
    limits: ArchiveLimits,
) -> _Loaded:
    train = _image_split(zf, listing.train, size=size, channels=channels, limits=limits)
    test = None
    if listing.test is not None:
        # The test split follows the train split's channels so both have one sample shape.
        test = _image_split(zf, listing.test, size=size, channels=int(train.x.shape[1]), limits=limits)
        if test.x.shape[1:] != train.x.shape[1:]:
            raise BadInputError(
                f"test/ images are {tuple(test.x.shape[1:])} but train/ images are "
                f"{tuple(train.x.shape[1:])}; set data.image_size to resize them all"
            )
    return _Loaded("imagefolder", train, test, len(listing.class_names), listing.class_names)


# ------------------------------------------------------------------------------------- files


def _load_train_file(path: Path, spec: DataSpec, limits: ArchiveLimits) -> _Loaded:
    with open_zip(path, what="data.train", limits=limits) as zf:
        infos = check_zip(zf, limits)
        if detect_kind(infos) == "npz":
            loaded = _load_npz(zf, infos, limits)
        else:
            loaded = _load_imagefolder(zf, list_imagefolder(infos), size=spec.image_size, channels=None, limits=limits)
    if loaded.kind == "npz" and spec.image_size is not None:
        resized = [d for d in (loaded.train, loaded.test) if d is not None]
        _check_decoded(sum(_resized_bytes(d, spec.image_size) for d in resized), limits,
                       f"the samples resized to data.image_size {spec.image_size}", "choose a smaller image size")
        loaded.train = _resize_dataset(loaded.train, spec.image_size)
        loaded.test = _resize_dataset(loaded.test, spec.image_size) if loaded.test is not None else None
    return loaded


def _load_test_file(path: Path, spec: DataSpec, limits: ArchiveLimits, train: ArrayDataset) -> _Loaded:
    with open_zip(path, what="data.test", limits=limits) as zf:
        infos = check_zip(zf, limits)
        if detect_kind(infos) == "npz":
            loaded = _load_npz_test_file(zf, infos)
        else:
            listing = list_imagefolder(infos)
            if listing.test is not None:  # a full dataset zip given as the test set: use its test/ split
                listing = ImageFolderListing(listing.class_names, listing.test, None, listing.ignored)
            loaded = _load_imagefolder(
                zf, listing, size=spec.image_size, channels=_image_channels(train), limits=limits
            )
    if loaded.kind == "npz" and spec.image_size is not None:
        _check_decoded(_resized_bytes(loaded.train, spec.image_size), limits,
                       f"the test samples resized to data.image_size {spec.image_size}", "choose a smaller image size")
        loaded.train = _resize_dataset(loaded.train, spec.image_size)
    return loaded


def _image_channels(dataset: ArrayDataset) -> int | None:
    return int(dataset.x.shape[1]) if dataset.x.ndim == 4 and dataset.x.shape[1] in (1, 3) else None


def _resized_bytes(dataset: ArrayDataset, size: int) -> int:
    x = dataset.x
    if x.ndim != 4:
        return int(x.nelement() * x.element_size())
    return int(x.shape[0] * x.shape[1] * size * size * x.element_size())


def _resize_dataset(dataset: ArrayDataset, size: int) -> ArrayDataset:
    """npz images resized like ImageFolder ones (bilinear, antialiased): USPS 16x16 for a 28x28 teacher."""
    x = dataset.x
    if x.ndim != 4 or tuple(x.shape[2:]) == (size, size):
        return dataset
    # The float32 working set of a step is bounded in bytes, whatever the sizes in and out.
    per_image = 4 * int(x.shape[1]) * max(size * size, int(x.shape[2]) * int(x.shape[3]))
    step = max(1, _RESIZE_CHUNK_BYTES // per_image)
    chunks = []
    for start in range(0, x.shape[0], step):
        part = x[start : start + step].to(torch.float32)
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if x.dtype == torch.uint8:
            part = part.round_().clamp_(0, 255).to(torch.uint8)
        chunks.append(part)
    return ArrayDataset(torch.cat(chunks), dataset.y)


def _remap_test_labels(test: _Loaded, class_names: list[str]) -> torch.Tensor:
    """Test labels in the train file's label space: by folder name when the test file has names."""
    if test.class_names is None:
        return test.train.y
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(test.class_names) - set(index))
    if unknown:
        raise MismatchError(
            f"test classes {', '.join(unknown[:5])} are not among the training classes", field="data.test"
        )
    mapping = torch.tensor([index[name] for name in test.class_names], dtype=torch.int64)
    return mapping[test.train.y]


def _check_same_samples(train: ArrayDataset, test: ArrayDataset) -> None:
    if train.x.shape[1:] != test.x.shape[1:]:
        raise MismatchError(
            f"test samples have shape {tuple(test.x.shape[1:])} but training samples have {tuple(train.x.shape[1:])}",
            field="data.test",
        )
    if (train.x.dtype == torch.uint8) != (test.x.dtype == torch.uint8):
        raise MismatchError(
            f"test samples are {test.x.dtype} but training samples are {train.x.dtype}: both must be uint8 "
            "images or both float",
            field="data.test",
        )


# ------------------------------------------------------------------------------------ splits


def split_indices(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified (train, val) index split; both sorted, disjoint, covering all of y.

    Each class gives val close to `val_fraction` of its samples, and the total is exactly
    round(N * val_fraction) (at least 1, at most N - 1).
    """
    n = len(y)
    if val_fraction <= 0:
        return np.arange(n), np.arange(0)
    if n < 2:
        raise BadInputError(f"{n} training sample(s) cannot spare a validation split; set data.val_fraction to 0")
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    labels = y[perm]
    counts = np.bincount(labels)
    order = np.argsort(labels, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - (np.cumsum(counts) - counts)[labels[order]]
    # A sample's position within its class, as a fraction: taking the lowest fractions first
    # takes every class in proportion; ties fall to the random permutation's order.
    position = (rank + 0.5) / counts[labels]
    val_mask = np.zeros(n, dtype=bool)
    val_mask[perm[np.argsort(position, kind="stable")[:n_val]]] = True
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def _subset(dataset: ArrayDataset, indices: np.ndarray) -> ArrayDataset:
    index = torch.from_numpy(indices)
    return ArrayDataset(dataset.x[index], dataset.y[index])


# -------------------------------------------------------------------------------------- entry


def load_data(
    spec: DataSpec,
    *,
    train_path: Path,
    test_path: Path | None = None,
    seed: int = 0,
    limits: ArchiveLimits | None = None,
) -> DataBundle:
    """Load, validate and split a job's data; raise BadInputError / MismatchError naming the problem."""
    limits = limits or DEFAULT_LIMITS
    try:
        loaded = _load_train_file(Path(train_path), spec, limits)
    except BadInputError as exc:
        refuse_a_teacher(train_path, field=exc.field or "data.train")  # the teacher given as data: say so
        raise
    test = loaded.test
    test_origin: Literal["file", "archive"] | None = "archive" if test is not None else None
    num_classes, class_names = loaded.num_classes, loaded.class_names
    if test_path is not None:
        test_file = _load_test_file(Path(test_path), spec, limits, loaded.train)
        _check_same_samples(loaded.train, test_file.train)
        labels = _remap_test_labels(test_file, class_names or [str(i) for i in range(num_classes)])
        test, test_origin = ArrayDataset(test_file.train.x, labels), "file"
        if class_names is None:
            num_classes = max(num_classes, int(labels.max()) + 1 if len(labels) else 0)
        elif len(labels) and int(labels.max()) >= num_classes:
            raise MismatchError(
                f"test labels go up to {int(labels.max())} but the training data has {num_classes} classes",
                field="data.test",
            )
    train_idx, val_idx = split_indices(loaded.train.y.numpy(), spec.val_fraction, seed)
    train = _subset(loaded.train, train_idx) if len(val_idx) else loaded.train
    val = _subset(loaded.train, val_idx) if len(val_idx) else None
    input_shape = tuple(int(d) for d in train.x.shape[1:])
    names = class_names or [str(i) for i in range(num_classes)]
    bundle = DataBundle(
        train=train,
        val=val,
        test=test,
        input_shape=input_shape,
        num_classes=num_classes,
        class_names=names,
        source="",
        preprocess=Preprocess(spec.normalize.mean, spec.normalize.std, input_shape),
        test_origin=test_origin,
    )
    bundle.source = _describe(bundle, loaded.kind, Path(train_path), test_path)
    return bundle


def _describe(bundle: DataBundle, kind: str, train_path: Path, test_path: Path | None) -> str:
    dims = "x".join(str(d) for d in bundle.input_shape)
    dtype = str(bundle.train.x.dtype).removeprefix("torch.")
    if bundle.test is None:
        test = "no test split (evaluated on val)"
    elif test_path is not None:
        test = f"{len(bundle.test)} test from {Path(test_path).name}"
    else:
        test = f"{len(bundle.test)} test from the same file"
    val = len(bundle.val) if bundle.val is not None else 0
    return (
        f"{kind} {train_path.name}: {len(bundle.train)} train, {val} val, {test}; "
        f"samples {dims} {dtype}, {bundle.num_classes} classes"
    )


def check_labels_fit(bundle: DataBundle, num_outputs: int) -> None:
    """Refuse data whose labels the teacher cannot predict (a label index beyond its outputs)."""
    splits = [s for s in (bundle.train, bundle.val, bundle.test) if s is not None and len(s)]
    max_label = max(int(s.y.max()) for s in splits) if splits else -1
    if max_label >= num_outputs:
        raise MismatchError(
            f"the teacher has {num_outputs} outputs, the data {max_label + 1} classes: labels go up to {max_label} "
            f"but the teacher has {num_outputs} outputs", field="data.train"
        )
