"""docs/teachers.md's ONNX snippets, run as written: what they produce is a teacher the service takes."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from kdcore.spec import TeacherSpec
from kdcore.teacher import load_teacher
from kdcore.teacher_sniff import sniff_teacher

DOC = Path(__file__).resolve().parents[2] / "docs" / "teachers.md"


def _onnx_snippets() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## ONNX: any architecture"):text.index("## TorchScript and")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_documented_onnx_export_and_zip_give_an_accepted_teacher(tmp_path: Path, monkeypatch) -> None:
    export, zipping = _onnx_snippets()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    monkeypatch.chdir(tmp_path)
    # The page's own code, as a reader would paste it.
    exec(export, {"model": model})
    exec(zipping, {})
    # The pinned torch writes the weights apart: the case the issue met and the page now covers.
    assert (tmp_path / "teacher.onnx.data").exists()
    info = sniff_teacher(tmp_path / "teacher.zip")
    assert info.format == "onnx" and info.output_size == 10
    assert info.onnx is not None and info.onnx.data_members == ["teacher.onnx.data"]
    assert info.onnx.parameters == sum(p.numel() for p in model.parameters())
    teacher = load_teacher(TeacherSpec(file="teacher.zip"), tmp_path / "teacher.zip", input_shape=(1, 28, 28),
                           num_classes=10)
    batch = torch.rand(3, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(teacher.module(batch), model.eval()(batch), atol=1e-4, rtol=1e-4)
