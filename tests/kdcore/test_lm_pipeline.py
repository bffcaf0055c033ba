"""causal_lm jobs end to end through `run_job`: kd and seq_kd, the reusable top-K cache, cancel, resume,
the memory estimate, and the exported student loaded back by transformers and generating."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from kdcore import lm_pipeline
from kdcore.errors import CancelledError
from kdcore.limits import ResourceLimitError, ResourceLimits
from kdcore.pipeline import JobInputs, RunOptions, RunResult, run_job
from kdcore.spec import JobSpec, parse_spec
from tests.kdcore.test_text_pipeline import Recorder
from tests.lm_models import make_lm_zip, sentences, write_completion_jsonl, write_text_jsonl

TRAIN_ROWS = 96


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lm_pipeline")
    make_lm_zip(root, "llama", family="llama", vocab_padding=16, seed=0)  # padded like Qwen2.5-7B
    make_lm_zip(root, "gpt2", family="gpt2", seed=0)
    write_text_jsonl(root / "train.jsonl", sentences(TRAIN_ROWS, seed=1))
    write_text_jsonl(root / "test.jsonl", sentences(24, seed=2))
    write_completion_jsonl(root / "prompts.jsonl", sentences(24, seed=3), with_completion=False)
    return root


def _spec(workdir: Path, teacher: str = "llama", **overrides: Any) -> JobSpec:
    raw: dict[str, Any] = {
        "teacher": {"file": str(workdir / f"{teacher}.zip")},
        "student": {"arch_args": {"num_hidden_layers": 1}},
        "data": {"train": str(workdir / "train.jsonl"), "test": str(workdir / "test.jsonl"), "max_length": 32},
        "stages": {"distill_epochs": 1},
        "batch_size": 8,
        "threads": 1,
    }
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return parse_spec(raw)


def _run(spec: JobSpec, out: Path, recorder: Recorder | None = None, **options: Any) -> RunResult:
    inputs = JobInputs(teacher=Path(spec.teacher.file), train=Path(spec.data.train),
                       test=Path(spec.data.test) if spec.data.test else None)
    return run_job(spec, inputs, RunOptions(out_dir=out, latency_runs=1, **options), recorder)


def test_kd_job_reports_lm_metrics_and_exports_a_generating_student(workdir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recorder = Recorder()
    result = _run(_spec(workdir, stages={"baseline": True}), tmp_path / "out", recorder)
    metrics = result.metrics
    assert metrics["task"] == "causal_lm"
    for key in ("teacher", "student", "baseline"):
        model = metrics[key]
        assert model["loss"] > 0 and model["perplexity"] == pytest.approx(math.exp(model["loss"]))
        assert 0 <= model["accuracy"] <= 1 and model["tokens_per_s"] > 0 and model["params"] > 0
    assert metrics["student"]["params"] < metrics["teacher"]["params"]
    assert 0 <= metrics["agreement"] <= 1 and "distillation_gain" in metrics
    assert len(metrics["samples"]) == 3 and {"prompt", "teacher", "student", "baseline"} <= set(metrics["samples"][0])
    assert metrics["memory_estimate"]["total_bytes"] > 0
    assert recorder.stages[:2] == ["check", "distill"] and "baseline" in recorder.stages
    names = {path.name for path in result.artifacts}
    assert {"student_hf.zip", "student.safetensors", "metrics.json", "report.md", "history.csv"} <= names
    assert "nats per token" in (tmp_path / "out" / "report.md").read_text()

    folder = tmp_path / "reloaded"
    with zipfile.ZipFile(tmp_path / "out" / "student_hf.zip") as archive:
        archive.extractall(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tokenizer("the cat", return_tensors="pt")
    output = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert output.shape[1] > ids["input_ids"].shape[1]
    assert model.config.num_hidden_layers == 1


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_other_divergences_train(workdir: Path, tmp_path: Path, divergence: str) -> None:
    # jsd with gradient checkpointing on: the option runs end to end.
    spec = _spec(workdir, "gpt2", method={"divergence": divergence, "beta": 0.3}, export=["safetensors"],
                 gradient_checkpointing=divergence == "jsd")
    result = _run(spec, tmp_path)
    assert result.metrics["method"]["divergence"] == divergence
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert history["student"]["loss"] > 0


def test_top_k_cache_is_reused_by_a_second_job_without_loading_the_teacher(workdir: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(workdir, method={"top_k": 8}, student={"init_from_teacher": False}, export=["safetensors"])
    cache_dir = tmp_path / "cache"
    first = _run(spec, tmp_path / "first", lm_cache_dir=cache_dir)
    files = list(cache_dir.glob("*.safetensors"))
    assert len(files) == 1 and first.metrics["teacher_cache"]["reused"] is False
    assert files[0].stem == first.metrics["teacher_cache"]["key"]

    real = lm_pipeline.load_causal_lm

    def refuse_teacher(folder: Any, tokenizer: Any, *, field: str, **kwargs: Any) -> Any:
        if field == "teacher.file":
            raise AssertionError("the teacher's weights were loaded")
        return real(folder, tokenizer, field=field, **kwargs)

    monkeypatch.setattr(lm_pipeline, "load_causal_lm", refuse_teacher)
    second = _run(spec.model_copy(update={"seed": 0}), tmp_path / "second", lm_cache_dir=cache_dir)
    cache = second.metrics["teacher_cache"]
    assert cache["reused"] is True and cache["teacher_loaded"] is False and cache["teacher_forward_tokens"] == 0
    assert cache["teacher_forward_tokens_saved"] == first.metrics["teacher_cache"]["teacher_forward_tokens"] > 0
    assert second.metrics["teacher"] == first.metrics["teacher"]
    assert second.metrics["student"]["loss"] == pytest.approx(first.metrics["student"]["loss"], rel=1e-5)

    # Another K is another key: this job needs the teacher, and the patched loader proves it is asked for.
    with pytest.raises(AssertionError, match="teacher's weights were loaded"):
        _run(_spec(workdir, method={"top_k": 4}, student={"init_from_teacher": False}, export=["safetensors"]),
             tmp_path / "third", lm_cache_dir=cache_dir)


def test_top_k_student_is_close_to_full_logit_student_when_k_covers_the_vocabulary(workdir: Path,
                                                                                  tmp_path: Path) -> None:
    full = _run(_spec(workdir, "gpt2", export=["safetensors"]), tmp_path / "full")
    assert full.metrics["teacher_cache"]["used"] is False  # the teacher ran live
    top = _run(_spec(workdir, "gpt2", method={"top_k": 4096}, export=["safetensors"]), tmp_path / "top")
    assert top.metrics["student"]["loss"] == pytest.approx(full.metrics["student"]["loss"], rel=2e-3)


def test_cancel_during_distill_stops_within_one_step(workdir: Path, tmp_path: Path) -> None:
    recorder = Recorder(cancel_after_steps=3)
    with pytest.raises(CancelledError):
        _run(_spec(workdir), tmp_path, recorder, progress_interval_s=0.0)
    assert max(p.step for p in recorder.progress if p.stage == "distill") == 3
    assert recorder.cancel_checks == 4 and recorder.epochs == []


def test_resumed_run_ends_with_the_same_student(workdir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    spec = _spec(workdir, stages={"distill_epochs": 2, "baseline": True}, export=["safetensors"])
    straight_recorder = Recorder()
    straight_run = _run(spec, tmp_path / "straight", straight_recorder, progress_interval_s=0.0)
    steps_per_epoch = max(p.step for p in straight_recorder.progress if p.stage == "distill")

    checkpoints = tmp_path / "checkpoints"
    with pytest.raises(CancelledError):
        _run(spec, tmp_path / "interrupted", Recorder(cancel_after_steps=steps_per_epoch + 2),
             checkpoint_dir=checkpoints)
    recorder = Recorder()
    resumed = _run(spec, tmp_path / "resumed", recorder, checkpoint_dir=checkpoints)
    assert resumed.resumed_from == ("distill", 1)
    assert [(e.stage, e.epoch) for e in recorder.epochs] == [("distill", 2), ("baseline", 1), ("baseline", 2)]
    # The baseline starts from the same teacher-copied initialisation as in the uninterrupted run.
    assert resumed.metrics["baseline"]["loss"] == pytest.approx(straight_run.metrics["baseline"]["loss"], rel=1e-5)
    straight = load_file(str(tmp_path / "straight" / "student.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "student.safetensors"))
    assert straight.keys() == again.keys()
    for name in straight:
        assert torch.allclose(straight[name], again[name], atol=1e-6), name


def test_seq_kd_trains_on_teacher_answers_kept_as_an_artifact(workdir: Path, tmp_path: Path) -> None:
    spec = _spec(workdir, "gpt2", method={"name": "seq_kd", "max_new_tokens": 6},
                 data={"train": str(workdir / "prompts.jsonl"), "test": None}, export=["safetensors"])
    result = _run(spec, tmp_path)
    answers = [json.loads(line) for line in (tmp_path / "teacher_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 22  # 24 prompts, 2 held out for validation
    assert all(set(row) == {"prompt", "completion"} for row in answers)
    assert tmp_path / "teacher_answers.jsonl" in result.artifacts
    assert result.metrics["eval_tokens"] > 0  # prompt-only validation rows are scored against the teacher's answers


def test_job_over_the_memory_limit_is_refused_with_the_estimate(workdir: Path, tmp_path: Path) -> None:
    limits = ResourceLimits(max_train_memory_bytes=100_000)
    with pytest.raises(ResourceLimitError) as caught:
        _run(_spec(workdir), tmp_path, limits=limits)
    assert "estimated training memory" in caught.value.message and "student" in caught.value.message
    assert caught.value.field == "batch_size"


def test_teacher_finetune_then_chat_distillation_exports_the_adapted_teacher(workdir: Path, tmp_path: Path) -> None:
    from tests.lm_models import write_chat_jsonl

    write_chat_jsonl(tmp_path / "chat.jsonl", sentences(40, seed=4))
    spec = _spec(workdir, "gpt2", data={"train": str(tmp_path / "chat.jsonl"), "test": None},
                 stages={"teacher_finetune_epochs": 2, "distill_epochs": 1}, optim={"teacher_lr": 5e-3},
                 export=["hf"])
    recorder = Recorder()
    result = _run(spec, tmp_path / "out", recorder)
    assert result.metrics["data_kind"] == "chat"
    assert recorder.stages.index("teacher_finetune") < recorder.stages.index("distill")
    history = (tmp_path / "out" / "history.csv").read_text().splitlines()
    teacher_rows = [line for line in history if line.startswith("teacher_finetune")]
    assert len(teacher_rows) == 2
    header = history[0].split(",")
    losses = [float(row.split(",")[header.index("train_loss")]) for row in teacher_rows]
    assert losses[1] < losses[0]  # the teacher learns the assistant turns
    assert {"teacher_hf.zip", "student_hf.zip"} <= {path.name for path in result.artifacts}


def test_bf16_job_holds_the_frozen_teacher_in_bf16(workdir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    dtypes: list[torch.dtype] = []
    real = lm_pipeline.load_causal_lm

    def record(folder: Any, tokenizer: Any, *, field: str, **kwargs: Any) -> Any:
        dtypes.append(kwargs.get("dtype", torch.float32))
        return real(folder, tokenizer, field=field, **kwargs)

    monkeypatch.setattr(lm_pipeline, "load_causal_lm", record)
    result = _run(_spec(workdir, "gpt2", precision="bf16", export=["safetensors"]), tmp_path)
    assert dtypes == [torch.bfloat16]
    assert result.metrics["student"]["loss"] > 0


def test_a_cache_that_does_not_fit_the_data_is_computed_again(workdir: Path, tmp_path: Path) -> None:
    spec = _spec(workdir, "gpt2", method={"top_k": 4}, export=["safetensors"])
    cache_dir = tmp_path / "cache"
    first = _run(spec, tmp_path / "first", lm_cache_dir=cache_dir)
    (path,) = cache_dir.glob("*.safetensors")
    from kdcore.lm_cache import TeacherTopKCache

    cache = TeacherTopKCache.load(path)
    cache.offsets = cache.offsets[:-1]  # as if the data had been tokenised otherwise when it was made
    cache.save(path)
    recorder = Recorder()
    second = _run(spec, tmp_path / "second", recorder, lm_cache_dir=cache_dir)
    assert any("does not fit" in line for line in recorder.logs)
    assert second.metrics["teacher_cache"]["reused"] is False
    assert second.metrics["student"]["loss"] == pytest.approx(first.metrics["student"]["loss"], rel=1e-5)


def test_cli_distills_a_language_model_and_keeps_the_cache(workdir: Path, tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from kdcore.cli import app

    spec = {"teacher": {"file": str(workdir / "gpt2.zip")}, "student": {"arch_args": {"num_hidden_layers": 1}},
            "data": {"train": str(workdir / "train.jsonl"), "max_length": 32}, "method": {"top_k": 4},
            "stages": {"baseline": False}, "export": ["safetensors"], "threads": 1}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    done = CliRunner().invoke(app, ["distill", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out"),
                                    "--no-progress", "--lm-cache-dir", str(tmp_path / "cache")])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output.strip().splitlines()[-1])
    assert set(summary["loss"]) == {"teacher", "student"} and summary["loss"]["student"] > 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
