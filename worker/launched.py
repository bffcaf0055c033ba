"""A distributed job's attempt: the engine on `distributed.nproc` ranks under PyTorch's elastic launcher.

The worker stays the one writer of the job's row. It runs `kdcore.cli distill` through
`torch.distributed.run` (the spec with the downloaded inputs' paths, the operator's limits, the
checkpoint folder it downloaded into), follows rank 0's relayed callbacks (`kdcore.relay`) into the
job's own callbacks, and passes a cancel, a shutdown or a lost lease on to the ranks as SIGTERM.
When the launcher ends, the run's metrics and artifacts are read from the output folder as a
single-process run would have returned them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcore.callbacks import Callbacks
from kdcore.errors import KDError

if TYPE_CHECKING:
    from kdcore.limits import ResourceLimits
    from kdcore.pipeline import JobInputs, RunResult
    from kdcore.spec import JobSpec
    from worker.job_run import StopFlags

logger = logging.getLogger("distillery.worker")
FOLLOW_INTERVAL_S = 0.2
# After SIGTERM the ranks stop at their next step; a group stuck in a collective is killed after this.
TERM_GRACE_S = 30.0


def run_launched(*, spec: JobSpec, inputs: JobInputs, out_dir: Path, checkpoint_dir: Path, limits: ResourceLimits,
                 job_id: str, callbacks: Callbacks, flags: StopFlags, work: Path) -> RunResult:
    from kdcore.distributed import launch_command
    from kdcore.pipeline import RunResult

    spec_path, relay, limits_path = work / "launched-spec.json", work / "relay.jsonl", work / "limits.json"
    spec_path.write_text(json.dumps(_local_spec(spec, inputs)))
    limits_path.write_text(limits.model_dump_json())
    relay.touch()
    argv = ["distill", str(spec_path), "--out", str(out_dir), "--no-progress", "--relay", str(relay),
            "--checkpoint-dir", str(checkpoint_dir), "--limits", str(limits_path), "--job-id", job_id]
    log_path = work / "launcher.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(launch_command(spec.distributed, argv), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    error = _follow(process, relay, callbacks, flags)
    if process.returncode != 0:
        if error is not None:
            raise error
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the distributed run's ranks failed (launcher exit {process.returncode}): {tail}")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    artifacts = sorted(path for path in out_dir.rglob("*") if path.is_file()
                       and checkpoint_dir not in path.parents)
    return RunResult(metrics=metrics, artifacts=artifacts)


def _follow(process: subprocess.Popen[bytes], relay: Path, callbacks: Callbacks, flags: StopFlags) -> KDError | None:
    """Replay rank 0's lines until the launcher ends; pass a stop on as SIGTERM (then SIGKILL after a grace)."""
    from kdcore.relay import replay

    error: KDError | None = None
    signalled_at: float | None = None
    pending = b""
    with relay.open("rb") as handle:
        while True:
            finished = process.poll() is not None
            pending += handle.read()
            *complete, pending = pending.split(b"\n")  # a half-written line waits for its end
            for line in complete:
                error = replay(line.decode("utf-8", errors="replace"), callbacks) or error
            if finished:
                return error
            if (flags.stop.is_set() or callbacks.should_cancel()) and signalled_at is None:
                signalled_at = time.monotonic()
                _signal(process, signal.SIGTERM)
            elif signalled_at is not None and time.monotonic() - signalled_at > TERM_GRACE_S:
                logger.warning("the distributed run did not stop %.0f s after SIGTERM; killing it", TERM_GRACE_S)
                _signal(process, signal.SIGKILL)
            time.sleep(FOLLOW_INTERVAL_S)


def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _local_spec(spec: JobSpec, inputs: JobInputs) -> dict[str, Any]:
    body = spec.model_dump(mode="json")
    body["teacher"]["file"] = str(inputs.teacher)
    body["data"]["train"] = str(inputs.train)
    body["data"]["test"] = str(inputs.test) if inputs.test is not None else None
    if inputs.student is not None:
        body["student"]["file"] = str(inputs.student)
    return body
