"""A causal-LM job through the real service (`distillery serve`: uvicorn, a Celery worker, SQLite):
a tiny GPT-2 teacher zip and .txt data uploaded, distilled with a top-K teacher cache, the student's
hf zip downloaded and generating with transformers; the same user's second job reuses the cache
without running the teacher, and another user's identical job does not see it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.stack import REPO_ROOT, Stack, running, wait_until
from tests.lm_models import make_lm_zip, sentences
from worker.supervisor import API_MAIN

TOP_K = 8


@pytest.fixture(scope="module")
def lm_job_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lm-job-files")
    train, test = root / "train.txt", root / "test.txt"
    train.write_text("\n".join(sentences(160, seed=1)) + "\n")
    test.write_text("\n".join(sentences(30, seed=2)) + "\n")
    return {"teacher": make_lm_zip(root, "teacher", layers=2, hidden=32), "train": train, "test": test}


def _spec(stack: Stack, files: dict[str, Path]) -> dict[str, Any]:
    return _spec_of(stack.upload(files["teacher"], "teacher"), stack.upload(files["train"], "dataset"),
                    stack.upload(files["test"], "dataset"))


def _spec_of(teacher: str, train: str, test: str) -> dict[str, Any]:
    """The job on these files: ids of uploads, or local paths for the command line to upload."""
    return {
        "teacher": {"file": teacher},
        "student": {"arch_args": {"num_hidden_layers": 1}},
        "data": {"train": train, "test": test, "max_length": 32},
        "method": {"top_k": TOP_K, "divergence": "forward_kl"},
        "stages": {"distill_epochs": 2, "baseline": False},
        "batch_size": 8,
    }


def _cache_logs(stack: Stack, job_id: str) -> list[str]:
    return [event["message"] for event in stack.events(job_id)
            if event["kind"] == "log" and "teacher top-" in event["message"]]


def test_lm_job_through_the_service_reuses_the_owners_teacher_cache_only(
    tmp_path: Path, lm_job_files: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stack = Stack(tmp_path / "data")
    with running(stack):
        stack.start_serve()
        alice, bob = stack.create_user(), stack.create_user()

        stack.use(alice)
        first = stack.wait_for_state(stack.submit(_spec(stack, lm_job_files)), "succeeded", timeout=300)
        metrics = first["metrics"]
        assert metrics["task"] == "causal_lm" and metrics["method"]["top_k"] == TOP_K
        for model in ("teacher", "student"):
            assert metrics[model]["loss"] > 0 and metrics[model]["perplexity"] > 1
            assert 0 <= metrics[model]["accuracy"] <= 1
        assert 0 <= metrics["agreement"] <= 1 and metrics["samples"]
        cache = metrics["teacher_cache"]
        assert cache["used"] and not cache["reused"] and cache["teacher_loaded"] and cache["teacher_forward_tokens"]
        assert any("cached as" in message for message in _cache_logs(stack, first["id"]))

        folder = tmp_path / "student"
        with zipfile.ZipFile(stack.download(first["id"], "student_hf.zip", tmp_path)) as archive:
            archive.extractall(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert model.config.num_hidden_layers == 1
        prompt = tokenizer("the cat", return_tensors="pt")
        generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        assert generated.shape[1] > prompt["input_ids"].shape[1]

        # The same user, the same teacher, data and K (uploaded again: the same bytes): the cache is reused.
        # A student not initialised from the teacher's layers: then nothing reads the teacher's weights at all.
        spec = _spec(stack, lm_job_files)
        spec["student"]["init_from_teacher"] = False
        second = stack.wait_for_state(stack.submit(spec), "succeeded", timeout=300)
        reused = second["metrics"]["teacher_cache"]
        assert reused["used"] and reused["reused"] and reused["key"] == cache["key"]
        assert not reused["teacher_loaded"] and reused["teacher_forward_tokens"] == 0
        assert reused["teacher_forward_tokens_saved"] > 0
        assert second["metrics"]["teacher"]["loss"] == metrics["teacher"]["loss"]  # the cached evaluation
        assert any("the teacher is not run" in message for message in _cache_logs(stack, second["id"]))
        report = stack.download(second["id"], "report.md", tmp_path).read_text()
        assert "reused, the teacher was not run" in report

        # Another user with the very same files and spec computes their own; this one through the command
        # line, whose spec names local files (uploaded by the client) and whose summary is by loss.
        stack.use(bob)
        spec_file = tmp_path / "lm-job.yaml"
        spec_file.write_text(yaml.safe_dump(_spec_of(*(str(lm_job_files[role]) for role in ("teacher", "train",
                                                                                             "test")))))
        submitted = subprocess.run([sys.executable, "-c", API_MAIN, "submit", str(spec_file), "--wait",
                                    "--url", stack.url, "--api-key", bob], capture_output=True, text=True,
                                   timeout=300, cwd=REPO_ROOT, env=stack.env)
        assert submitted.returncode == 0, submitted.stderr + submitted.stdout
        job_id, state = submitted.stdout.replace(";", " ").split()[:2]
        assert state == "succeeded" and "student loss" in submitted.stdout and "nats/token" in submitted.stdout
        other = stack.job(job_id)
        theirs = other["metrics"]["teacher_cache"]
        assert theirs["key"] == cache["key"] and not theirs["reused"] and theirs["teacher_loaded"]
        assert not any("the teacher is not run" in message for message in _cache_logs(stack, other["id"]))


def test_lm_job_resumes_after_a_stopped_service_and_cancels(tmp_path: Path, lm_job_files: dict[str, Path]) -> None:
    """Progress by epoch, a service stopped mid-job handing the job back (it continues from its checkpoint
    when the service runs again), and a cancel that ends it: as for every other job."""
    import signal

    stack = Stack(tmp_path / "data")
    with running(stack):
        stack.start_serve()
        stack.create_user()
        spec = _spec(stack, lm_job_files)
        spec["stages"]["distill_epochs"] = 400  # far more than the test waits for
        job_id = stack.submit(spec)
        running_job = stack.wait_for_epoch(job_id, 2, timeout=180)
        assert 0 < running_job["progress"]["fraction"] < 1 and running_job["progress"]["epochs"] == 400

        serve = stack.processes["serve"]
        serve.send_signal(signal.SIGINT)
        assert serve.wait(timeout=60) == 0
        stack.start_serve()
        # Handed back, the job is queued with its attempt refunded; claimed again, it runs as attempt 1.
        wait_until(lambda: (job := stack.job(job_id))["state"] == "running" and job["attempts"] == 1, timeout=120,
                   what="the job running again", on_timeout=stack.log_tails)
        resumed_at = stack.job(job_id)["progress"].get("epoch") or 0
        wait_until(lambda: (stack.job(job_id)["progress"].get("epoch") or 0) > resumed_at, timeout=180,
                   what="the resumed job training on", on_timeout=stack.log_tails)
        cancelled = stack.cancel(job_id)
        assert cancelled["cancel_requested"] or cancelled["state"] == "cancelled"
        job = stack.wait_for_state(job_id, "cancelled", timeout=120)
        assert job["attempts"] == 1
        events = stack.events(job_id)
        resumes = [event for event in events if event["kind"] == "resume"]
        assert len(resumes) == 1 and resumes[0]["epoch"] >= 2 and resumes[0]["stage"] == "distill"
        # The first attempt stored the teacher's top-K before it was stopped: the resumed one did not run it.
        assert any("the teacher is not run" in event.get("message", "") for event in events if event["kind"] == "log")
