"""Resource limits in the engine: each attack of the hardening issue, refused before the work it would cost."""

from __future__ import annotations

import io
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from kdcore.archive import ArchiveLimits, check_central_directory, open_zip
from kdcore.budget import check_student_budget
from kdcore.data import load_data
from kdcore.data_sniff import sniff_dataset
from kdcore.errors import BadInputError
from kdcore.limits import (
    ResourceLimitError,
    ResourceLimits,
    dataset_bytes,
    hf_student_parameters_floor,
    mlp_parameters,
    student_parameters,
)
from kdcore.spec import DataSpec
from kdcore.teacher import _load_onnx
from kdcore.teacher_sniff import sniff_teacher

MiB = 2**20


def _npz(path: Path, count: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    np.savez_compressed(path, x_train=rng.integers(0, 255, (count, size, size), dtype=np.uint8),
                        y_train=np.arange(count) % 2)
    return path


def _png(side: int, value: int = 128) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), value).save(buffer, format="PNG")
    return buffer.getvalue()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_upscaling_a_tiny_npz_is_refused_before_allocating(tmp_path: Path) -> None:
    # The 13 KB npz of 8x8 images asking for image_size 1024: 200 images would be 200 MiB.
    path = _npz(tmp_path / "tiny.npz", 200, 8)
    assert path.stat().st_size < 20_000
    started = time.monotonic()
    with pytest.raises(ResourceLimitError, match=r"resized to data.image_size 1024 take 209,715,200 bytes.*"
                       r"DISTILLERY_MAX_DATASET_BYTES") as caught:
        load_data(DataSpec(train=str(path), image_size=1024, val_fraction=0.0),
                  train_path=path, limits=ArchiveLimits(max_decoded_bytes=100 * MiB))
    assert caught.value.code == "resource_limit" and caught.value.field == "data.train"
    assert time.monotonic() - started < 5


def test_upscaling_within_the_limit_works_in_bounded_steps(tmp_path: Path) -> None:
    path = _npz(tmp_path / "tiny.npz", 40, 8)
    bundle = load_data(DataSpec(train=str(path), image_size=256, val_fraction=0.0), train_path=path)
    assert tuple(bundle.train.x.shape) == (40, 1, 256, 256) and bundle.train.x.dtype == torch.uint8


def test_imagefolder_decoded_size_is_counted_per_image_before_decoding(tmp_path: Path) -> None:
    # Solid 2048x2048 PNGs compress to almost nothing: 8 of them are a few KB that decode to 32 MiB.
    members = {f"{c}/{i}.png": _png(2048) for c in "ab" for i in range(4)}
    path = _zip(tmp_path / "solid.zip", members)
    assert path.stat().st_size < 200_000
    with pytest.raises(ResourceLimitError, match=r"images up to 'a/2.png' take 12,582,912 bytes"):
        load_data(DataSpec(train=str(path), val_fraction=0.0), train_path=path,
                  limits=ArchiveLimits(max_decoded_bytes=10 * MiB))


def test_upload_check_reads_every_image_header_for_the_decoded_size(tmp_path: Path) -> None:
    # The first image is small; the others are not: all headers count, not the first one's.
    members = {"a/0.png": _png(8), "a/1.png": _png(1024), "b/0.png": _png(512)}
    info = sniff_dataset(_zip(tmp_path / "mixed.zip", members))
    assert info.decoded_bytes == 8 * 8 + 1024 * 1024 + 512 * 512
    # What a job would hold: at their own size, or resized.
    assert dataset_bytes(info.model_dump(), None) == info.decoded_bytes
    assert dataset_bytes(info.model_dump(), 32) == 3 * 32 * 32


@pytest.mark.parametrize(
    ("arch", "args"),
    [("mlp", {"hidden": [65536, 65536]}), ("mlp", {"hidden": [65536] * 200}), ("cnn", {"widths": [4096] * 200})],
)
def test_giant_students_are_refused_on_the_meta_device_in_milliseconds(arch: str, args: dict) -> None:
    started = time.monotonic()
    with pytest.raises(ResourceLimitError, match=r"parameter count is [\d,]+, more than the limit of 200,000,000 "
                       r"\(max_model_parameters, set by DISTILLERY_MAX_MODEL_PARAMETERS\)") as caught:
        check_student_budget(arch, args, (1, 28, 28), 10, 128, ResourceLimits())
    assert caught.value.field == "student.arch_args"
    assert time.monotonic() - started < 2


def test_training_memory_estimate_depends_on_the_batch_size() -> None:
    limits = ResourceLimits(max_train_memory_bytes=64 * MiB)
    parameters, small = check_student_budget("cnn", {"widths": [64, 64]}, (3, 32, 32), 10, 8, limits)
    assert parameters > 0
    with pytest.raises(ResourceLimitError, match=r"peak training memory of the student at batch_size 4096") as caught:
        check_student_budget("cnn", {"widths": [64, 64]}, (3, 32, 32), 10, 4096, limits)
    assert caught.value.field == "batch_size"
    assert small < 64 * MiB


def test_mlp_parameter_formula_matches_torch() -> None:
    from kdcore.models import build_model

    model = build_model("mlp", {"hidden": [30, 20]}, (1, 6, 6), 10)
    assert mlp_parameters((1, 6, 6), 10, [30, 20]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("arch", "args", "input_shape"),
    [
        ("cnn", {}, (1, 28, 28)),
        ("cnn", {"widths": [8, 16, 32], "kernel_size": 5, "hidden": 0, "batchnorm": False}, (3, 32, 32)),
        ("cnn", {"widths": [4, 4, 4, 4, 4], "pool_size": 3, "hidden": 7}, (2, 6, 10)),
        ("resnet_small", {}, (3, 32, 32)),
        ("resnet_small", {"depth": 8, "width": 4}, (1, 8, 8)),
    ],
)
def test_cnn_and_resnet_parameter_formulas_match_torch(arch: str, args: dict, input_shape: tuple) -> None:
    # The API refuses giant students with these formulas (no torch there): they must count what torch builds.
    from kdcore.models import build_model

    model = build_model(arch, args, input_shape, 10)
    assert student_parameters(arch, args, input_shape, 10) == sum(p.numel() for p in model.parameters())


def test_architectures_without_a_formula_are_left_to_the_meta_device_count() -> None:
    assert student_parameters("resnet18", {}, (3, 32, 32), 10) is None
    assert student_parameters("cnn", {}, (64,), 10) is None  # the worker names the shape mismatch


def _fake_eocd(path: Path, entries: int, cd_size: int) -> Path:
    """A small real zip whose end record claims `entries` members and a `cd_size` directory."""
    _zip(path, {"a.txt": b"x"})
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x05\x06")
    struct.pack_into("<HHL", data, at + 8, min(entries, 0xFFFF), min(entries, 0xFFFF), cd_size)
    path.write_bytes(bytes(data))
    return path


def test_member_count_is_read_from_the_end_record_before_parsing(tmp_path: Path) -> None:
    members = {f"d/{i}.txt": b"" for i in range(1200)}
    path = _zip(tmp_path / "many.zip", members)
    with pytest.raises(BadInputError, match=r"is a zip of 1200 members, more than the limit of 1000"):
        open_zip(path, what="dataset", limits=ArchiveLimits(max_members=1000))
    # A directory far larger than the file could hold is refused from the record alone.
    with pytest.raises(BadInputError, match=r"zip directory of 1000000000 bytes"):
        check_central_directory(_fake_eocd(tmp_path / "lie.zip", 10, 10**9), ArchiveLimits())


def test_300k_entry_zip_is_refused_without_parsing_its_directory(tmp_path: Path) -> None:
    # The attack: 300,000 entries. Written once with a ZIP64 end record (more than 65535).
    path = tmp_path / "huge.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for i in range(300_000):
            zf.writestr(zipfile.ZipInfo(f"{i}"), b"")
    with pytest.raises(BadInputError, match=r"300000 members, more than the limit of 200000"):
        sniff_dataset(path)


def test_teacher_zips_get_the_member_limit(tmp_path: Path) -> None:
    members = {f"archive/data/{i}": b"\0" * 4 for i in range(50)} | {"archive/data.pkl": b"\x80\x02}q\x00."}
    path = _zip(tmp_path / "teacher.pt", members)
    assert sniff_teacher(path).format == "state_dict"
    with pytest.raises(BadInputError, match=r"teacher file is a zip of 51 members, more than the limit of 20") as e:
        sniff_teacher(path, archive_limits=ArchiveLimits(max_members=20))
    assert e.value.field == "teacher.file"


def test_deeply_nested_safetensors_header_is_a_clear_error(tmp_path: Path) -> None:
    header = b"{" + b'"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "nested.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(BadInputError, match=r"nests too deeply") as caught:
        sniff_teacher(path)
    assert caught.value.field == "teacher.file"


def _constant_of_shape_model(path: Path, *, external: bool = False) -> Path:
    shape = numpy_helper.from_array(np.array([2**32], dtype=np.int64), "shape")
    if external:
        shape.ClearField("raw_data")
        shape.data_location = TensorProto.EXTERNAL
        shape.external_data.add(key="location", value="../../etc/passwd")
    nodes = [
        helper.make_node("Constant", [], ["shp"], value=shape),
        helper.make_node("ConstantOfShape", ["shp"], ["big"],
                         value=numpy_helper.from_array(np.array([1.0], dtype=np.float32))),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("Add", ["m", "s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.ones((4, 10), dtype=np.float32), "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_onnx_external_data_on_a_constant_node_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match=r"external data"):
        sniff_teacher(_constant_of_shape_model(tmp_path / "ext.onnx", external=True))


def test_onnx_graph_asking_for_16_gib_fails_against_the_arena_limit(tmp_path: Path) -> None:
    path = _constant_of_shape_model(tmp_path / "big.onnx")
    assert path.stat().st_size < 40_000 and sniff_teacher(path).format == "onnx"
    teacher = _load_onnx(path, torch.device("cpu"), 256 * MiB)
    with pytest.raises(ResourceLimitError, match=r"arena limit.*DISTILLERY_ONNX_ARENA_BYTES") as caught:
        teacher(torch.ones(2, 4))
    assert caught.value.code == "resource_limit"


def test_hf_floor_is_under_the_real_count_and_refuses_giants() -> None:
    # A BERT of 2 layers x 32: the floor (attention's query and output projections) is under what transformers builds.
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    hf = {"model_type": "bert", "hidden_size": 32, "num_layers": 2, "vocab_size": 100}
    floor = hf_student_parameters_floor(hf, {})
    assert floor is not None and 0 < floor < sum(p.numel() for p in model.parameters())
    assert hf_student_parameters_floor(hf, {"num_hidden_layers": 128, "hidden_size": 16384}) == 128 * 2 * 16384**2
    assert hf_student_parameters_floor({**hf, "model_type": "albert"}, {}) is None  # shared layers: no floor
