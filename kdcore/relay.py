"""The callbacks of a launched group, relayed to the process that launched it.

A distributed job's ranks run in processes the elastic launcher starts; the worker that holds the
job stays outside them, the one writer of the job's row. Rank 0 writes each callback as one JSON
line to a file (`RelayWriter`); the worker follows the file and replays the lines into its own
callbacks (`replay`), so progress, logs, checkpoints and the resume event reach the service as from
a single-process run. Cancel travels the other way as a signal: the worker sends SIGTERM to the
launcher, which passes it to every rank, where it sets the flag `should_cancel` reads; the ranks
then agree on it at their next step (`Group.any`).
"""

from __future__ import annotations

import json
import signal
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from kdcore.callbacks import Callbacks, Progress
from kdcore.errors import KDError

_terminated = False


def cancel_on_sigterm() -> None:
    """In a rank: SIGTERM (the launcher passing on a cancel) asks the run to stop at its next step."""

    def handler(signum: int, frame: Any) -> None:
        global _terminated
        _terminated = True

    signal.signal(signal.SIGTERM, handler)


class RelayWriter(Callbacks):
    """Rank 0's callbacks: one JSON line per call, flushed at once (the worker follows the file)."""

    def __init__(self, path: Path) -> None:
        self._handle: IO[str] = path.open("a", encoding="utf-8", buffering=1)

    def _emit(self, kind: str, **data: Any) -> None:
        self._handle.write(json.dumps({"kind": kind, **data}) + "\n")

    def on_stage_start(self, stage: str, epochs: int) -> None:
        self._emit("stage_start", stage=stage, epochs=epochs)

    def on_progress(self, progress: Progress) -> None:
        self._emit("progress", progress=asdict(progress))

    def on_epoch_end(self, progress: Progress) -> None:
        self._emit("epoch_end", progress=asdict(progress))

    def on_checkpoint(self, path: Path) -> None:
        self._emit("checkpoint", path=str(path))

    def on_log(self, message: str) -> None:
        self._emit("log", message=message)

    def on_resume(self, stage: str, epoch: int) -> None:
        self._emit("resume", stage=stage, epoch=epoch)

    def error(self, exc: KDError) -> None:
        """The run's deliberate failure, so the worker fails the job with its code, not 'a rank died'."""
        self._emit("error", code=exc.code, message=exc.message, field=exc.field)

    def should_cancel(self) -> bool:
        return _terminated

    def close(self) -> None:
        self._handle.close()


class SignalCancel(Callbacks):
    """The other ranks' callbacks: silent, but they hear the launcher's SIGTERM too."""

    def should_cancel(self) -> bool:
        return _terminated


def replay(line: str, callbacks: Callbacks) -> KDError | None:
    """Pass one relayed line to `callbacks`; an `error` line is returned as the KDError it was."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None  # a line cut by a killed rank
    kind = event.get("kind")
    if kind == "stage_start":
        callbacks.on_stage_start(event["stage"], event["epochs"])
    elif kind in ("progress", "epoch_end"):
        progress = Progress(**event["progress"])
        (callbacks.on_progress if kind == "progress" else callbacks.on_epoch_end)(progress)
    elif kind == "checkpoint":
        callbacks.on_checkpoint(Path(event["path"]))
    elif kind == "log":
        callbacks.on_log(event["message"])
    elif kind == "resume":
        callbacks.on_resume(event["stage"], event["epoch"])
    elif kind == "error":
        from kdcore.errors import CancelledError

        cls = CancelledError if event["code"] == "cancelled" else KDError
        return cls(event["message"], field=event.get("field"), code=event["code"])
    return None
