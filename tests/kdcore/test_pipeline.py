import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from kdcore.callbacks import Callbacks, Progress
from kdcore.errors import CancelledError, KDError
from kdcore.pipeline import JobInputs, RunOptions, run_job
from kdcore.spec import JobSpec, parse_spec
from tests.kdcore.helpers import make_blob_images, save_safetensors_teacher, train_teacher

TEACHER_ARGS = {"hidden": [64, 64]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pipeline")
    data = make_blob_images(root / "blobs.npz")
    save_safetensors_teacher(train_teacher("mlp", TEACHER_ARGS, data), root / "teacher.safetensors")
    return root


def _spec(workdir: Path, **overrides: object) -> JobSpec:
    raw: dict = {
        "teacher": {"file": str(workdir / "teacher.safetensors"), "arch": "mlp", "arch_args": TEACHER_ARGS},
        "student": {"arch": "mlp", "arch_args": {"hidden": [16]}},
        "data": {"train": str(workdir / "blobs.npz"), "val_fraction": 0.2},
        "stages": {"distill_epochs": 3},
        "batch_size": 32,
        "optim": {"lr": 0.005},
        "export": [],
        "threads": 1,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return parse_spec(raw)


def _run(workdir: Path, out: Path, spec: JobSpec, callbacks: Callbacks | None = None, **options: object):
    inputs = JobInputs(teacher=Path(spec.teacher.file), train=Path(spec.data.train))
    return run_job(spec, inputs, RunOptions(out_dir=out, latency_runs=3, **options), callbacks)  # type: ignore[arg-type]


class Recorder(Callbacks):
    def __init__(self, cancel_after_steps: int | None = None) -> None:
        self.progress: list[Progress] = []
        self.epochs: list[Progress] = []
        self.cancel_checks = 0
        self.cancel_after_steps = cancel_after_steps
        self.checkpoints: list[Path] = []
        self.logs: list[str] = []
        self.resumes: list[tuple[str, int]] = []

    def on_progress(self, progress: Progress) -> None:
        self.progress.append(progress)

    def on_epoch_end(self, progress: Progress) -> None:
        self.epochs.append(progress)

    def on_checkpoint(self, path: Path) -> None:
        self.checkpoints.append(path)

    def on_log(self, message: str) -> None:
        self.logs.append(message)

    def on_resume(self, stage: str, epoch: int) -> None:
        self.resumes.append((stage, epoch))

    def should_cancel(self) -> bool:
        self.cancel_checks += 1
        return self.cancel_after_steps is not None and self.cancel_checks > self.cancel_after_steps


def test_run_job_all_stages_writes_every_artifact(workdir: Path, tmp_path: Path) -> None:
    spec = _spec(workdir, stages={"teacher_finetune_epochs": 1, "distill_epochs": 2, "finetune_epochs": 1,
                                  "baseline": True},
                 export=["safetensors", "torchscript", "onnx"], quantize="dynamic_int8")
    recorder = Recorder()

    result = _run(workdir, tmp_path, spec, recorder)

    names = {p.name for p in result.artifacts}
    assert {"student.safetensors", "student.ts", "student.onnx", "student_int8.ts", "metrics.json",
            "history.csv", "curves.png", "report.md", "teacher_finetuned.safetensors"} <= names
    assert any(p.name.startswith("events.out.tfevents") for p in result.artifacts)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("teacher", "student", "baseline", "student_int8"):
        expected = {"accuracy", "top5", "loss", "params", "size_mb", "latency_ms", "per_class_accuracy"}
        assert expected <= set(metrics[key])
        assert 0.0 <= metrics[key]["accuracy"] <= 1.0
    assert metrics["teacher"]["accuracy"] > 0.9
    assert metrics["compression"] == pytest.approx(metrics["teacher"]["size_mb"] / metrics["student"]["size_mb"])
    assert metrics["student"]["params"] < metrics["teacher"]["params"]
    assert metrics["eval_split"] == "test split"
    assert [e.stage for e in recorder.epochs] == ["teacher_finetune", "distill", "distill", "finetune",
                                                   "baseline", "baseline", "baseline"]
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 7
    report = (tmp_path / "report.md").read_text()
    assert "| distilled student |" in report and "baseline student" in report and "confusion" in report
    assert not (tmp_path / "checkpoints" / "checkpoint.pt").exists()


def test_exports_score_like_pytorch(workdir: Path, tmp_path: Path) -> None:
    spec = _spec(workdir, export=["safetensors", "torchscript", "onnx"])
    result = _run(workdir, tmp_path, spec)
    with np.load(workdir / "blobs.npz") as data:
        x = torch.from_numpy(data["x_test"]).float().div(255).unsqueeze(1)
        y = data["y_test"]
    scripted = torch.jit.load(str(tmp_path / "student.ts"))
    ts_accuracy = float((scripted(x).argmax(1).numpy() == y).mean())
    session = onnxruntime.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    onnx_accuracy = float((session.run(None, {"input": x.numpy()})[0].argmax(1) == y).mean())
    assert ts_accuracy == pytest.approx(result.metrics["student"]["accuracy"])
    assert onnx_accuracy == pytest.approx(result.metrics["student"]["accuracy"])


def test_exports_carry_their_contract(workdir: Path, tmp_path: Path) -> None:
    import onnx
    from safetensors import safe_open

    spec = _spec(workdir, export=["safetensors", "onnx"], data={"normalize": {"mean": [0.1], "std": [0.3]}})
    _run(workdir, tmp_path, spec, job_id="job-123")
    onnx_props = {prop.key: json.loads(prop.value) for prop in onnx.load(str(tmp_path / "student.onnx")).metadata_props}
    with safe_open(str(tmp_path / "student.safetensors"), "pt") as handle:
        st_props = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
    for props in (onnx_props, st_props):
        assert props["normalize"] == {"mean": [0.1], "std": [0.3]}
        assert props["class_names"] == ["0", "1", "2", "3"]
        assert props["input_shape"] == [1, 8, 8]
        assert props["job_id"] == "job-123"
        assert "uint8 pixels / 255" in props["input"]


def test_progress_fraction_rises_to_one(workdir: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    _run(workdir, tmp_path, _spec(workdir), recorder, progress_interval_s=0.0)
    fractions = [p.fraction for p in recorder.progress if p.stage == "distill"]
    assert fractions == sorted(fractions)
    assert recorder.epochs[-1].fraction == pytest.approx(1.0)
    assert all(p.eta_s is not None and p.eta_s >= 0 for p in recorder.progress if p.stage == "distill")


def test_cancel_is_honoured_within_one_step(workdir: Path, tmp_path: Path) -> None:
    recorder = Recorder(cancel_after_steps=5)
    with pytest.raises(CancelledError):
        _run(workdir, tmp_path, _spec(workdir), recorder, progress_interval_s=0.0)
    steps_seen = max(p.step for p in recorder.progress if p.stage == "distill")
    assert steps_seen == 5


@pytest.mark.parametrize(("mixup", "finetune_epochs", "resumed_from"), [
    (0.0, 1, ("distill", 2)),
    # Mixup draws from the global generator and the stage's shuffling generator: resume inside a
    # stage, so both must come back from the checkpoint.
    (0.4, 2, ("finetune", 1)),
])
def test_resumed_run_ends_with_the_same_metrics(workdir: Path, tmp_path: Path, mixup: float, finetune_epochs: int,
                                                resumed_from: tuple[str, int]) -> None:
    spec = _spec(workdir, stages={"distill_epochs": 2, "finetune_epochs": finetune_epochs, "baseline": True},
                 student={"arch_args": {"hidden": [16], "dropout": 0.2}}, data={"mixup": mixup})
    straight = _run(workdir, tmp_path / "straight", spec)

    steps_per_epoch = 480 // 32
    # dies inside the last finetune epoch
    interrupted = Recorder(cancel_after_steps=steps_per_epoch * (1 + finetune_epochs) + 3)
    with pytest.raises(CancelledError):
        _run(workdir, tmp_path / "resumed", spec, interrupted)
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint.pt").exists()
    recorder = Recorder()
    resumed = _run(workdir, tmp_path / "resumed", spec, recorder)

    assert resumed.resumed_from == resumed_from
    assert recorder.resumes == [resumed_from]  # the worker learns of it through the callback, once
    for key in ("student", "baseline"):
        assert resumed.metrics[key]["accuracy"] == straight.metrics[key]["accuracy"]
        assert resumed.metrics[key]["loss"] == pytest.approx(straight.metrics[key]["loss"], abs=1e-6)


def test_same_seed_same_result(workdir: Path, tmp_path: Path) -> None:
    spec = _spec(workdir, student={"arch_args": {"hidden": [16], "dropout": 0.3}})
    first = _run(workdir, tmp_path / "a", spec)
    second = _run(workdir, tmp_path / "b", spec)
    other_seed = _run(workdir, tmp_path / "c", spec.model_copy(update={"seed": 1}))
    assert first.metrics["student"]["loss"] == second.metrics["student"]["loss"]
    assert other_seed.metrics["student"]["loss"] != first.metrics["student"]["loss"]


def test_same_seed_same_result_with_jitter_and_input_dropout(workdir: Path, tmp_path: Path) -> None:
    # The reproduction's teacher job: live shift augmentation, dropout on the inputs and hidden
    # layers, hard labels only. Every random draw must come from the seed.
    spec = _spec(workdir, data={"augment": "shift"}, stages={"distill_epochs": 0, "finetune_epochs": 2},
                 student={"arch_args": {"hidden": [16], "dropout": 0.5, "input_dropout": 0.2}})
    first = _run(workdir, tmp_path / "a", spec)
    second = _run(workdir, tmp_path / "b", spec)
    assert first.metrics["student"]["loss"] == second.metrics["student"]["loss"]


def test_mixup_runs_the_teacher_live_and_repeats_with_its_seed(workdir: Path, tmp_path: Path) -> None:
    stages = {"distill_epochs": 2, "baseline": True}
    mixed, plain = Recorder(), Recorder()
    first = _run(workdir, tmp_path / "a", _spec(workdir, data={"mixup": 0.4}, stages=stages), mixed)
    second = _run(workdir, tmp_path / "b", _spec(workdir, data={"mixup": 0.4}, stages=stages))
    unmixed = _run(workdir, tmp_path / "c", _spec(workdir, stages=stages), plain)

    assert "teacher_cache" in {p.stage for p in plain.progress}
    assert "teacher_cache" not in {p.stage for p in mixed.progress}, "blends need the teacher run live"
    for key in ("student", "baseline"):
        assert first.metrics[key]["loss"] == second.metrics[key]["loss"]
        # The baseline shares the data pipeline, so it is trained on the blends too.
        assert first.metrics[key]["loss"] != unmixed.metrics[key]["loss"]


def test_baseline_does_not_depend_on_the_distillation_settings(workdir: Path, tmp_path: Path) -> None:
    # The scratch student of one job is the scratch student of every job with the same seed and budget,
    # so runs that differ only in T or alpha can share one baseline.
    spec = _spec(workdir, stages={"distill_epochs": 2, "baseline": True})
    first = _run(workdir, tmp_path / "a", spec)
    other = _run(workdir, tmp_path / "b", spec.model_copy(update={
        "method": spec.method.model_copy(update={"temperature": 20.0, "alpha": 0.5})}))
    assert first.metrics["baseline"]["loss"] == other.metrics["baseline"]["loss"]
    assert first.metrics["student"]["loss"] != other.metrics["student"]["loss"]


def test_init_from_teacher_reports_shared_tensors(workdir: Path, tmp_path: Path) -> None:
    same_shape = _spec(workdir, student={"arch_args": TEACHER_ARGS, "init_from_teacher": True})
    narrower = _spec(workdir, student={"arch_args": {"hidden": [64, 32]}, "init_from_teacher": True})
    assert _run(workdir, tmp_path / "same", same_shape).metrics["shared_parameters"] == 6
    # The first layer's weight and bias and the output bias keep their names and shapes.
    assert _run(workdir, tmp_path / "narrow", narrower).metrics["shared_parameters"] == 3


def test_onnx_teacher_cannot_be_finetuned(workdir: Path, tmp_path: Path) -> None:
    model = train_teacher("mlp", TEACHER_ARGS, workdir / "blobs.npz", epochs=1)
    onnx_path = tmp_path / "teacher.onnx"
    torch.onnx.export(model, (torch.zeros(2, 1, 8, 8),), str(onnx_path), input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    spec = _spec(workdir, teacher={"file": str(onnx_path), "format": "auto", "arch": None, "arch_args": {}},
                 stages={"teacher_finetune_epochs": 1})
    with pytest.raises(KDError) as caught:
        _run(workdir, tmp_path / "out", spec)
    assert caught.value.field == "stages.teacher_finetune_epochs"
