"""The engine's window onto the job's row: progress (throttled), events, checkpoints, resume, cancel."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from kdcore.callbacks import Callbacks, Progress
from service import state
from service.storage import StorageError
from worker.job_run import JobRun

logger = logging.getLogger("distillery.worker")


class JobCallbacks(Callbacks):
    """The engine's window onto the job's row: progress (throttled), events, checkpoints, cancel."""

    def __init__(self, job_run: JobRun) -> None:
        self.job_run = job_run
        self.stop = job_run.flags.stop
        self.min_interval = job_run.settings.progress_write_seconds
        self.last_write = 0.0
        self.written_stage: str | None = None

    # Called before every optimiser step: an Event read and a clock for the stall watchdog, nothing more.
    def should_cancel(self) -> bool:
        self.job_run.flags.last_activity = time.monotonic()
        return self.stop.is_set()

    def on_stage_start(self, stage: str, epochs: int) -> None:
        self.job_run.flags.last_activity = time.monotonic()
        self.written_stage = stage
        self.job_run.write(self._record(stage=stage), what="the stage")

    def on_progress(self, progress: Progress) -> None:
        now = time.monotonic()
        self.job_run.flags.last_activity = now
        if progress.stage == self.written_stage and now - self.last_write < self.min_interval:
            return
        self._write_progress(progress, None)

    def on_epoch_end(self, progress: Progress) -> None:
        training = {"stage": progress.stage, "epoch": progress.epoch, "epochs": progress.epochs, **progress.metrics}
        self._write_progress(progress, {"training": training})

    def on_checkpoint(self, path: Path) -> None:
        if self.job_run.flags.stop.is_set():
            return  # a lost run must not overwrite the new holder's checkpoint
        try:
            self.job_run.storage.put_file(self.job_run.checkpoint_key, path)
        except (OSError, StorageError) as exc:
            logger.warning("could not store the checkpoint (the next epoch's will be tried): %s", exc)

    def on_log(self, message: str) -> None:
        logger.info("%s", message)
        self.job_run.event("log", {"message": message})

    def on_resume(self, stage: str, epoch: int) -> None:
        message = f"resuming from the checkpoint after {stage} epoch {epoch}"
        self.job_run.event("resume", {"stage": stage, "epoch": epoch, "attempt": self.job_run.attempt,
                                      "message": message})

    def _write_progress(self, progress: Progress, metrics: dict[str, Any] | None) -> None:
        self.last_write = time.monotonic()
        self.written_stage = progress.stage
        values = {
            "fraction": round(progress.fraction, 6),
            "epoch": progress.epoch,
            "epochs": progress.epochs,
            "step": progress.step,
            "steps": progress.steps,
            "eta_s": None if progress.eta_s is None else round(progress.eta_s, 1),
        }
        self.job_run.write(self._record(stage=progress.stage, progress=values, metrics=metrics), what="progress")

    def _record(self, **changes: Any) -> Callable[[Session], bool]:
        job_run = self.job_run
        return lambda session: state.record_progress(session, job_run.job_id, job_run.worker_id, **changes)


class TrialCallbacks(JobCallbacks):
    """A tuned job's trial: each student epoch's validation metric goes to the search, which may prune it."""

    def __init__(self, job_run: JobRun, *, metric: str) -> None:
        super().__init__(job_run)
        self.metric = metric
        self.distill_epochs = int((job_run.spec.get("stages") or {}).get("distill_epochs") or 0)

    def on_epoch_end(self, progress: Progress) -> None:
        super().on_epoch_end(progress)
        from service.tuning import TRIAL_STAGES, should_prune

        value = progress.metrics.get(self.metric)
        if progress.stage not in TRIAL_STAGES or value is None:
            return
        # Steps count the student's epochs across its stages, as the pruner compares trials step by step.
        step = progress.epoch + (self.distill_epochs if progress.stage == "finetune" else 0)
        verdict: list[bool] = []
        job_run = self.job_run

        def report(session: Session) -> None:
            verdict.append(should_prune(session=session, job_id=job_run.job_id, worker_id=job_run.worker_id,
                                        step=step, value=float(value)))

        job_run.write(report, what="the trial's metric")
        if verdict and verdict[0] and step < self._total_steps():
            message = (f"pruned after {step} epochs: {self.metric} {value:.4f} is behind the median of the other "
                       "trials at this epoch")
            self.on_log(message)
            job_run.flags.halt(message, pruned=True)

    def _total_steps(self) -> int:
        stages = self.job_run.spec.get("stages") or {}
        return int(stages.get("distill_epochs") or 0) + int(stages.get("finetune_epochs") or 0)
