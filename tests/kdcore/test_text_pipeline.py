"""Text classification jobs end to end through `run_job`: stages, kd and kd_hidden, cancel, resume, exports, spec."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcore.callbacks import Callbacks, Progress
from kdcore.errors import CancelledError, KDError, SpecError
from kdcore.limits import ResourceLimitError
from kdcore.pipeline import JobInputs, RunOptions, RunResult, run_job
from kdcore.spec import JobSpec, for_task, parse_spec
from tests.text_models import make_bert_zip, sentences, write_jsonl

TRAIN_ROWS, TEST_ROWS = 300, 100


class Recorder(Callbacks):
    def __init__(self, cancel_after_steps: int | None = None) -> None:
        self.progress: list[Progress] = []
        self.epochs: list[Progress] = []
        self.stages: list[str] = []
        self.cancel_checks = 0
        self.cancel_after_steps = cancel_after_steps
        self.logs: list[str] = []
        self.resumes: list[tuple[str, int]] = []

    def on_stage_start(self, stage: str, epochs: int) -> None:
        self.stages.append(stage)

    def on_progress(self, progress: Progress) -> None:
        self.progress.append(progress)

    def on_epoch_end(self, progress: Progress) -> None:
        self.epochs.append(progress)

    def on_log(self, message: str) -> None:
        self.logs.append(message)

    def on_resume(self, stage: str, epoch: int) -> None:
        self.resumes.append((stage, epoch))

    def should_cancel(self) -> bool:
        self.cancel_checks += 1
        return self.cancel_after_steps is not None and self.cancel_checks > self.cancel_after_steps


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("text_pipeline")
    make_bert_zip(root, "base", layers=2, hidden=32, seed=0)
    make_bert_zip(root, "classifier", layers=2, hidden=32, labels=["negative", "positive"], seed=0)
    write_jsonl(root / "train.jsonl", sentences(TRAIN_ROWS, seed=1))
    write_jsonl(root / "test.jsonl", sentences(TEST_ROWS, seed=2))
    return root


def _spec(workdir: Path, teacher: str = "base", **overrides: Any) -> JobSpec:
    raw: dict[str, Any] = {
        "teacher": {"file": str(workdir / f"{teacher}.zip")},
        "student": {"arch_args": {"num_hidden_layers": 1}},
        "data": {"train": str(workdir / "train.jsonl"), "test": str(workdir / "test.jsonl")},
        "stages": {"teacher_finetune_epochs": 1 if teacher == "base" else 0, "distill_epochs": 2,
                   "baseline": False,
                   # The "classifier" teacher's head is random (near chance by design): the check only warns.
                   "teacher_check": "warn" if teacher == "classifier" else "fail"},
        "optim": {"lr": 2e-3, "teacher_lr": 2e-3},
        "threads": 2,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return parse_spec(raw)


def _run(spec: JobSpec, out: Path, callbacks: Callbacks | None = None, **options: Any) -> RunResult:
    inputs = JobInputs(teacher=Path(spec.teacher.file), train=Path(spec.data.train), test=Path(spec.data.test or ""))
    return run_job(spec, inputs, RunOptions(out_dir=out, latency_runs=3, **options), callbacks)


def _unzip(path: Path, target: Path) -> Path:
    with zipfile.ZipFile(path) as archive:
        archive.extractall(target)
    return target


def _test_rows(workdir: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (workdir / "test.jsonl").read_text().splitlines()]


def _hf_logits(folder: Path, texts: list[str]) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits


# --- a base teacher, fine-tuned, then kd -------------------------------------------------------------------


@pytest.fixture(scope="module")
def kd_run(workdir: Path) -> tuple[RunResult, Recorder, Path]:
    out = workdir / "kd"
    recorder = Recorder()
    spec = _spec(workdir, stages={"distill_epochs": 2, "baseline": True}, quantize="dynamic_int8")
    return _run(spec, out, recorder), recorder, out


def test_kd_job_runs_every_stage_and_reports(kd_run: tuple[RunResult, Recorder, Path]) -> None:
    result, recorder, out = kd_run
    metrics = result.metrics
    assert [e.stage for e in recorder.epochs] == ["teacher_finetune"] + ["distill"] * 2 + ["baseline"] * 2
    assert "teacher_cache" in recorder.stages
    for key in ("teacher", "student", "baseline", "student_int8"):
        assert {"accuracy", "loss", "params", "size_mb", "latency_ms"} <= set(metrics[key]), key
        assert 0.0 <= metrics[key]["accuracy"] <= 1.0
        assert metrics[key]["latency_ms"] > 0
    assert metrics["task"] == "text_classification"
    assert metrics["class_names"] == ["negative", "positive"]
    assert metrics["eval_split"] == "test split" and metrics["eval_samples"] == TEST_ROWS
    assert metrics["teacher_layers"] == [1]  # one student layer of two: the last
    assert metrics["student"]["params"] < metrics["teacher"]["params"]
    assert metrics["shared_parameters"] == metrics["student"]["params"]  # same width: all copied
    assert metrics["distillation_gain"] == pytest.approx(metrics["student"]["accuracy"] -
                                                         metrics["baseline"]["accuracy"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["student"]["accuracy"] == metrics["student"]["accuracy"]
    report = (out / "report.md").read_text()
    assert "distilled student" in report and "baseline" in report
    names = {path.name for path in result.artifacts}
    assert {"teacher_hf.zip", "student_hf.zip", "student.safetensors", "student.onnx", "metrics.json",
            "report.md", "history.csv"} <= names
    assert not (out / "checkpoints" / "checkpoint.pt").exists()
    assert not (out / "hf").exists()  # the unpacked teacher is scratch


def test_agreement_and_disagreements_match_the_exported_models(workdir: Path,
                                                              kd_run: tuple[RunResult, Recorder, Path]) -> None:
    result, _, out = kd_run
    names = result.metrics["class_names"]
    student_folder = _unzip(out / "student_hf.zip", out / "student_check")
    teacher_folder = _unzip(out / "teacher_hf.zip", out / "teacher_check")
    texts = [row["text"] for row in _test_rows(workdir)]
    student = _hf_logits(student_folder, texts).argmax(1)
    teacher = _hf_logits(teacher_folder, texts).argmax(1)
    assert result.metrics["agreement"] == pytest.approx(float((student == teacher).float().mean()))
    shown = result.metrics["disagreements"]
    assert len(shown) == min(8, int((student != teacher).sum()))
    if shown:
        shown_texts = [row["text"] for row in shown]
        student_shown = _hf_logits(student_folder, shown_texts).argmax(1).tolist()
        assert [row["student"] for row in shown] == [names[i] for i in student_shown]
        teacher_shown = _hf_logits(teacher_folder, shown_texts).argmax(1).tolist()
        assert [row["teacher"] for row in shown] == [names[i] for i in teacher_shown]
        assert all(row["student"] != row["teacher"] for row in shown)


def test_student_hf_zip_loads_in_transformers_and_scores_like_the_engine(
        workdir: Path, kd_run: tuple[RunResult, Recorder, Path]) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result, _, out = kd_run
    folder = _unzip(out / "student_hf.zip", out / "student_hf")
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert model.config.num_hidden_layers == 1
    assert model.config.id2label == {0: "negative", 1: "positive"}
    metadata = json.loads((folder / "distillery.json").read_text())
    assert metadata["class_names"] == ["negative", "positive"] and metadata["task"] == "text_classification"

    rows = _test_rows(workdir)
    labels = torch.tensor([model.config.label2id[row["label"]] for row in rows])
    with torch.no_grad():
        logits = model(**tokenizer([row["text"] for row in rows], padding=True, return_tensors="pt")).logits
    # the engine's own evaluation of its student, on the same test file
    assert float(F.cross_entropy(logits, labels)) == pytest.approx(result.metrics["student"]["loss"], abs=1e-5)
    assert float((logits.argmax(1) == labels).float().mean()) == pytest.approx(result.metrics["student"]["accuracy"])
    # and student.safetensors holds the same weights
    shipped = load_file(str(out / "student.safetensors"))
    for name, tensor in model.state_dict().items():
        if name in shipped:
            assert torch.equal(shipped[name], tensor), name
    assert sum(t.numel() for t in shipped.values()) >= result.metrics["student"]["params"]


def test_student_onnx_matches_pytorch_on_two_shapes(workdir: Path, kd_run: tuple[RunResult, Recorder, Path]) -> None:
    import onnxruntime
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, _, out = kd_run
    folder = _unzip(out / "student_hf.zip", out / "student_onnx_check")
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    session = onnxruntime.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    inputs = [node.name for node in session.get_inputs()]
    assert inputs == ["input_ids", "attention_mask", "token_type_ids"]
    texts = [row["text"] for row in _test_rows(workdir)]
    shapes = set()
    for chosen in (texts[:1], texts[:7]):
        encoded = tokenizer(chosen, padding=True, return_tensors="pt")
        shapes.add(tuple(encoded["input_ids"].shape))
        with torch.no_grad():
            expected = model(**encoded).logits.numpy()
        (got,) = session.run(None, {name: encoded[name].numpy().astype(np.int64) for name in inputs})
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)
    assert len(shapes) == 2 and len({shape[1] for shape in shapes}) == 2


def test_teacher_hf_zip_is_the_fine_tuned_teacher(workdir: Path, kd_run: tuple[RunResult, Recorder, Path]) -> None:
    result, _, out = kd_run
    rows = _test_rows(workdir)
    logits = _hf_logits(_unzip(out / "teacher_hf.zip", out / "teacher_hf"), [row["text"] for row in rows])
    labels = torch.tensor([result.metrics["class_names"].index(row["label"]) for row in rows])
    assert float(F.cross_entropy(logits, labels)) == pytest.approx(result.metrics["teacher"]["loss"], abs=1e-5)


def test_dynamic_int8_student_is_smaller_and_close(kd_run: tuple[RunResult, Recorder, Path]) -> None:
    metrics = kd_run[0].metrics
    assert metrics["student_int8"]["size_mb"] < metrics["student"]["size_mb"]
    assert abs(metrics["student_int8"]["accuracy"] - metrics["student"]["accuracy"]) <= 0.1


# --- kd_hidden with a narrower student ------------------------------------------------------------------------


def test_kd_hidden_with_a_narrower_student_uses_a_projection_that_is_not_shipped(workdir: Path) -> None:
    from safetensors.torch import load_file

    out = workdir / "kd_hidden"
    recorder = Recorder()
    spec = _spec(workdir, method={"name": "kd_hidden", "hidden_weight": 1.0},
                 student={"arch_args": {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                                        "intermediate_size": 32}},
                 stages={"distill_epochs": 1, "baseline": True}, export=["hf", "safetensors"])

    result = _run(spec, out, recorder)

    metrics = result.metrics
    for key in ("teacher", "student", "baseline"):
        assert 0.0 <= metrics[key]["accuracy"] <= 1.0
    assert "teacher_cache" not in recorder.stages  # the teacher runs live: its hidden states are needed
    assert (out / "report.md").exists()
    shipped = load_file(str(out / "student.safetensors"))
    assert not any("distill_projection" in name for name in shipped)
    assert shipped["bert.embeddings.word_embeddings.weight"].shape[1] == 16
    assert metrics["student"]["params"] == sum(t.numel() for t in shipped.values())
    assert metrics["student"]["params"] == metrics["baseline"]["params"]
    folder = _unzip(out / "student_hf.zip", out / "student_hf")
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 16
    distill = [row for row in _history(out) if row["stage"] == "distill"]
    assert len(distill) == 1 and np.isfinite(float(distill[0]["train_loss"]))


def _history(out: Path) -> list[dict[str, str]]:
    import csv

    with (out / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


# --- failing fast, cancelling, resuming ---------------------------------------------------------------------


def test_base_teacher_without_fine_tune_fails_fast(workdir: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    spec = _spec(workdir, stages={"teacher_finetune_epochs": 0})
    with pytest.raises(KDError) as caught:
        _run(spec, tmp_path, recorder)
    assert caught.value.field == "stages.teacher_finetune_epochs"
    assert recorder.epochs == [] and recorder.cancel_checks == 0  # nothing trained


def test_cancel_during_distill_stops_within_one_step(workdir: Path, tmp_path: Path) -> None:
    recorder = Recorder(cancel_after_steps=3)
    with pytest.raises(CancelledError):
        _run(_spec(workdir, "classifier"), tmp_path, recorder, progress_interval_s=0.0)
    steps = [p.step for p in recorder.progress if p.stage == "distill"]
    assert max(steps) == 3
    assert recorder.cancel_checks == 4
    assert recorder.epochs == []


def test_resumed_run_ends_with_the_same_student(workdir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    spec = _spec(workdir, "classifier", stages={"distill_epochs": 2}, export=["safetensors"])
    straight_recorder = Recorder()
    _run(spec, tmp_path / "straight", straight_recorder, progress_interval_s=0.0)
    steps_per_epoch = max(p.step for p in straight_recorder.progress if p.stage == "distill")
    assert steps_per_epoch == -(-int(TRAIN_ROWS * 0.9) // 32)  # the text jobs' default batch

    checkpoints = tmp_path / "checkpoints"
    interrupted = Recorder(cancel_after_steps=steps_per_epoch + 2)  # two steps into the second epoch
    with pytest.raises(CancelledError):
        _run(spec, tmp_path / "interrupted", interrupted, checkpoint_dir=checkpoints)
    assert (checkpoints / "checkpoint.pt").exists()
    assert [e.stage for e in interrupted.epochs] == ["distill"]

    recorder = Recorder()
    resumed = _run(spec, tmp_path / "resumed", recorder, checkpoint_dir=checkpoints)

    assert resumed.resumed_from == ("distill", 1)
    assert recorder.resumes == [("distill", 1)]
    assert [e.epoch for e in recorder.epochs] == [2]  # only the epoch left is trained
    assert not (checkpoints / "checkpoint.pt").exists()
    straight = load_file(str(tmp_path / "straight" / "student.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "student.safetensors"))
    assert straight.keys() == again.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(again[name], tensor, atol=1e-6, rtol=0, msg=name)


# --- the BiLSTM student ---------------------------------------------------------------------------------------


def test_text_bilstm_job_exports_safetensors_and_onnx(workdir: Path, tmp_path: Path) -> None:
    import onnxruntime
    from safetensors.torch import load_file

    from kdcore.architectures import TextBiLSTMArgs
    from kdcore.hf_models import TextBiLSTM

    args = {"hidden": 16, "mlp_hidden": 16}
    spec = _spec(workdir, "classifier", student={"arch": "text_bilstm", "arch_args": args},
                 stages={"distill_epochs": 1})

    result = _run(spec, tmp_path)

    names = {path.name for path in result.artifacts}
    assert {"student.safetensors", "student.onnx"} <= names and "student_hf.zip" not in names
    assert result.metrics["shared_parameters"] > 0  # the teacher's embeddings
    state = load_file(str(tmp_path / "student.safetensors"))
    vocab, dim = state["embed.weight"].shape
    model = TextBiLSTM(torch.zeros(vocab, dim), TextBiLSTMArgs.model_validate(args), 2, 0)
    model.load_state_dict(state)
    model.eval()
    assert result.metrics["student"]["params"] == sum(p.numel() for p in model.parameters())
    session = onnxruntime.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    assert [node.name for node in session.get_inputs()] == ["input_ids", "attention_mask"]
    from kdcore.text_data import TokenBatch

    generator = torch.Generator().manual_seed(0)
    for batch, length in ((1, 4), (3, 9)):
        ids = torch.randint(5, vocab, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[-1, length // 2:] = 0
        with torch.no_grad():
            expected = model(TokenBatch(ids, mask)).numpy()
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)


# --- the spec for text jobs ------------------------------------------------------------------------------------


def _raw(**overrides: Any) -> dict[str, Any]:
    return {"teacher": {"file": "teacher.zip"}, "data": {"train": "train.jsonl"}, **overrides}


def test_for_task_fills_the_text_defaults() -> None:
    spec = for_task(parse_spec(_raw()), "text_classification")
    assert spec.task == "text_classification"
    assert spec.student.arch == "hf"
    assert spec.student.init_from_teacher is True
    assert spec.export == ["hf", "safetensors", "onnx"]
    assert spec.optim.lr == 5e-5 and spec.optim.teacher_lr == 5e-5
    assert spec.optim.schedule == "linear" and spec.optim.warmup_ratio == 0.1
    assert spec.batch_size == 32 and spec.eval_batch_size == 256
    assert spec.stages.distill_epochs == 3


def test_for_task_keeps_what_the_user_set() -> None:
    spec = for_task(parse_spec(_raw(student={"init_from_teacher": False}, optim={"lr": 1e-3}, batch_size=8,
                                    export=["onnx"], stages={"distill_epochs": 1})), "text_classification")
    assert spec.student.init_from_teacher is False
    assert spec.optim.lr == 1e-3 and spec.optim.teacher_lr == 5e-5
    assert spec.batch_size == 8 and spec.export == ["onnx"] and spec.stages.distill_epochs == 1


def test_image_defaults_are_untouched_by_the_text_ones() -> None:
    spec = for_task(parse_spec(_raw(teacher={"file": "t.safetensors", "arch": "mlp"})), "image_classification")
    assert spec.student.arch == "mlp" and spec.student.init_from_teacher is False
    assert spec.optim.lr == 3e-3 and spec.batch_size == 128 and "hf" not in spec.export


def test_text_bilstm_defaults_to_exports_it_has() -> None:
    spec = for_task(parse_spec(_raw(student={"arch": "text_bilstm"})), "text_classification")
    assert spec.export == ["safetensors", "onnx"]


@pytest.mark.parametrize(("overrides", "field"), [
    ({"export": ["safetensors", "torchscript"]}, "export"),
    ({"student": {"arch": "mlp"}}, "student.arch"),
    ({"student": {"arch": "text_bilstm"}, "method": {"name": "kd_hidden"}}, "method.name"),
])
def test_image_settings_for_a_text_job_are_refused(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as caught:
        for_task(parse_spec(_raw(**overrides)), "text_classification")
    assert field in [error["field"] for error in caught.value.errors]


def test_hf_export_of_a_bilstm_student_is_refused_by_the_spec() -> None:
    with pytest.raises(SpecError) as caught:
        for_task(parse_spec(_raw(student={"arch": "text_bilstm"}, export=["hf", "onnx"])), "text_classification")
    assert "export" in [error["field"] for error in caught.value.errors]


@pytest.mark.parametrize(("overrides", "field"), [
    ({"method": {"name": "kd_hidden"}}, "method.name"),
    ({"export": ["hf"]}, "export"),
    ({"student": {"teacher_layers": [0]}}, "student.teacher_layers"),
])
def test_text_settings_for_an_image_job_are_refused(overrides: dict[str, Any], field: str) -> None:
    raw = _raw(teacher={"file": "t.safetensors", "arch": "mlp"}, **overrides)
    with pytest.raises(SpecError) as caught:
        for_task(parse_spec(raw), "image_classification")
    assert field in [error["field"] for error in caught.value.errors]


def test_an_hf_teacher_resolves_to_a_text_job_and_an_image_task_is_refused(workdir: Path) -> None:
    from kdcore.tasks import resolve_task
    from kdcore.teacher_sniff import sniff_teacher

    info = sniff_teacher(workdir / "base.zip")
    assert resolve_task(parse_spec(_raw()), info) == "text_classification"
    with pytest.raises(KDError) as caught:
        resolve_task(parse_spec(_raw(task="image_classification")), info)
    assert caught.value.field == "task"


@pytest.mark.parametrize(
    "student",
    [{"arch": "hf", "arch_args": {"num_hidden_layers": 128, "hidden_size": 16384, "num_attention_heads": 256,
                                  "intermediate_size": 65536}},  # about 4e11 parameters
     {"arch": "text_bilstm", "arch_args": {"hidden": 8192, "layers": 8}}],  # about 1.3e10
)
def test_giant_text_students_are_refused_at_the_check_stage_in_seconds(workdir: Path, tmp_path: Path,
                                                                        student: dict[str, Any]) -> None:
    # Counted on the meta device before the teacher loads: neither model is ever allocated.
    recorder = Recorder()
    started = time.monotonic()
    with pytest.raises(ResourceLimitError, match=r"parameter count is [\d,]+, more than the limit of 200,000,000 "
                       r"\(max_model_parameters, set by DISTILLERY_MAX_MODEL_PARAMETERS\)") as caught:
        _run(_spec(workdir, "classifier", student=student), tmp_path, recorder)
    assert caught.value.field == "student.arch_args"
    assert time.monotonic() - started < 10
    assert recorder.stages == ["check"] and recorder.cancel_checks == 0  # nothing trained


@pytest.mark.parametrize("student", [{"arch": "hf", "arch_args": {"num_hidden_layers": 1, "hidden_size": 16,
                                                                  "num_attention_heads": 2}},
                                     {"arch": "text_bilstm", "arch_args": {"hidden": 8}}])
def test_meta_device_count_of_a_text_student_matches_the_built_one(workdir: Path, tmp_path: Path,
                                                                    student: dict[str, Any]) -> None:
    from kdcore.architectures import HFArgs, TextBiLSTMArgs
    from kdcore.hf_models import (
        build_hf_student,
        build_text_bilstm,
        load_teacher_classifier,
        student_parameters_on_meta,
        unpack_hf_zip,
    )

    folder = unpack_hf_zip(workdir / "classifier.zip", tmp_path / "unpacked", field="teacher.file")
    teacher = load_teacher_classifier(folder, ["negative", "positive"])
    if student["arch"] == "hf":
        plan = build_hf_student(teacher, HFArgs.model_validate(student["arch_args"]), seed=0, init_from_teacher=False,
                                teacher_layers=None)
    else:
        plan = build_text_bilstm(teacher, TextBiLSTMArgs.model_validate(student["arch_args"]), num_classes=2,
                                 pad_id=0, seed=0)
    counted = student_parameters_on_meta(folder, student["arch"], student["arch_args"], num_classes=2)
    assert counted == sum(p.numel() for p in plan.model.parameters())


# --- the teacher check of a teacher that is a classifier already ---------------------------------------


@pytest.fixture(scope="module")
def trained_out(workdir: Path) -> Path:
    """A job whose exported teacher_hf.zip is a classifier that knows the task (5 epochs: about 97%)."""
    out = workdir / "trained_teacher"
    spec = _spec(workdir, stages={"teacher_finetune_epochs": 5, "distill_epochs": 1},
                 optim={"lr": 2e-3, "teacher_lr": 5e-3}, export=["safetensors"])
    assert _run(spec, out).metrics["teacher"]["accuracy"] > 0.9
    return out


def _trained_teacher(workdir: Path, out: Path, name: str, swap_labels: bool = False) -> str:
    """The fine-tuned teacher (teacher_hf.zip) of `out` as an upload; with swap_labels its id2label reversed."""
    target = workdir / f"{name}.zip"
    with zipfile.ZipFile(out / "teacher_hf.zip") as source, zipfile.ZipFile(target, "w") as archive:
        for member in source.namelist():
            content = source.read(member)
            if swap_labels and member.endswith("config.json"):
                config = json.loads(content)
                config["id2label"] = {"0": "positive", "1": "negative"}
                config["label2id"] = {"positive": 0, "negative": 1}
                content = json.dumps(config).encode()
            archive.writestr(member, content)
    return name


def test_a_trained_text_classifier_passes_the_check_and_its_score_is_kept(workdir: Path, trained_out: Path,
                                                                          tmp_path: Path) -> None:
    recorder = Recorder()
    spec = _spec(workdir, _trained_teacher(workdir, trained_out, "trained"), stages={"distill_epochs": 1},
                 export=["safetensors"])
    result = _run(spec, tmp_path, recorder)
    check = result.metrics["teacher_check"]
    assert check["passed"] and check["split"] == "validation split" and check["tried"] == []
    assert check["samples"] == 30  # the whole validation split: val_fraction 0.1 of 300 rows
    assert check["accuracy"] >= check["threshold"] > check["chance"]
    assert any(line.startswith("teacher check: ") for line in recorder.logs)
    assert json.loads((tmp_path / "metrics.json").read_text())["teacher_check"]["passed"] is True


def test_a_random_text_classifier_fails_before_training(workdir: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    spec = _spec(workdir, "classifier", stages={"teacher_check": "fail"})
    with pytest.raises(KDError) as caught:
        _run(spec, tmp_path, recorder)
    assert caught.value.code == "teacher_check_failed"
    assert "before any training, near chance" in caught.value.message
    assert "stages.teacher_check: warn" in caught.value.message
    assert recorder.epochs == [] and "distill" not in recorder.stages  # nothing trained


def test_a_text_teacher_with_its_labels_reversed_is_named(workdir: Path, trained_out: Path, tmp_path: Path) -> None:
    # id2label says the opposite of what the head learned: the data's "positive" rows meet output 0.
    spec = _spec(workdir, _trained_teacher(workdir, trained_out, "reversed", swap_labels=True))
    with pytest.raises(KDError) as caught:
        _run(spec, tmp_path)
    assert caught.value.field == "data.train"
    assert "another label order" in caught.value.message and "0->1, 1->0" in caught.value.message


def test_a_teacher_fine_tuned_first_is_not_checked(kd_run: tuple[RunResult, Recorder, Path]) -> None:
    result, recorder, _ = kd_run  # a base model: its head is trained on this data before distillation
    assert "teacher_check" not in result.metrics
    assert not any(line.startswith("teacher check: ") for line in recorder.logs)
