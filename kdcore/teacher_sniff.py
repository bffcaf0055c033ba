"""Cheap, torch-free inspection of an uploaded teacher file.

The API calls `sniff_teacher` on every teacher upload, so this module must never import torch
(not even indirectly) and never execute anything from the file: it reads the safetensors
header, parses the ONNX protobuf without external data, and lists zip entries. Unpickling
is left to the worker (`kdcore.teacher`), which does it with `torch.load(weights_only=True)`.

The format is decided from the content only; the file name is user-controlled and says nothing.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeGuard

from pydantic import BaseModel, Field

from kdcore.archive import DEFAULT_LIMITS, ArchiveLimits, check_central_directory
from kdcore.errors import BadInputError
from kdcore.hf_sniff import HfInfo, is_hf_folder, sniff_hf_zip
from kdcore.onnx_sniff import MAX_ONNX_BYTES, OnnxFacts, is_onnx_zip, sniff_onnx_file, sniff_onnx_zip

SniffedFormat = Literal["safetensors", "onnx", "state_dict", "torchscript", "exported", "hf"]

#: The operator setting that lets TorchScript and torch.export teachers (which carry code) load.
ALLOW_CODE_SETTING = "DISTILLERY_ALLOW_CODE_TEACHERS"

DEFAULT_MAX_BYTES = 4 * 2**30
#: The safetensors library refuses larger headers too; it also bounds what we json-parse.
MAX_SAFETENSORS_HEADER = 100_000_000

_FIELD = "teacher.file"

# Bytes per element of the dtypes `safetensors.torch` can load.
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

_NUMBER_RUN = re.compile(r"(\d+)")


class TeacherInfo(BaseModel):
    """What a teacher file is, as far as can be told without loading it."""

    format: SniffedFormat = Field(description="Detected storage format.")
    output_size: int | None = Field(default=None, description="Number of logits, when the file says so.")
    input_shape: list[int | None] | None = Field(
        default=None, description="Shape of one sample (no batch axis); None entries are symbolic."
    )
    num_tensors: int | None = Field(default=None, description="Number of stored tensors, if cheap to count.")
    details: str = Field(default="", description="One human-readable line about the file.")
    hf: HfInfo | None = Field(default=None, description="Hugging Face model folders: what their config says.")
    onnx: OnnxFacts | None = Field(default=None, description="ONNX models: parameters, weight bytes, zip members.")


def sniff_teacher(
    path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES, archive_limits: ArchiveLimits | None = None
) -> TeacherInfo:
    """Detect a teacher file's format from its content; raise BadInputError when it is none we accept."""
    path = Path(path)
    size = _file_size(path)
    if size == 0:
        raise BadInputError("not a teacher model: empty file", field=_FIELD)
    if size > max_bytes:
        raise BadInputError(f"file larger than the limit ({size} > {max_bytes} bytes)", field=_FIELD)
    with path.open("rb") as handle:
        head = handle.read(16)

    if _looks_like_safetensors(head):
        return _sniff_safetensors(path, size, head)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _sniff_torch_zip(path, archive_limits or DEFAULT_LIMITS)
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        # A raw pickle (torch's legacy format, or pickle.dumps). Never unpickled here: the worker
        # loads it with weights_only=True, which refuses anything but tensors and containers.
        details = f"raw pickle (protocol {head[1]}), as torch.save's legacy format writes"
        return TeacherInfo(format="state_dict", details=details)
    return _sniff_onnx_or_fail(path, size, head)


def _file_size(path: Path) -> int:
    try:
        if not path.is_file():
            raise BadInputError(f"teacher file {path.name!r} is missing or not a regular file", field=_FIELD)
        return path.stat().st_size
    except OSError as exc:
        raise BadInputError(f"cannot read teacher file {path.name!r}: {exc.strerror}", field=_FIELD) from None


# --- safetensors -------------------------------------------------------------------------------


def _looks_like_safetensors(head: bytes) -> bool:
    """8-byte little-endian header length, then a JSON object."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 2 <= header_len <= MAX_SAFETENSORS_HEADER


def _sniff_safetensors(path: Path, size: int, head: bytes) -> TeacherInfo:
    (header_len,) = struct.unpack("<Q", head[:8])
    if 8 + header_len > size:
        raise _corrupt_safetensors(f"header says {header_len} bytes but the file has {size - 8}")
    with path.open("rb") as handle:
        handle.seek(8)
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _corrupt_safetensors(f"header is not valid JSON ({exc})") from None
    except RecursionError:
        raise _corrupt_safetensors("header nests too deeply to be a tensor index") from None
    if not isinstance(header, dict):
        raise _corrupt_safetensors("header is not a JSON object")
    header.pop("__metadata__", None)
    shapes = _check_safetensors_entries(header, data_len=size - 8 - header_len)
    output_size = guess_output_size(shapes)
    details = f"safetensors with {len(shapes)} tensors"
    if output_size is not None:
        details += f"; last 2-D weight has {output_size} rows"
    return TeacherInfo(
        format="safetensors", output_size=output_size, num_tensors=len(shapes), details=details
    )


def _check_safetensors_entries(header: dict[str, Any], *, data_len: int) -> dict[str, list[int]]:
    """Validate every entry as the safetensors library would: the tensors tile the data exactly."""
    spans: list[tuple[int, int, str]] = []
    shapes: dict[str, list[int]] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _corrupt_safetensors(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _SAFETENSORS_DTYPE_BYTES:
            raise _corrupt_safetensors(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not _is_int_list(shape, length=None) or any(dim < 0 for dim in shape):
            raise _corrupt_safetensors(f"tensor {name!r} has an invalid shape {shape!r}")
        if not _is_int_list(offsets, length=2) or not 0 <= offsets[0] <= offsets[1]:
            raise _corrupt_safetensors(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        numel = 1
        for dim in shape:
            numel *= dim
        if offsets[1] - offsets[0] != numel * _SAFETENSORS_DTYPE_BYTES[dtype]:
            raise _corrupt_safetensors(f"tensor {name!r}: data_offsets do not match its shape and dtype")
        spans.append((offsets[0], offsets[1], name))
        shapes[name] = list(shape)
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise _corrupt_safetensors(f"tensor {name!r} overlaps another or leaves a gap")
        end = stop
    if end != data_len:
        raise _corrupt_safetensors(f"tensors need {end} bytes of data but the file holds {data_len}")
    return shapes


def _is_int_list(value: Any, *, length: int | None) -> TypeGuard[list[int]]:
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(isinstance(item, int) and not isinstance(item, bool) for item in value)
    )


def _corrupt_safetensors(reason: str) -> BadInputError:
    return BadInputError(f"corrupt or truncated safetensors: {reason}", field=_FIELD)


def guess_output_size(shapes: dict[str, list[int]]) -> int | None:
    """Guess the number of logits from tensor names and shapes alone (no architecture known).

    Heuristic: among tensors named `*.weight` (or `weight`) with exactly two dimensions, take the
    one that sorts last in *natural* name order (digit runs compare as numbers, so `layers.10`
    comes after `layers.2`) and return its first dimension, the out_features of an nn.Linear.
    Classifier heads are the last linear layer in nearly every registry architecture
    (`5.weight` of an MLP, `head.2.weight`, `fc.weight`). Returns None when no tensor qualifies;
    the worker's one-batch check is the authority either way.
    """
    candidates = [
        name for name, shape in shapes.items()
        if (name == "weight" or name.endswith(".weight")) and len(shape) == 2
    ]
    if not candidates:
        return None
    last = max(candidates, key=_natural_key)
    return shapes[last][0] or None


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    # Tag each part so numbers and strings never compare with each other.
    return [(0, int(part)) if part.isdigit() else (1, part) for part in _NUMBER_RUN.split(name) if part]


# --- zip-based torch files -----------------------------------------------------------------------


def _sniff_torch_zip(path: Path, limits: ArchiveLimits) -> TeacherInfo:
    """Tell TorchScript, torch.export (.pt2) and torch.save archives apart by their entries.

    Every torch archive puts its records under one top folder (`<name>/...`); the markers, as
    written by torch 2.x: TorchScript has `code/` sources and `constants.pkl`; a .pt2 has an
    `archive_format` record (containing "pt2") and serialized programs under `models/*.json`;
    a torch.save archive has `data.pkl` and neither of those.
    """
    # The same directory limits as dataset zips: counted from the end record before zipfile parses it.
    try:
        check_central_directory(path, limits, what="the teacher file")
    except BadInputError as exc:
        raise BadInputError(exc.message, field=_FIELD) from None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if is_hf_folder(names):
                return _hf_info(sniff_hf_zip(archive))
            if is_onnx_zip(names):
                return _onnx_teacher_info(sniff_onnx_zip(archive, limits))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BadInputError(f"corrupt or truncated zip archive ({exc})", field=_FIELD) from None
    if len(names) > limits.max_members:
        raise BadInputError(
            f"the teacher file is a zip of {len(names)} members, more than the limit of {limits.max_members}",
            field=_FIELD,
        )
    records = {_strip_top_folder(name) for name in names}

    if "constants.pkl" in records and any(record.startswith("code/") for record in records):
        return TeacherInfo(format="torchscript", details=f"TorchScript archive with {len(names)} records")
    if "archive_format" in records or any(_is_pt2_model(record) for record in records):
        weights = sum(1 for record in records if record.startswith("data/weights/") and "." not in record)
        return TeacherInfo(
            format="exported", num_tensors=weights or None,
            details=f"torch.export program (.pt2) with {len(names)} records",
        )
    if "data.pkl" in records:
        storages = sum(1 for record in records if record.startswith("data/"))
        return TeacherInfo(format="state_dict", details=f"torch.save archive with {storages} storages")
    if (dataset := looks_like_dataset(names)) is not None:
        raise BadInputError(
            f"this looks like a dataset ({dataset}), not a teacher model: give it as data.train (uploaded with "
            "purpose dataset) and the trained model as teacher.file", field=_FIELD)
    raise BadInputError(
        "not a teacher model: file starts with b'PK' (a zip archive) but has no TorchScript, "
        ".pt2, torch.save, ONNX or Hugging Face layout",
        field=_FIELD,
    )


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def looks_like_dataset(names: list[str]) -> str | None:
    """What kind of dataset a zip's listing suggests (an .npz, an ImageFolder zip), or None."""
    files = [name for name in names if not name.endswith("/")]
    arrays = [name for name in files if name.endswith(".npy")]
    if arrays and len(arrays) == len(files):
        shown = ", ".join(name.removesuffix(".npy") for name in sorted(arrays)[:4])
        return f"an .npz of arrays {shown}"
    images = [name for name in files if name.lower().endswith(_IMAGE_SUFFIXES)]
    if images and len(images) >= len(files) / 2:
        folders = {PurePosixPath(name).parent.name for name in images}
        return f"an ImageFolder zip of {len(images)} images in {len(folders)} folders"
    return None


def _hf_info(info: HfInfo) -> TeacherInfo:
    layers = f", {info.num_layers} layers" if info.num_layers else ""
    width = f" x {info.hidden_size}" if info.hidden_size else ""
    head = f", classifier over {len(info.labels)} labels" if info.labels else (
        ", no classification head (one is added)" if info.task == "text_classification" else "")
    return TeacherInfo(
        format="hf", output_size=len(info.labels) if info.labels else None, num_tensors=None, hf=info,
        details=f"Hugging Face {info.model_type} ({info.task}){layers}{width}, {info.params / 1e6:.1f}M "
        f"parameters{head}",
    )


def _strip_top_folder(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def _is_pt2_model(record: str) -> bool:
    return record.startswith("models/") and record.endswith(".json")


# --- ONNX ------------------------------------------------------------------------------------------


def _sniff_onnx_or_fail(path: Path, size: int, head: bytes) -> TeacherInfo:
    """Last resort: try to parse a protobuf ModelProto. Anything else is not a teacher."""
    # Serializers write fields in number order, so a ModelProto starts with ir_version (tag 0x08).
    claims_onnx = head[:1] == b"\x08"
    facts = sniff_onnx_file(path, size)
    if facts is None:
        if claims_onnx and size <= MAX_ONNX_BYTES:
            raise BadInputError("corrupt or truncated ONNX model (the protobuf does not parse)", field=_FIELD)
        raise _unknown_format(head)
    return _onnx_teacher_info(facts)


def _onnx_teacher_info(facts: OnnxFacts) -> TeacherInfo:
    return TeacherInfo(format="onnx", output_size=facts.output_size, input_shape=facts.input_shape,
                       num_tensors=facts.num_tensors, details=facts.details, onnx=facts)


def _unknown_format(head: bytes) -> BadInputError:
    return BadInputError(
        f"not a teacher model: file starts with {head[:8]!r}, which is none of safetensors, ONNX, "
        "TorchScript, .pt2 or a torch.save state_dict",
        field=_FIELD,
    )
