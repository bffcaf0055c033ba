import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.kdcore.helpers import make_blob_images, save_safetensors_teacher, train_teacher

DISTILLERY = [sys.executable, "-m", "kdcore.cli"]


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    make_blob_images(root / "blobs.npz")
    save_safetensors_teacher(train_teacher("mlp", {"hidden": [32]}, root / "blobs.npz"), root / "teacher.safetensors")
    spec = {
        "teacher": {"file": "teacher.safetensors", "arch": "mlp", "arch_args": {"hidden": [32]}},
        "student": {"arch": "mlp", "arch_args": {"hidden": [8]}},
        "data": {"train": "blobs.npz"},
        "stages": {"distill_epochs": 2, "baseline": True},
        "export": ["safetensors", "onnx"],
        "threads": 1,
    }
    (root / "job.yaml").write_text(yaml.safe_dump(spec))
    return root


def _distill(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DISTILLERY, "distill", *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])})


def test_distill_writes_artifacts_and_prints_a_summary(job_dir: Path, tmp_path: Path) -> None:
    done = _distill(str(job_dir / "job.yaml"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["accuracy"]) == {"teacher", "student", "baseline"}
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"student.safetensors", "student.onnx", "metrics.json", "report.md", "history.csv", "curves.png"} <= names
    assert "student.ts" not in names
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["student"]["accuracy"] == pytest.approx(summary["accuracy"]["student"])
    # stderr is a pipe here, not a terminal: one progress line per finished epoch instead of a bar
    epoch_lines = [line for line in done.stderr.splitlines() if " epoch " in line]
    assert any(line.startswith("distill epoch 2/2 ") and "train_loss=" in line for line in epoch_lines), done.stderr
    assert any(line.startswith("baseline epoch 1/2 ") for line in epoch_lines), done.stderr


def test_distill_bad_spec_exits_2_naming_the_field(job_dir: Path, tmp_path: Path) -> None:
    spec = yaml.safe_load((job_dir / "job.yaml").read_text())
    spec["method"] = {"temperature": 0}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    done = _distill(str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2
    assert "method.temperature" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_distill_missing_file_is_one_clear_line(job_dir: Path, tmp_path: Path) -> None:
    spec = yaml.safe_load((job_dir / "job.yaml").read_text())
    spec["teacher"]["file"] = str(job_dir / "nope.safetensors")
    (tmp_path / "missing.yaml").write_text(yaml.safe_dump(spec))
    done = _distill(str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert done.returncode == 1
    assert "teacher.file" in done.stderr and "no such file" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine")
def test_distill_runs_on_cuda_in_bf16(job_dir: Path, tmp_path: Path) -> None:
    spec = yaml.safe_load((job_dir / "job.yaml").read_text())
    spec.update(device="cuda", precision="bf16")
    (job_dir / "gpu.yaml").write_text(yaml.safe_dump(spec))
    done = _distill(str(job_dir / "gpu.yaml"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["accuracy"]["student"] > 0.5
