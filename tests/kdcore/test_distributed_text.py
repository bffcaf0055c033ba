"""Text classification jobs on two processes of this CPU (gloo): DDP, FSDP2 and DCP checkpoints.

As in `test_distributed.py`, the jobs run as `python -m kdcore.cli distill SPEC --out DIR`, which re-run
themselves under `torch.distributed.run`: real ranks, real collectives, nothing simulated. The tiny
BERT has no dropout, so a rank's half of a batch sees what the single process sees of it, and a
two-process job must end where the one-process job ends, up to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.kdcore.test_distributed import kill_job
from tests.text_models import make_tokenizer, sentences, write_jsonl, zip_folder

REPO = Path(__file__).resolve().parents[2]
# Float rounding only: the two ranks sum gradients in another order than one process does, and the
# padding of a rank's half of a batch differs. Measured (this CPU, ddp, fsdp, resumes): at most 7.6e-7
# relative on any epoch's train or validation loss, identical accuracies; the bound leaves 100x room.
REL, ABS = 1e-4, 1e-5


def _bert_zip(folder: Path) -> Path:
    """A 2-layer BERT classifier without dropout, with its tokenizer, zipped as a user uploads it."""
    from transformers import BertConfig, BertForSequenceClassification

    model_folder = folder / "bert"
    model_folder.mkdir(parents=True)
    tokenizer = make_tokenizer(model_folder)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    config.num_labels = 2
    config.id2label = {0: "negative", 1: "positive"}
    config.label2id = {"negative": 0, "positive": 1}
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(str(model_folder), safe_serialization=True)
    return zip_folder(model_folder, folder / "teacher.zip")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("text_ddp")
    return {"teacher": _bert_zip(folder), "train": write_jsonl(folder / "train.jsonl", sentences(300, seed=1)),
            "test": write_jsonl(folder / "test.jsonl", sentences(100, seed=2))}


def _spec(folder: Path, files: dict[str, Path], *, nproc: int, strategy: str = "ddp", distill_epochs: int = 2,
          **distributed: Any) -> Path:
    spec = {
        "teacher": {"file": str(files["teacher"])},
        "student": {"arch_args": {"num_hidden_layers": 1}},
        "data": {"train": str(files["train"]), "test": str(files["test"])},
        # The teacher is fine-tuned first (a trained, then frozen, model under either strategy), then distilled.
        "stages": {"teacher_finetune_epochs": 1, "distill_epochs": distill_epochs, "baseline": False},
        "optim": {"lr": 2e-3, "teacher_lr": 2e-3, "grad_clip": 1.0},
        "export": ["safetensors"],
        "distributed": {"nproc": nproc, "strategy": strategy, **distributed},
    }
    path = folder / f"spec-{nproc}-{strategy}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DISTILLERY_DEBUG": "1"}


def _distill(spec: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kdcore.cli", "distill", str(spec), "--out", str(out),
                             "--no-progress"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _finish(process: subprocess.Popen[str], timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def _history(out: Path) -> list[dict[str, str]]:
    lines = (out / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]


def _metrics(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "metrics.json").read_text()))


def _assert_same_run(one: Path, two: Path) -> None:
    """Every epoch's losses and accuracy, then the final test figures, within `REL` / `ABS`."""
    for a, b in zip(_history(one), _history(two), strict=True):
        assert (a["stage"], a["epoch"]) == (b["stage"], b["epoch"])
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=REL, abs=ABS), (key, a, b)
    first, second = _metrics(one), _metrics(two)
    for model in ("teacher", "student"):
        assert second[model]["accuracy"] == first[model]["accuracy"], model
        assert second[model]["loss"] == pytest.approx(first[model]["loss"], rel=REL, abs=ABS), model
    assert second["agreement"] == first["agreement"]


@pytest.fixture(scope="module")
def single(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process job every distributed run is held to."""
    folder = tmp_path_factory.mktemp("single")
    _finish(_distill(_spec(folder, files, nproc=1), folder / "out"))
    assert "distributed" not in _metrics(folder / "out")
    return folder / "out"


def test_a_ddp_text_job_on_two_processes_matches_the_single_process_job(files: dict[str, Path], single: Path,
                                                                         tmp_path: Path) -> None:
    output = _finish(_distill(_spec(tmp_path, files, nproc=2), tmp_path / "two"))
    assert sum(line.startswith('{"out"') for line in output.splitlines()) == 1, output
    assert _metrics(tmp_path / "two")["distributed"] == {"world_size": 2, "strategy": "ddp", "global_batch": 32,
                                                         "per_rank_batch": 16.0, "backend": "gloo"}
    _assert_same_run(single, tmp_path / "two")


def test_an_fsdp_text_job_on_two_processes_matches_the_single_process_job(files: dict[str, Path], single: Path,
                                                                           tmp_path: Path) -> None:
    output = _finish(_distill(_spec(tmp_path, files, nproc=2, strategy="fsdp"), tmp_path / "two"))
    assert sum(line.startswith('{"out"') for line in output.splitlines()) == 1, output
    assert _metrics(tmp_path / "two")["distributed"] == {
        "world_size": 2, "strategy": "fsdp", "global_batch": 32, "per_rank_batch": 16.0, "backend": "gloo",
        "teacher": "sharded"}  # fine-tuned under fsdp, so sharded whatever its size
    _assert_same_run(single, tmp_path / "two")
    # The DCP folders went with the checkpoint once the job succeeded.
    assert not (tmp_path / "two" / "checkpoints" / "sharded").exists() or not any(
        (tmp_path / "two" / "checkpoints" / "sharded").iterdir())


def test_a_frozen_teacher_over_the_limit_is_sharded_and_the_job_still_matches(files: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    """replicate_teacher_mb 0: the frozen teacher's cache pass runs sharded, in lockstep across the ranks."""
    def spec(nproc: int) -> Path:
        path = _spec(tmp_path, files, nproc=nproc, strategy="fsdp", distill_epochs=1, replicate_teacher_mb=0)
        raw = json.loads(path.read_text())
        raw["stages"]["teacher_finetune_epochs"] = 0
        raw["stages"]["teacher_check"] = "warn"  # the random head is near chance by design
        path.write_text(json.dumps(raw))
        return path

    _finish(_distill(spec(1), tmp_path / "one"))
    output = _finish(_distill(spec(2), tmp_path / "two"))
    assert "it is sharded across the 2 ranks" in output, output
    assert _metrics(tmp_path / "two")["distributed"]["teacher"] == "sharded"
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def _checkpoint_stage(out: Path) -> tuple[str, int] | None:
    try:
        state = torch.load(out / "checkpoints" / "checkpoint.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError):
        return None
    return state["stage"], state["epoch"]


RESUME_EPOCHS = 6


@pytest.fixture(scope="module")
def straight(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted one-process job that an interrupted and resumed job must end like."""
    folder = tmp_path_factory.mktemp("straight")
    _finish(_distill(_spec(folder, files, nproc=1, distill_epochs=RESUME_EPOCHS), folder / "out"))
    return folder / "out"


def _killed_in_distill(spec: Path, out: Path) -> None:
    """Run the job until its checkpoint is inside distillation, then kill every process of it at once."""
    process = _distill(spec, out)
    deadline = time.monotonic() + 240
    while (found := _checkpoint_stage(out)) is None or found[0] != "distill":
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.02)
    kill_job(process)
    assert not (out / "metrics.json").exists()


def _resumed(spec: Path, out: Path) -> None:
    output = _finish(_distill(spec, out))
    assert "resuming from the checkpoint after distill epoch" in output, output
    assert [(row["stage"], int(row["epoch"])) for row in _history(out)] == (
        [("teacher_finetune", 1)] + [("distill", epoch) for epoch in range(1, RESUME_EPOCHS + 1)])


def test_an_fsdp_checkpoint_resumes_on_one_process(files: dict[str, Path], straight: Path, tmp_path: Path) -> None:
    """Killed inside distillation, the two-rank job's DCP checkpoint carries on in a one-process job,
    which ends where an uninterrupted one-process job ends."""
    out = tmp_path / "out"
    _killed_in_distill(_spec(tmp_path, files, nproc=2, strategy="fsdp", distill_epochs=RESUME_EPOCHS), out)
    folders = list((out / "checkpoints" / "sharded").iterdir())
    assert folders and all((folder / ".metadata").exists() for folder in folders)

    _resumed(_spec(tmp_path, files, nproc=1, distill_epochs=RESUME_EPOCHS), out)
    assert "distributed" not in _metrics(out)
    _assert_same_run(straight, out)
    assert not any((out / "checkpoints" / "sharded").iterdir())  # the plain checkpoint took over


def test_a_one_process_checkpoint_resumes_under_fsdp(files: dict[str, Path], straight: Path, tmp_path: Path) -> None:
    """The other way: a plain checkpoint's weights and optimiser state are sharded onto two ranks."""
    out = tmp_path / "out"
    _killed_in_distill(_spec(tmp_path, files, nproc=1, distill_epochs=RESUME_EPOCHS), out)

    _resumed(_spec(tmp_path, files, nproc=2, strategy="fsdp", distill_epochs=RESUME_EPOCHS), out)
    assert _metrics(out)["distributed"]["strategy"] == "fsdp"
    _assert_same_run(straight, out)
