"""Figures that cannot mislead: like-for-like latency, ONNX parameters, size/speed warnings, the gain's interval."""

import csv
import zipfile
from pathlib import Path

import onnx
import pytest
import torch

from kdcore.pipeline import JobInputs, RunOptions, run_job
from kdcore.report import verdict
from kdcore.spec import JobSpec, parse_spec
from tests.kdcore.helpers import make_blob_images, save_safetensors_teacher, train_teacher

TEACHER_ARGS = {"hidden": [64, 64]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("figures")
    data = make_blob_images(root / "blobs.npz", num_train=400, num_test=200)
    teacher = train_teacher("mlp", TEACHER_ARGS, data)
    save_safetensors_teacher(teacher, root / "teacher.safetensors")
    # The ONNX teacher as recent torch writes it: the graph and its weights in a separate file, zipped together.
    exported = root / "export"
    exported.mkdir()
    torch.onnx.export(teacher, (torch.zeros(2, 1, 8, 8),), str(exported / "tmp.onnx"), input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    onnx.save_model(onnx.load(str(exported / "tmp.onnx")), str(exported / "teacher.onnx"),
                    save_as_external_data=True, location="teacher.onnx.data", size_threshold=0)
    with zipfile.ZipFile(root / "teacher_onnx.zip", "w") as archive:
        archive.write(exported / "teacher.onnx", "teacher.onnx")
        archive.write(exported / "teacher.onnx.data", "teacher.onnx.data")
    return root


def _spec(workdir: Path, teacher: dict | None = None, **overrides: object) -> JobSpec:
    raw: dict = {
        "teacher": teacher or {"file": str(workdir / "teacher.safetensors"), "arch": "mlp", "arch_args": TEACHER_ARGS},
        "student": {"arch": "mlp", "arch_args": {"hidden": [16]}},
        "data": {"train": str(workdir / "blobs.npz"), "val_fraction": 0.2},
        "stages": {"distill_epochs": 2},
        "batch_size": 32, "optim": {"lr": 0.005}, "export": [], "threads": 1,
    }
    raw.update(overrides)
    return parse_spec(raw)


def _run(spec: JobSpec, out: Path):
    inputs = JobInputs(teacher=Path(spec.teacher.file), train=Path(spec.data.train))
    return run_job(spec, inputs, RunOptions(out_dir=out, latency_runs=3))


def test_an_onnx_zip_teacher_is_distilled_and_timed_alike(workdir: Path, tmp_path: Path) -> None:
    spec = _spec(workdir, teacher={"file": str(workdir / "teacher_onnx.zip")})
    metrics = _run(spec, tmp_path).metrics
    assert metrics["latency_runtime"] == "onnxruntime"
    # Counted from the graph's initializers: the parameters of the MLP it was exported from, not 0.
    assert metrics["teacher"]["params"] == 64 * 64 + 64 * 64 + 64 + 64 + 64 * 4 + 4
    assert metrics["teacher"]["size_mb"] == pytest.approx(metrics["teacher"]["params"] * 4 / 1e6)
    assert metrics["student"]["accuracy"] > 0.8 and metrics["teacher"]["accuracy"] > 0.9
    report = (tmp_path / "report.md").read_text()
    assert "every model in onnxruntime" in report


def test_pytorch_teachers_are_timed_in_pytorch_and_the_gain_has_an_interval(workdir: Path, tmp_path: Path) -> None:
    metrics = _run(_spec(workdir), tmp_path).metrics
    assert metrics["latency_runtime"] == "pytorch"
    low, high = metrics["distillation_gain_ci"]
    assert low <= metrics["distillation_gain"] <= high
    assert 0.0 <= metrics["distillation_gain_p_value"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "95% interval" in report and "McNemar" in report
    assert metrics["selected_epochs"]["student"]["epoch"] in (1, 2)
    assert "Shipped student weights" in report


def test_a_student_larger_than_its_teacher_is_warned_about(workdir: Path, tmp_path: Path) -> None:
    spec = _spec(workdir, student={"arch": "mlp", "arch_args": {"hidden": [256, 256]}},
                 stages={"distill_epochs": 1, "baseline": False})
    metrics = _run(spec, tmp_path).metrics
    assert any("not smaller than its teacher" in warning for warning in metrics["warnings"])
    report = (tmp_path / "report.md").read_text()
    assert "## Warnings" in report and "not smaller than its teacher" in report
    assert "x larger" in report and "x smaller" not in report.split("## Warnings")[0]


def test_history_keeps_the_train_cross_entropy_beside_the_distillation_loss(workdir: Path, tmp_path: Path) -> None:
    _run(_spec(workdir, stages={"distill_epochs": 2, "baseline": False}), tmp_path)
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    for row in rows:
        # The objective is T^2-scaled; the cross-entropy with the labels is on the validation loss's scale.
        assert float(row["train_ce"]) != float(row["train_loss"])
        assert float(row["train_ce"]) < 3 * float(row["val_loss"]) + 0.5


def test_verdict_says_within_noise_when_the_interval_holds_zero() -> None:
    base = {"student": {"accuracy": 0.906}, "baseline": {"accuracy": 0.900}, "eval_samples": 1000}
    noisy = verdict({**base, "distillation_gain_ci": [-0.004, 0.016], "distillation_gain_p_value": 0.26})
    assert "within noise" in noisy and "beat" not in noisy
    clear = verdict({**base, "distillation_gain_ci": [0.002, 0.010], "distillation_gain_p_value": 0.01})
    assert "beat the same student" in clear and "within noise" not in clear
