"""The engine's window to the outside: progress reports, logs, checkpoints and a cancel check."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Progress:
    """Where a run stands. `fraction` is of the whole job, `eta_s` the estimated seconds left."""

    stage: str
    epoch: int
    epochs: int
    step: int
    steps: int
    fraction: float
    eta_s: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Callbacks:
    """Override what you need; every hook is a no-op by default.

    `should_cancel` is called before every optimiser step, so it must be cheap (read a flag,
    do not query a database); the run stops within one step of it returning True.
    """

    def on_stage_start(self, stage: str, epochs: int) -> None:
        return None

    def on_progress(self, progress: Progress) -> None:
        return None

    def on_epoch_end(self, progress: Progress) -> None:
        return None

    def on_checkpoint(self, path: Path) -> None:
        return None

    def on_log(self, message: str) -> None:
        return None

    def on_resume(self, stage: str, epoch: int) -> None:
        """The run continues from a checkpoint written after `epoch` of `stage` (before any training)."""
        return None

    def should_cancel(self) -> bool:
        return False


class CallbackList(Callbacks):
    def __init__(self, *callbacks: Callbacks) -> None:
        self.callbacks = list(callbacks)

    def on_stage_start(self, stage: str, epochs: int) -> None:
        for callback in self.callbacks:
            callback.on_stage_start(stage, epochs)

    def on_progress(self, progress: Progress) -> None:
        for callback in self.callbacks:
            callback.on_progress(progress)

    def on_epoch_end(self, progress: Progress) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(progress)

    def on_checkpoint(self, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(path)

    def on_log(self, message: str) -> None:
        for callback in self.callbacks:
            callback.on_log(message)

    def on_resume(self, stage: str, epoch: int) -> None:
        for callback in self.callbacks:
            callback.on_resume(stage, epoch)

    def should_cancel(self) -> bool:
        return any(callback.should_cancel() for callback in self.callbacks)


class CancelOnly(Callbacks):
    """Another callbacks' cancel check and nothing else: the voice of a rank that is not rank 0."""

    def __init__(self, inner: Callbacks) -> None:
        self.inner = inner

    def should_cancel(self) -> bool:
        return self.inner.should_cancel()
