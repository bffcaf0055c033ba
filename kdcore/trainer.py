"""The training loop for one stage: fit / train_epoch / validate, with checkpoints and resume.

The loop reads its data through `kdcore.batches.Batches`: images live on the device as stored
(uint8 stays uint8, 4x smaller) and each batch is normalised and augmented there; token sequences
are padded per batch. Either way the loop never waits on a Python data loader.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdcore import sharding
from kdcore.batches import Augment, Batches, DeviceData, ImageBatches, steps_per_epoch
from kdcore.callbacks import Callbacks, Progress
from kdcore.checkpoint import Checkpointer, RunState
from kdcore.constraints import apply_max_norm
from kdcore.distributed import Group
from kdcore.errors import CancelledError, TrainingDivergedError
from kdcore.losses import LossFn
from kdcore.mixup import Mixup, hard_labels
from kdcore.runtime import Runtime, capture_rng
from kdcore.selection import SELECTED_MODELS, remember_if_best
from kdcore.sharding import Weights, full_weights
from kdcore.spec import OptimSpec

# Teacher targets for a batch: (sample indices, model inputs) -> teacher logits.
TeacherTargets = Callable[[torch.Tensor, Any], torch.Tensor]
__all__ = ["Augment", "DeviceData", "ProgressTracker", "Stage", "Trainer", "steps_per_epoch"]


@dataclass(frozen=True)
class Stage:
    name: str  # teacher_finetune | distill | finetune | baseline
    model_key: str  # which model of the run it trains: teacher | student | baseline
    epochs: int
    lr: float
    index: int  # position in the plan; seeds this stage's shuffling


@dataclass
class ProgressTracker:
    """Turns steps into a job-wide fraction and an ETA measured on this process's own pace."""

    total_steps: int
    done_steps: int = 0
    started_at: float = field(default_factory=time.monotonic)
    steps_at_start: int = 0

    def fraction(self) -> float:
        return min(1.0, self.done_steps / self.total_steps) if self.total_steps else 1.0

    def eta_s(self) -> float | None:
        run_steps = self.done_steps - self.steps_at_start
        if run_steps <= 0:
            return None
        elapsed = time.monotonic() - self.started_at
        return elapsed / run_steps * max(0, self.total_steps - self.done_steps)

    def skip_to(self, done_steps: int) -> None:
        """After a resume: count finished work as done, but not in the pace."""
        self.done_steps = self.steps_at_start = done_steps
        self.started_at = time.monotonic()


def build_optimizer(spec: OptimSpec, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=True)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=spec.weight_decay)


def build_scheduler(
    spec: OptimSpec, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    wanted = spec.warmup_steps or round(spec.warmup_ratio * total_steps)
    warmup = min(wanted, max(0, total_steps - 1))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if spec.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if spec.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    def __init__(
        self,
        *,
        runtime: Runtime,
        optim: OptimSpec,
        train: DeviceData | Batches,
        val: DeviceData | Batches | None,
        preprocess: nn.Module | None = None,
        augment: Augment | None = None,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        callbacks: Callbacks,
        checkpointer: Checkpointer | None,
        tracker: ProgressTracker,
        progress_interval_s: float = 1.0,
        mixup: Mixup | None = None,
        select: str = "last",
        group: Group | None = None,
    ) -> None:
        self.runtime = runtime
        # distributed.nproc > 1: this rank trains its share of every global batch through DDP.
        self.group = group or Group()
        self.select = select  # stages.select: best_val keeps the best validated weights in the run state
        self.optim = optim
        # Image splits may come as tensors; the preprocessing (and, for training, augmentation) wraps them.
        self.train = _as_batches(train, preprocess, augment, mixup)
        self.val = _as_batches(val, preprocess, None, None) if val is not None else None
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.callbacks = callbacks
        self.checkpointer = checkpointer
        self.tracker = tracker
        self.progress_interval_s = progress_interval_s
        self.steps_per_epoch = self.train.steps_per_epoch(batch_size)
        # fsdp: the models this group has sharded (filled as stages shard them, or by a resume): every
        # checkpoint holds all of them, since a sharded model's weights live nowhere else.
        self.sharded_models: dict[str, nn.Module] = {}

    def fit(
        self,
        stage: Stage,
        model: nn.Module,
        loss_fn: LossFn,
        state: RunState,
        *,
        teacher_targets: TeacherTargets | None = None,
    ) -> None:
        """Train `model` for the stage's epochs, continuing from `state` if it ended inside this stage."""
        # DDP averages the gradients of the ranks' replicas and `model` itself is what is validated and
        # saved; FSDP shards `model` in place, so its optimiser must see the shards: wrap first.
        trained = self.group.wrap(model, self.runtime.device)
        if self.group.sharded:
            self.sharded_models[stage.model_key] = model
        optimizer = build_optimizer(self.optim, model, stage.lr)
        scheduler = build_scheduler(self.optim, optimizer, stage.epochs * self.steps_per_epoch)
        shuffle_rng = torch.Generator().manual_seed(self.seed * 1_000_003 + stage.index)
        start_epoch = 0
        if state.stage == stage.name:
            start_epoch = self._restore(state, optimizer, scheduler, shuffle_rng, stage=stage, model=model)
        scaler = torch.amp.GradScaler("cuda") if self.runtime.needs_grad_scaler else None
        self.callbacks.on_stage_start(stage.name, stage.epochs)

        for epoch in range(start_epoch, stage.epochs):
            started = time.monotonic()
            train_metrics = self._train_epoch(stage, epoch, model, trained, loss_fn, optimizer, scheduler, scaler,
                                              shuffle_rng, teacher_targets)
            train_time_s = time.monotonic() - started
            metrics = {**train_metrics, **self.validate(model), "lr": float(scheduler.get_last_lr()[0]),
                       "train_time_s": train_time_s, "epoch_time_s": time.monotonic() - started}
            state.history.append({"stage": stage.name, "epoch": epoch + 1, **metrics})
            if self.select == "best_val":
                self._remember_if_best(state, stage, epoch + 1, model, metrics)
            self._checkpoint(state, stage, epoch + 1, model, optimizer, scheduler, shuffle_rng)
            self.callbacks.on_epoch_end(self._progress(stage, epoch + 1, self.steps_per_epoch, metrics))

    def _train_epoch(
        self,
        stage: Stage,
        epoch: int,
        model: nn.Module,
        trained: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        scaler: torch.amp.GradScaler | None,
        shuffle_rng: torch.Generator,
        teacher_targets: TeacherTargets | None,
    ) -> dict[str, float]:
        model.train()
        order = self.train.epoch_order(self.batch_size, shuffle_rng)
        loss_sum = torch.zeros((), device=self.runtime.device)
        # The hard-label cross-entropy beside the stage's own loss: a distillation loss is scaled by T^2
        # and cannot share an axis with the validation cross-entropy, this one can.
        ce_sum = torch.zeros((), device=self.runtime.device)
        correct = torch.zeros((), device=self.runtime.device, dtype=torch.long)
        seen = 0
        last_report = time.monotonic()
        for step in range(self.steps_per_epoch):
            # Every rank stops at the same step, or the others would wait in the next all-reduce.
            if self.group.any(self.callbacks.should_cancel(), self.runtime.device):
                raise CancelledError(f"cancelled during {stage.name} epoch {epoch + 1}")
            # The whole global batch is prepared (augmented, mixed) on every rank, then each keeps its rows:
            # the shuffle stream stays the same on every rank, and the same as a single-process run's.
            indices = order[step]
            inputs, labels = self.train.train_batch(indices, shuffle_rng)
            if self.group.active:
                rows, weight = self.group.share(len(indices))
                indices, inputs, labels = indices[rows], _take_rows(inputs, rows), labels[rows]
            else:
                weight = 1.0
            targets = teacher_targets(indices, inputs) if teacher_targets is not None else None

            with self.runtime.autocast():
                logits = trained(inputs)
            loss = loss_fn(logits, targets, labels)
            if weight != 1.0:
                loss = loss * weight

            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                self._clip(model)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                self._clip(model)
                optimizer.step()
            if self.optim.max_norm is not None:
                apply_max_norm(model, self.optim.max_norm)
            scheduler.step()

            # Sums stay on the device: reading them every step would sync a GPU each time.
            counted = len(indices) if weight else 0
            loss_sum += loss.detach() / (weight or 1.0) * counted
            if labels is not None:
                with torch.no_grad():
                    ce_sum += F.cross_entropy(logits.detach().float(), labels) * counted
            if counted:
                correct += (logits.detach().argmax(dim=1) == hard_labels(labels)).sum()
            seen += counted
            self.tracker.done_steps += 1
            if time.monotonic() - last_report >= self.progress_interval_s:
                last_report = time.monotonic()
                running = self._finite_mean(loss_sum, seen, stage, epoch)
                self.callbacks.on_progress(self._progress(stage, epoch + 1, step + 1, {"train_loss": running}))
        totals = self.group.sum_(torch.stack([loss_sum.float(), ce_sum.float(), correct.float(),
                                              torch.tensor(float(seen), device=loss_sum.device)]))
        loss_sum, ce_sum, correct_all, seen_all = totals.unbind()
        seen = int(seen_all.item())
        return {"train_loss": self._finite_mean(loss_sum, seen, stage, epoch),
                "train_ce": ce_sum.item() / max(1, seen), "train_accuracy": correct_all.item() / max(1, seen)}

    def validate(self, model: nn.Module) -> dict[str, float]:
        if self.val is None or len(self.val) == 0:
            return {}
        model.eval()
        loss_sum, correct = 0.0, 0
        with torch.inference_mode():
            for position, (inputs, labels) in enumerate(self.val.eval_batches(self.eval_batch_size)):
                if self.group.sharded:
                    # A sharded forward is a collective: every rank runs every batch, on its share of the rows.
                    rows, weight = self.group.share(len(labels))
                    inputs, labels = _take_rows(inputs, rows), labels[rows]
                    if not weight:
                        labels = labels[:0]
                elif not self.group.owns(position):
                    continue
                with self.runtime.autocast():
                    logits = model(inputs).float()[: len(labels)]
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                correct += int((logits.argmax(dim=1) == labels).sum().item())
        totals = self.group.sum_(torch.tensor([loss_sum, float(correct)], dtype=torch.float64,
                                              device=self.runtime.device))
        return {"val_loss": totals[0].item() / len(self.val), "val_accuracy": totals[1].item() / len(self.val)}

    def _clip(self, model: nn.Module) -> None:
        if self.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), self.optim.grad_clip)

    def _finite_mean(self, loss_sum: torch.Tensor, seen: int, stage: Stage, epoch: int) -> float:
        mean = loss_sum.item() / max(1, seen)
        if not math.isfinite(mean):
            raise TrainingDivergedError(
                f"the {stage.name} loss became {mean} in epoch {epoch + 1}; lower optim.lr, set optim.grad_clip "
                "or use precision fp32"
            )
        return mean

    def _progress(self, stage: Stage, epoch: int, step: int, metrics: dict[str, float]) -> Progress:
        return Progress(stage=stage.name, epoch=epoch, epochs=stage.epochs, step=step, steps=self.steps_per_epoch,
                        fraction=self.tracker.fraction(), eta_s=self.tracker.eta_s(), metrics=metrics)

    def _remember_if_best(self, state: RunState, stage: Stage, epoch: int, model: nn.Module,
                          metrics: dict[str, float]) -> None:
        if not self.group.sharded:
            remember_if_best(state.info, stage.model_key, stage.name, epoch, model, metrics)
            return
        if stage.model_key not in SELECTED_MODELS or "val_accuracy" not in metrics:
            return
        # Every rank takes part in the gather (a collective); rank 0 receives the weights it may keep.
        remember_if_best(state.info, stage.model_key, stage.name, epoch, Weights(full_weights(model)), metrics)

    def _checkpoint(self, state: RunState, stage: Stage, epoch: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                    shuffle_rng: torch.Generator) -> None:
        state.stage, state.epoch = stage.name, epoch
        if self.group.sharded:
            self._save_shards(state, stage, epoch, optimizer)
        else:
            state.models[stage.model_key] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            state.optimizer = optimizer.state_dict()
            # From here on the plain checkpoint holds every model (a resume on one process put the
            # sharded ones into `state.models`): the DCP folder it came from is not read again.
            state.info.pop(sharding.INFO_KEY, None)
        state.scheduler = scheduler.state_dict()
        state.rng = capture_rng()
        state.shuffle_rng = shuffle_rng.get_state()
        if self.checkpointer is not None and self.group.is_main:
            self.callbacks.on_checkpoint(self.checkpointer.save(state))
            # Only now that checkpoint.pt points at the new DCP folder (or at none) may the older ones go.
            sharding.remove_stale(self.checkpointer.directory, state.info.get(sharding.INFO_KEY, {}).get("dir"))

    def _save_shards(self, state: RunState, stage: Stage, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """fsdp: every rank writes its shards (DCP); checkpoint.pt, written by rank 0 after, points at them."""
        if self.checkpointer is None:
            raise ValueError("an fsdp run checkpoints on every rank: give every rank the checkpointer")
        state.info[sharding.INFO_KEY] = sharding.save_sharded(
            self.checkpointer.directory, f"{stage.name}-{epoch}", self.sharded_models, stage.model_key, optimizer)
        for key in self.sharded_models:
            state.models.pop(key, None)  # their weights are in the DCP folder, not in checkpoint.pt
        state.optimizer = None

    def _restore(self, state: RunState, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LambdaLR, shuffle_rng: torch.Generator, *,
                 stage: Stage | None = None, model: nn.Module | None = None) -> int:
        record = state.info.get(sharding.INFO_KEY)
        if (record is not None and stage is not None and model is not None and self.checkpointer is not None
                and record.get("optimizer") == stage.model_key):
            # A DCP checkpoint, written by any number of ranks, read by this group (sharded or plain).
            sharding.load_sharded(self.checkpointer.directory, state.info, stage.model_key, model, optimizer)
        elif state.optimizer is not None and model is not None and sharding.is_sharded(model):
            # A plain checkpoint (one process, or ddp) carried on under fsdp: its whole optimiser state, sharded.
            sharding.load_full_optimizer(model, optimizer, state.optimizer)
        elif state.optimizer is not None:
            optimizer.load_state_dict(state.optimizer)
        if state.scheduler is not None:
            scheduler.load_state_dict(state.scheduler)
        if state.shuffle_rng is not None:
            shuffle_rng.set_state(state.shuffle_rng)
        return state.epoch


def _take_rows(inputs: Any, rows: slice) -> Any:
    """The rows of a batch's model inputs: a tensor, a dataclass of tensors (a TokenBatch: ids, mask, type ids;
    a field may be None) or a mapping of tensors."""
    if inputs is None or isinstance(inputs, torch.Tensor):
        return inputs if inputs is None else inputs[rows]
    if dataclasses.is_dataclass(inputs) and not isinstance(inputs, type):
        return dataclasses.replace(inputs, **{item.name: _take_rows(getattr(inputs, item.name), rows)
                                              for item in dataclasses.fields(inputs)})
    return type(inputs)({key: _take_rows(value, rows) for key, value in inputs.items()})


def _as_batches(data: DeviceData | Batches, preprocess: nn.Module | None, augment: Augment | None,
                mixup: Mixup | None) -> Batches:
    if not isinstance(data, DeviceData):
        return data
    if preprocess is None:
        raise ValueError("image data needs its preprocessing")
    return ImageBatches(data, preprocess, augment, mixup)


def history_rows(state: RunState) -> list[dict[str, Any]]:
    return list(state.history)
