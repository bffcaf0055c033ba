"""One job on two processes of this CPU (gloo), through the elastic launcher as users run it.

The jobs run as `python -m kdcore.cli distill SPEC --out DIR` subprocesses, which re-run themselves
under `torch.distributed.run`; nothing is simulated: the ranks, the rendezvous, DDP's all-reduce and
the agent's restarts are PyTorch's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kdcore.callbacks import Callbacks
from kdcore.distributed import Group
from kdcore.errors import CancelledError
from kdcore.spec import JobSpec, validation_errors
from tests.kdcore.helpers import make_blob_images, save_safetensors_teacher, train_teacher

REPO = Path(__file__).resolve().parents[2]
TEACHER_ARGS = {"hidden": [32]}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ddp")
    data = make_blob_images(folder / "blobs.npz", num_train=600, num_test=200)
    teacher = save_safetensors_teacher(train_teacher("mlp", TEACHER_ARGS, data, epochs=4),
                                       folder / "teacher.safetensors")
    big = make_blob_images(folder / "big.npz", num_train=20000, num_test=200, size=16)
    big_teacher = save_safetensors_teacher(train_teacher("mlp", TEACHER_ARGS, big, epochs=1),
                                           folder / "big_teacher.safetensors")
    return {"data": data, "teacher": teacher, "big": big, "big_teacher": big_teacher}


def _spec(folder: Path, teacher: Path, data: Path, *, nproc: int, epochs: int = 3, **extra: Any) -> Path:
    spec = {
        "teacher": {"file": str(teacher), "arch": "mlp", "arch_args": TEACHER_ARGS},
        # No dropout or BatchNorm: with them the ranks' randomness or statistics would differ by design.
        "student": {"arch": "mlp", "arch_args": {"hidden": [16]}},
        "data": {"train": str(data), "val_fraction": 0.2},
        "stages": {"distill_epochs": epochs},
        "batch_size": 32,
        "optim": {"lr": 0.005},
        "export": ["safetensors"],
        "distributed": {"nproc": nproc},
        **extra,
    }
    path = folder / f"spec-{nproc}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec))
    return path


def _env() -> dict[str, str]:
    # The ranks import this checkout (a worktree's, not the editable install's), and run quietly.
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _distill(spec: Path, out: Path, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "kdcore.cli", "distill", str(spec), "--out", str(out),
                             "--no-progress"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kwargs)


def _finish(process: subprocess.Popen[str], timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def _history(out: Path) -> list[dict[str, str]]:
    lines = (out / "history.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_job(process: subprocess.Popen[str]) -> None:
    """SIGKILL the launcher, its agent and every rank at once, as a lost machine would.

    The elastic agent starts each rank in a session of its own, so killing the launcher's process group
    leaves the ranks running (they would finish the job behind the test's back): they are found first.
    """
    ranks = _descendants(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)
    _wait_for(lambda: not any(_alive(pid) for pid in ranks), 30, "the ranks to die")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _rank_pid(launcher: int, rank: int) -> int | None:
    for pid in _descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
            return pid
    return None


def _wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_ddp_job_on_two_processes_matches_the_single_process_job(files: dict[str, Path], tmp_path: Path) -> None:
    _finish(_distill(_spec(tmp_path, files["teacher"], files["data"], nproc=1), tmp_path / "one"))
    double = _finish(_distill(_spec(tmp_path, files["teacher"], files["data"], nproc=2), tmp_path / "two"))

    # Rank 0 speaks for the group: one summary line, not two.
    assert sum(line.startswith('{"out"') for line in double.splitlines()) == 1, double
    one, two = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert two["distributed"] == {"world_size": 2, "strategy": "ddp", "global_batch": 32, "per_rank_batch": 16.0,
                                  "backend": "gloo"}
    assert "distributed" not in one
    # The same global batches, the gradients of the two halves averaged: the same run up to float rounding.
    for a, b in zip(_history(tmp_path / "one"), _history(tmp_path / "two"), strict=True):
        assert (a["stage"], a["epoch"]) == (b["stage"], b["epoch"])
        for key in ("train_loss", "val_loss", "val_accuracy"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-6), (key, a, b)
    assert two["student"]["accuracy"] == pytest.approx(one["student"]["accuracy"], abs=1 / 200)
    assert two["student"]["loss"] == pytest.approx(one["student"]["loss"], rel=1e-3)


def test_a_killed_rank_restarts_the_group_from_its_checkpoint(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    # Restarts to spare: on a loaded machine a restarted rank may knock before its peer listens, and
    # gloo gives up its connection after three quick tries; that round then fails and the next one joins.
    spec = _spec(tmp_path, files["big_teacher"], files["big"], nproc=2, epochs=12, batch_size=64,
                 distributed={"nproc": 2, "max_restarts": 3})
    process = _distill(spec, out)
    _wait_for(lambda: (out / "checkpoints" / "checkpoint.pt").exists(), 180, "the first checkpoint")
    victim = _wait_for(lambda: _rank_pid(process.pid, 1), 30, "rank 1")
    os.kill(victim, signal.SIGKILL)

    output = _finish(process, timeout=400)
    assert "resuming from the checkpoint after distill epoch" in output, output
    epochs = [(row["stage"], int(row["epoch"])) for row in _history(out)]
    assert epochs == [("distill", e) for e in range(1, 13)] + [("baseline", e) for e in range(1, 13)]
    assert json.loads((out / "metrics.json").read_text())["distributed"]["world_size"] == 2


def test_a_distributed_checkpoint_resumes_on_one_process(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    process = _distill(_spec(tmp_path, files["big_teacher"], files["big"], nproc=2, epochs=12, batch_size=64), out)
    _wait_for(lambda: (out / "checkpoints" / "checkpoint.pt").exists(), 180, "the first checkpoint")
    kill_job(process)
    assert not (out / "metrics.json").exists()

    output = _finish(_distill(_spec(tmp_path, files["big_teacher"], files["big"], nproc=1, epochs=12,
                                    batch_size=64), out), timeout=400)
    assert "resuming from the checkpoint after distill epoch" in output, output
    epochs = [(row["stage"], int(row["epoch"])) for row in _history(out)]
    assert epochs == [("distill", e) for e in range(1, 13)] + [("baseline", e) for e in range(1, 13)]
    assert "distributed" not in json.loads((out / "metrics.json").read_text())


class _CancelAtStep(Callbacks):
    def __init__(self, step: int) -> None:
        self.calls, self.step = 0, step

    def should_cancel(self) -> bool:
        self.calls += 1
        return self.calls > self.step


def _cancel_rank(rank: int, world: int, init_file: str, results: Any, strategy: str) -> None:
    import torch.distributed as dist

    from kdcore.checkpoint import RunState
    from kdcore.losses import cross_entropy_loss
    from kdcore.runtime import Runtime
    from kdcore.spec import OptimSpec
    from kdcore.trainer import DeviceData, ProgressTracker, Stage, Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = Group(rank=rank, world=world, strategy=strategy)
    torch.manual_seed(0)
    data = DeviceData(torch.rand(256, 1, 4, 4), torch.randint(0, 2, (256,)))
    # Only rank 0 is told to cancel, as only rank 0 hears from the worker.
    callbacks = _CancelAtStep(3) if rank == 0 else Callbacks()
    trainer = Trainer(runtime=Runtime(torch.device("cpu"), "fp32"), optim=OptimSpec(), train=data, val=None,
                      preprocess=torch.nn.Flatten(), batch_size=16, eval_batch_size=64, seed=0, callbacks=callbacks,
                      checkpointer=None, tracker=ProgressTracker(total_steps=16), group=group)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    try:
        trainer.fit(Stage("distill", "student", 1, 0.01, 0), model, cross_entropy_loss, RunState())
        results.put((rank, "finished", trainer.tracker.done_steps))
    except CancelledError:
        results.put((rank, "cancelled", trainer.tracker.done_steps))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_cancel_seen_by_rank_0_stops_every_rank_at_the_same_step(tmp_path: Path, strategy: str) -> None:
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_cancel_rank, args=(rank, 2, str(tmp_path / "init"), results, strategy))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    outcomes = sorted(results.get(timeout=5) for _ in range(2))
    assert outcomes == [(0, "cancelled", 3), (1, "cancelled", 3)]


def test_a_group_shares_each_global_batch_with_weights_that_keep_its_mean() -> None:
    shares = [Group(rank=r, world=2).share(5) for r in range(2)]
    assert [len(range(5)[rows]) for rows, _ in shares] == [3, 2]
    assert [weight for _, weight in shares] == [pytest.approx(1.2), pytest.approx(0.8)]
    # A last batch of one sample: rank 1 still runs backward (DDP waits for it), on a row that counts zero.
    assert Group(rank=1, world=2).share(1) == (slice(0, 1), 0.0)
    assert Group().share(7) == (slice(None), 1.0)


@pytest.mark.parametrize(("distributed", "extra", "field", "words"), [
    ({"nproc": 2, "replicate_teacher_mb": -1}, {}, "distributed.replicate_teacher_mb", "greater than or equal to 0"),
    ({"nproc": 4}, {"batch_size": 2}, "batch_size", "smaller than distributed.nproc (4)"),
    ({"nproc": 0}, {}, "distributed.nproc", "greater than or equal to 1"),
])
def test_distributed_fields_are_checked(distributed: dict[str, Any], extra: dict[str, Any], field: str,
                                        words: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate({"teacher": {"file": "t"}, "data": {"train": "d"}, "distributed": distributed, **extra})
    errors = validation_errors(caught.value)
    assert errors[0]["field"] == field and words in errors[0]["message"], errors


def test_fsdp_is_a_strategy_of_the_spec() -> None:
    spec = JobSpec.model_validate({"teacher": {"file": "t"}, "data": {"train": "d"},
                                   "distributed": {"nproc": 2, "strategy": "fsdp"}})
    assert spec.distributed.strategy == "fsdp" and spec.distributed.replicate_teacher_mb == 2048


def test_fsdp_for_an_image_job_is_refused_before_anything_starts(files: dict[str, Path], tmp_path: Path) -> None:
    from kdcore.errors import KDError
    from kdcore.pipeline import JobInputs, RunOptions, run_job
    from kdcore.spec import parse_spec

    spec = parse_spec(json.loads(_spec(tmp_path, files["teacher"], files["data"], nproc=2,
                                       distributed={"nproc": 2, "strategy": "fsdp"}).read_text()))
    with pytest.raises(KDError) as caught:
        run_job(spec, JobInputs(teacher=files["teacher"], train=files["data"]), RunOptions(out_dir=tmp_path / "out"))
    assert caught.value.field == "distributed.strategy" and "strategy ddp" in str(caught.value)
