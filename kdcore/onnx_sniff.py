"""Torch-free inspection of ONNX teachers: a single-file model, or a .zip of a model and its external data.

Exporters write models over 2 GiB (and, on recent torch, many smaller ones) as `model.onnx` plus data
files that the graph names by relative path. Those paths are the uploader's choice, so a bare model
that refers to them is refused (the data did not come with it), and a zip is accepted only when every
path a tensor names is a checked member of the same zip, inside the model's folder, and every byte
range it names lies within that member. The protobuf is parsed without loading the data.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, Field

from kdcore.archive import ArchiveLimits, check_name, check_zip, read_member
from kdcore.errors import BadInputError

#: Protobuf cannot hold more than 2 GiB, so a larger file cannot be a single-file ONNX model.
MAX_ONNX_BYTES = 2 * 2**30
_FIELD = "teacher.file"
# TensorProto data types: bytes per element, and which of them are trainable weights.
_DTYPE_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
_FLOAT_TYPES = {1, 10, 11, 16}
_ZIP_HOWTO = ("zip the model with its data files, e.g. `zip teacher.zip teacher.onnx teacher.onnx.data`, and "
              "upload the .zip; or export one self-contained file (torch.onnx.export(..., external_data=False), "
              "for models under 2 GB)")


class OnnxFacts(BaseModel):
    """What an ONNX teacher declares, from its graph alone."""

    output_size: int | None = None
    input_shape: list[int | None] | None = None
    num_tensors: int = 0
    parameters: int = Field(default=0, description="Elements of the floating-point initializers.")
    weight_bytes: int = Field(default=0, description="Bytes of every initializer (external data included).")
    details: str = ""
    archive_member: str | None = Field(default=None, description="The model's member, when it came as a zip.")
    data_members: list[str] = Field(default_factory=list, description="Members holding its external data.")


def sniff_onnx_file(path: Path, size: int) -> OnnxFacts | None:
    """The facts of a single-file ONNX model, or None when the bytes are no ModelProto."""
    if size > MAX_ONNX_BYTES:
        return None
    model = _parse(path.read_bytes())
    if model is None:
        return None
    external = sorted({_location(tensor) for tensor in all_tensors(model.graph) if uses_external_data(tensor)})
    if external:
        # External data would be read from paths the uploader chose: refuse rather than resolve them.
        raise BadInputError(
            f"this ONNX model keeps its weights in external data files ({', '.join(external[:3])}), which did not "
            f"come with it; {_ZIP_HOWTO}", field=_FIELD)
    return _facts(model, details=_describe(model))


def is_onnx_zip(names: list[str]) -> bool:
    return any(_is_model_name(name) for name in names)


def sniff_onnx_zip(archive: zipfile.ZipFile, limits: ArchiveLimits) -> OnnxFacts:
    """A zip of one .onnx model and the data files it names, every member checked like any archive's."""
    try:
        infos = {info.filename: info for info in check_zip(archive, limits) if not info.is_dir()}
    except BadInputError as exc:
        raise BadInputError(exc.message, field=_FIELD) from None
    models = sorted(name for name in infos if _is_model_name(name))
    if len(models) != 1:
        raise BadInputError(f"the zip holds {len(models)} .onnx models ({', '.join(models[:3])}); put exactly one "
                            "model in it, with its data files beside it", field=_FIELD)
    member = models[0]
    if infos[member].file_size > MAX_ONNX_BYTES:
        raise BadInputError(f"{member} is larger than an ONNX protobuf can be (2 GiB)", field=_FIELD)
    model = _parse(read_member(archive, infos[member]))
    if model is None:
        raise BadInputError(f"{member} in the zip is not an ONNX model (the protobuf does not parse)", field=_FIELD)
    folder = PurePosixPath(member).parent
    data: set[str] = set()
    for tensor in all_tensors(model.graph):
        if uses_external_data(tensor):
            data.add(_check_external(tensor, folder, infos))
    details = f"{_describe(model)}, from a zip of {member}"
    details += f" and {len(data)} data file(s)" if data else " (no external data)"
    return _facts(model, details=details, archive_member=member, data_members=sorted(data))


def _check_external(tensor: Any, folder: PurePosixPath, infos: dict[str, zipfile.ZipInfo]) -> str:
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    try:
        relative = check_name(location)
    except BadInputError as exc:
        raise BadInputError(f"tensor {tensor.name!r} names its data file unsafely: {exc.message}",
                            field=_FIELD) from None
    name = str(folder / relative) if str(folder) != "." else str(relative)
    info = infos.get(name)
    if info is None:
        raise BadInputError(f"tensor {tensor.name!r} keeps its data in {location!r}, which is not in the zip; "
                            "zip the model together with every data file the export wrote", field=_FIELD)
    offset, length = int(entries.get("offset") or 0), entries.get("length")
    needed = _elements(tensor) * _DTYPE_BYTES.get(tensor.data_type, 1)
    end = offset + (int(length) if length is not None else needed)
    if offset < 0 or end > info.file_size:
        raise BadInputError(f"tensor {tensor.name!r} reads bytes {offset}..{end} of {name}, which holds "
                            f"{info.file_size}: the data file is truncated or belongs to another export",
                            field=_FIELD)
    return name


def _facts(model: Any, **extra: Any) -> OnnxFacts:
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    # Older exporters list the initializers among the graph inputs; only the rest are fed.
    inputs = [value for value in graph.input if value.name not in initializers]
    input_dims = _dims(inputs[0]) if inputs else None
    output_dims = _dims(graph.output[0])
    return OnnxFacts(
        output_size=output_dims[-1] if output_dims and len(output_dims) == 2 else None,
        input_shape=input_dims[1:] if input_dims else None,
        num_tensors=len(graph.initializer),
        parameters=sum(_elements(t) for t in graph.initializer if t.data_type in _FLOAT_TYPES),
        weight_bytes=sum(_elements(t) * _DTYPE_BYTES.get(t.data_type, 1) for t in graph.initializer),
        **extra,
    )


def _describe(model: Any) -> str:
    return f"ONNX model (opset {max(op.version for op in model.opset_import)})"


def _parse(raw: bytes) -> Any:
    import onnx  # protobuf only, no torch; imported here so plain safetensors sniffing stays light

    try:
        model = onnx.load_model_from_string(raw)
    except Exception:  # protobuf's DecodeError and friends: the bytes are not a ModelProto
        return None
    # Random bytes occasionally decode as a protobuf; a real model has a version, an opset and a graph.
    if model.ir_version > 0 and len(model.opset_import) > 0 and len(model.graph.output) > 0:
        return model
    return None


def _is_model_name(name: str) -> bool:
    return name.lower().endswith(".onnx") and not name.startswith("__MACOSX/")


def _location(tensor: Any) -> str:
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), "?")


def _elements(tensor: Any) -> int:
    return math.prod(int(d) for d in tensor.dims)


def all_tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph holds: initializers (dense and sparse), and those in node attributes
    (`Constant` values, `ConstantOfShape` fills, ...), subgraphs (If, Loop, Scan) included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor.values
                yield attribute.sparse_tensor.indices
            for sparse in attribute.sparse_tensors:
                yield sparse.values
                yield sparse.indices
            if attribute.HasField("g"):
                yield from all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from all_tensors(subgraph)


def uses_external_data(tensor: Any) -> bool:
    return bool(tensor.data_location == 1 or len(tensor.external_data) > 0)  # 1 = TensorProto.EXTERNAL


def _dims(value: Any) -> list[int | None] | None:
    """Dimensions of a graph input/output: ints where fixed, None where symbolic or unknown."""
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
