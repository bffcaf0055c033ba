from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import onnx
import pytest

from kdcore.errors import BadInputError
from kdcore.teacher_sniff import guess_output_size, sniff_teacher

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _truncated(source: Path, target: Path, fraction: float = 0.5) -> Path:
    data = source.read_bytes()
    return _write(target, data[: int(len(data) * fraction)])


def _safetensors_bytes(header: dict[str, object], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("safetensors", "safetensors"),
        ("state_dict", "state_dict"),
        ("legacy", "state_dict"),
        ("checkpoint", "state_dict"),
        ("onnx", "onnx"),
        ("torchscript", "torchscript"),
        ("exported", "exported"),
    ],
)
def test_detects_format_from_content(teacher_zoo, name: str, expected: str) -> None:
    assert sniff_teacher(teacher_zoo.files[name]).format == expected


def test_safetensors_reports_output_size_and_tensor_count(teacher_zoo) -> None:
    info = sniff_teacher(teacher_zoo.files["safetensors"])
    assert info.output_size == teacher_zoo.num_classes
    assert info.num_tensors == 6  # three Linear layers, weight and bias each
    assert "6 tensors" in info.details


def test_onnx_reports_output_size_and_input_shape(teacher_zoo) -> None:
    info = sniff_teacher(teacher_zoo.files["onnx"])
    assert info.output_size == teacher_zoo.num_classes
    assert info.input_shape == list(teacher_zoo.input_shape)


def test_state_dict_is_not_unpickled_so_output_size_is_unknown(teacher_zoo) -> None:
    assert sniff_teacher(teacher_zoo.files["state_dict"]).output_size is None


def test_output_size_heuristic_uses_natural_name_order() -> None:
    shapes = {
        "layers.2.weight": [5, 4], "layers.10.weight": [7, 5], "layers.10.bias": [7],
        "conv.weight": [3, 3, 3, 3],
    }
    assert guess_output_size(shapes) == 7
    assert guess_output_size({"conv.weight": [8, 3, 3, 3], "fc.bias": [8]}) is None


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="empty file"):
        sniff_teacher(_write(tmp_path / "empty", b""))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="missing"):
        sniff_teacher(tmp_path / "nope")


def test_file_over_the_limit_is_refused_before_reading(teacher_zoo) -> None:
    with pytest.raises(BadInputError, match="larger than the limit"):
        sniff_teacher(teacher_zoo.files["onnx"], max_bytes=100)


def test_random_bytes_are_not_a_teacher(tmp_path: Path) -> None:
    data = b"\x42" + random.Random(0).randbytes(4095)
    with pytest.raises(BadInputError, match="not a teacher model: file starts with") as caught:
        sniff_teacher(_write(tmp_path / "noise", data))
    assert caught.value.code == "bad_input"
    assert caught.value.field == "teacher.file"


def test_text_file_is_not_a_teacher(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="not a teacher model"):
        sniff_teacher(_write(tmp_path / "model.onnx", b"hello, I am definitely a model\n"))


def test_truncated_safetensors(teacher_zoo, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="corrupt or truncated safetensors"):
        sniff_teacher(_truncated(teacher_zoo.files["safetensors"], tmp_path / "cut"))


def test_truncated_safetensors_header(teacher_zoo, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="corrupt or truncated safetensors: header says"):
        sniff_teacher(_truncated(teacher_zoo.files["safetensors"], tmp_path / "cut", fraction=0.05))


def test_safetensors_header_not_json(tmp_path: Path) -> None:
    data = struct.pack("<Q", 10) + b"{not json}"
    with pytest.raises(BadInputError, match="corrupt or truncated safetensors: header is not valid JSON"):
        sniff_teacher(_write(tmp_path / "bad", data))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, "do not match its shape"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}, "do not match its shape"),
        ({"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}, "unsupported dtype"),
        ({"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}, "invalid shape"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}, "invalid data_offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "file holds 16"),
    ],
)
def test_safetensors_entries_are_validated(tmp_path: Path, entry: dict[str, object], message: str) -> None:
    data = _safetensors_bytes({"w.weight": entry}, b"\0" * 16)
    with pytest.raises(BadInputError, match=f"corrupt or truncated safetensors: .*{message}"):
        sniff_teacher(_write(tmp_path / "bad", data))


def test_safetensors_overlapping_tensors(tmp_path: Path) -> None:
    header = {
        "a.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
    }
    with pytest.raises(BadInputError, match="overlaps another or leaves a gap"):
        sniff_teacher(_write(tmp_path / "bad", _safetensors_bytes(header, b"\0" * 24)))


def test_hand_made_safetensors_with_metadata(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "head.weight": {"dtype": "F16", "shape": [10, 2], "data_offsets": [0, 40]},
        "head.bias": {"dtype": "F16", "shape": [10], "data_offsets": [40, 60]},
    }
    info = sniff_teacher(_write(tmp_path / "ok", _safetensors_bytes(header, b"\0" * 60)))
    assert (info.format, info.output_size, info.num_tensors) == ("safetensors", 10, 2)


def test_truncated_onnx(teacher_zoo, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="corrupt or truncated ONNX"):
        sniff_teacher(_truncated(teacher_zoo.files["onnx"], tmp_path / "cut"))


def test_onnx_with_external_data_is_refused(teacher_zoo, tmp_path: Path) -> None:
    model = onnx.load(str(teacher_zoo.files["onnx"]))
    target = tmp_path / "external.onnx"
    onnx.save_model(model, str(target), save_as_external_data=True, location="weights.bin", size_threshold=0)
    with pytest.raises(BadInputError, match="external data"):
        sniff_teacher(target)


@pytest.mark.parametrize("name", ["state_dict", "torchscript", "exported"])
def test_truncated_torch_zip(teacher_zoo, tmp_path: Path, name: str) -> None:
    with pytest.raises(BadInputError, match="corrupt or truncated zip archive"):
        sniff_teacher(_truncated(teacher_zoo.files[name], tmp_path / "cut"))


def test_zip_without_torch_layout(tmp_path: Path) -> None:
    target = tmp_path / "notes.zip"
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("notes/1.txt", b"hello")
    message = r"starts with b'PK'.*no TorchScript, \.pt2, torch\.save, ONNX or Hugging Face layout"
    with pytest.raises(BadInputError, match=message):
        sniff_teacher(target)


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_sniffer_does_not_import_torch() -> None:
    code = "import kdcore.teacher_sniff, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    result = _run_python(code)
    assert result.returncode == 0, result.stderr


def test_sniffing_onnx_does_not_import_torch(teacher_zoo) -> None:
    code = (
        "import sys; from kdcore.teacher_sniff import sniff_teacher; "
        f"print(sniff_teacher({str(teacher_zoo.files['onnx'])!r}).format); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "onnx"
