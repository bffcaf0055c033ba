"""Causal-LM jobs on two processes of this CPU (gloo, ddp), through the elastic launcher as users run them.

The tiny Llama has no dropout, so a rank's half of a batch sees what the single process sees of it: the
two-process job must end where the one-process job ends, up to float rounding. A rank's loss is the
mean over its own scored tokens; weighted by its share of the global batch's tokens, the ranks'
averaged gradients are the single process's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.kdcore.test_distributed_text import ABS, REL, _distill, _finish, _history, _metrics
from tests.lm_models import make_lm_zip, sentences, write_text_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("lm_ddp")
    return {"teacher": make_lm_zip(folder, "llama", family="llama", seed=0),
            "train": write_text_jsonl(folder / "train.jsonl", sentences(96, seed=1)),
            "test": write_text_jsonl(folder / "test.jsonl", sentences(24, seed=2))}


def _spec(folder: Path, files: dict[str, Path], *, nproc: int, **method: Any) -> Path:
    spec = {
        "teacher": {"file": str(files["teacher"])},
        "student": {"arch_args": {"num_hidden_layers": 1}},
        "data": {"train": str(files["train"]), "test": str(files["test"]), "max_length": 32},
        "stages": {"distill_epochs": 2},
        "method": {"name": "kd", **method},
        "batch_size": 8,
        "export": ["safetensors"],
        "distributed": {"nproc": nproc},
    }
    path = folder / f"spec-{nproc}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("method", [{}, {"top_k": 8}], ids=["live-teacher", "top-k-cache"])
def test_a_ddp_lm_job_on_two_processes_matches_the_single_process_job(files: dict[str, Path], tmp_path: Path,
                                                                       method: dict[str, Any]) -> None:
    _finish(_distill(_spec(tmp_path, files, nproc=1, **method), tmp_path / "one"))
    output = _finish(_distill(_spec(tmp_path, files, nproc=2, **method), tmp_path / "two"))
    assert sum(line.startswith('{"out"') for line in output.splitlines()) == 1, output
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert two["distributed"] == {"world_size": 2, "strategy": "ddp", "global_batch": 8, "per_rank_batch": 4.0,
                                  "backend": "gloo"}
    for a, b in zip(_history(tmp_path / "one"), _history(tmp_path / "two"), strict=True):
        assert (a["stage"], a["epoch"]) == (b["stage"], b["epoch"])
        for key in ("train_loss", "val_loss", "val_accuracy"):
            if a.get(key):
                assert float(b[key]) == pytest.approx(float(a[key]), rel=REL, abs=ABS), (key, a, b)
    assert two["student"]["loss"] == pytest.approx(one["student"]["loss"], rel=REL, abs=ABS)
    assert two["student"]["accuracy"] == pytest.approx(one["student"]["accuracy"], abs=1e-6)
    # The top-K cache is computed once between the ranks: the same rows, the teacher's tokens counted once.
    assert two["teacher_cache"] == one["teacher_cache"]


def test_fsdp_for_an_lm_job_is_refused_when_it_starts(files: dict[str, Path], tmp_path: Path) -> None:
    from kdcore.errors import KDError
    from kdcore.pipeline import JobInputs, RunOptions, run_job
    from kdcore.spec import parse_spec

    raw = json.loads(_spec(tmp_path, files, nproc=2).read_text())
    raw["distributed"]["strategy"] = "fsdp"
    with pytest.raises(KDError) as caught:
        run_job(parse_spec(raw), JobInputs(teacher=files["teacher"], train=files["train"]),
                RunOptions(out_dir=tmp_path / "out"))
    assert caught.value.field == "distributed.strategy"
