"""The training loop of a causal-LM stage: the image/text `Trainer`'s loop with token-level losses.

What differs from `kdcore.trainer.Trainer`: the model gives hidden states of the scored tokens,
not logits, and the loss (`kdcore.lm_losses.lm_loss`) makes the logits chunk by chunk; losses
and accuracies are per token, not per sample. Checkpoints, resume, cancel, progress and the
schedule are the base class's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from kdcore.checkpoint import RunState
from kdcore.errors import CancelledError
from kdcore.lm_cache import TeacherTopKCache
from kdcore.lm_data import LMBatch, LMBatches
from kdcore.lm_losses import Head, LossResult, LossSettings, Teacher, lm_loss, token_predictions
from kdcore.lm_models import CausalLM
from kdcore.runtime import Runtime
from kdcore.sharding import run_in_root, shard_model
from kdcore.trainer import Stage, Trainer, build_optimizer, build_scheduler

# A batch's teacher: (example indices, batch, scored positions) -> (targets per token range, teacher head).
LMTargets = Callable[[torch.Tensor, LMBatch], tuple[Callable[[int, int], Teacher], Head | None]]


class LiveLMTeacher:
    """The frozen teacher on each batch; only its final hidden states of the scored tokens are kept."""

    def __init__(self, teacher: CausalLM, runtime: Runtime) -> None:
        self.teacher = teacher.eval()
        self.runtime = runtime

    def __call__(self, indices: torch.Tensor, batch: LMBatch) -> tuple[Callable[[int, int], Teacher], Head | None]:
        # no_grad, not inference_mode: the states feed a loss whose backward must be able to save them.
        with torch.no_grad(), self.runtime.autocast():
            # A sharded teacher's root unit (its head) stays gathered after this, for the loss's head calls.
            hidden, _ = run_in_root(self.teacher, lambda: self.teacher.scored(batch))
        return (lambda start, end: hidden[start:end]), self.teacher.head


class CachedLMTeacher:
    """The teacher's cached top-K for the batch's examples, moved to the device per batch."""

    def __init__(self, cache: TeacherTopKCache, device: torch.device) -> None:
        self.cache = cache
        self.device = device

    def __call__(self, indices: torch.Tensor, batch: LMBatch) -> tuple[Callable[[int, int], Teacher], Head | None]:
        top = self.cache.targets_for(indices, self.device)
        return (lambda start, end: type(top)(top.log_probs[start:end], top.ids[start:end], top.tail[start:end])), None


class LMTrainer(Trainer):
    def fit_lm(self, stage: Stage, model: CausalLM, train: LMBatches, state: RunState, settings: LossSettings,
               *, targets: LMTargets | None = None) -> None:
        """Train `model` for the stage's epochs on `train`, continuing from `state` if it ended inside this stage."""
        self.train = train
        if self.group.sharded:
            # FSDP2 in place, before the optimiser is built: it must hold the shards. Every checkpoint from
            # now on holds this model's shards (a DCP folder), whatever stage it is taken in.
            self.sharded_models[stage.model_key] = shard_model(model)
        optimizer = build_optimizer(self.optim, model, stage.lr)
        scheduler = build_scheduler(self.optim, optimizer, stage.epochs * self.steps_per_epoch)
        shuffle_rng = torch.Generator().manual_seed(self.seed * 1_000_003 + stage.index)
        start_epoch = (self._restore(state, optimizer, scheduler, shuffle_rng, stage=stage, model=model)
                       if state.stage == stage.name else 0)
        self.callbacks.on_stage_start(stage.name, stage.epochs)
        for epoch in range(start_epoch, stage.epochs):
            started = time.monotonic()
            train_metrics = self._lm_epoch(stage, epoch, model, train, settings, targets, optimizer, scheduler,
                                           shuffle_rng)
            train_time_s = time.monotonic() - started
            metrics = {**train_metrics, **self.validate_lm(model, settings.vocab),
                       "lr": float(scheduler.get_last_lr()[0]), "train_time_s": train_time_s,
                       "epoch_time_s": time.monotonic() - started}
            state.history.append({"stage": stage.name, "epoch": epoch + 1, **metrics})
            self._checkpoint(state, stage, epoch + 1, model, optimizer, scheduler, shuffle_rng)
            self.callbacks.on_epoch_end(self._progress(stage, epoch + 1, self.steps_per_epoch, metrics))

    def _lm_epoch(self, stage: Stage, epoch: int, model: CausalLM, train: LMBatches, settings: LossSettings,
                  targets: LMTargets | None, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LambdaLR, shuffle_rng: torch.Generator) -> dict[str, float]:
        model.train()
        order = train.epoch_order(self.batch_size, shuffle_rng)
        loss_sum = torch.zeros((), device=self.runtime.device)
        correct = torch.zeros((), device=self.runtime.device, dtype=torch.long)
        tokens = 0
        last_report = time.monotonic()
        for step, indices in enumerate(order):
            # Every rank stops at the same step, or the others would wait in the next all-reduce.
            if self.group.any(self.callbacks.should_cancel(), self.runtime.device):
                raise CancelledError(f"cancelled during {stage.name} epoch {epoch + 1}")
            batch, _ = train.train_batch(indices, shuffle_rng)
            indices, batch, weight = self._rank_rows(indices, batch)
            teacher, teacher_head = targets(indices, batch) if targets is not None else (None, None)
            # Under fsdp inside the root's forward, so that its hooks gather the head for every chunk.
            result = run_in_root(model, partial(self._loss, model, batch, settings, teacher, teacher_head))
            optimizer.zero_grad(set_to_none=True)
            (result.loss * weight if weight != 1.0 else result.loss).backward()
            if not self.group.sharded:  # FSDP reduce-scattered (averaged) the gradients in backward
                self.group.average_gradients(model)
            self._clip(model)
            optimizer.step()
            scheduler.step()

            # Sums stay on the device: reading them every step would sync a GPU each time.
            if weight:  # a row run only to keep the ranks in step counts nothing
                loss_sum += result.loss.detach() * result.tokens
                correct += result.correct
                tokens += result.tokens
            self.tracker.done_steps += 1
            if time.monotonic() - last_report >= self.progress_interval_s:
                last_report = time.monotonic()
                running = self._finite_mean(loss_sum, tokens, stage, epoch)
                self.callbacks.on_progress(self._progress(stage, epoch + 1, step + 1, {"train_loss": running}))
        if self.group.active:
            totals = self.group.sum_(torch.stack([loss_sum.float(), correct.float(),
                                                  torch.tensor(float(tokens), device=loss_sum.device)]))
            loss_sum, correct, tokens = totals[0], totals[1], int(totals[2].item())
        return {"train_loss": self._finite_mean(loss_sum, tokens, stage, epoch),
                "train_accuracy": correct.item() / max(1, tokens), "train_tokens": float(tokens)}

    def _loss(self, model: CausalLM, batch: LMBatch, settings: LossSettings,
              teacher: Callable[[int, int], Teacher] | None, teacher_head: Head | None) -> LossResult:
        with self.runtime.autocast():
            hidden, labels = model.scored(batch)
            return lm_loss(hidden, labels, model.head, settings, teacher=teacher, teacher_head=teacher_head)

    def _rank_rows(self, indices: torch.Tensor, batch: LMBatch) -> tuple[torch.Tensor, LMBatch, float]:
        """This rank's rows of the global batch, and the weight that makes the ranks' averaged gradients
        those of the global batch's mean over its scored tokens (a rank's loss is its own tokens' mean)."""
        if not self.group.active:
            return indices, batch, 1.0
        rows, share = self.group.share(len(indices))
        total = int((batch.labels != -100).sum().item())
        mine = LMBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows])
        if not share:
            return indices[rows], mine, 0.0  # a rank without rows runs one, weighted zero
        tokens = int((mine.labels != -100).sum().item())
        return indices[rows], mine, tokens * self.group.world / max(1, total)

    def validate_lm(self, model: CausalLM, vocab: int) -> dict[str, float]:
        """Next-token cross-entropy (nats per token) and accuracy on the validation split."""
        if self.val is None or len(self.val) == 0:
            return {}
        # Every rank evaluates every batch: under fsdp each forward is a collective, so they run in step.
        total, correct, tokens = run_in_root(model, lambda: evaluate_tokens(model, self.val, self.runtime,
                                                                            self.eval_batch_size, vocab))[:3]
        return {"val_loss": total / max(1, tokens), "val_accuracy": correct / max(1, tokens)}


@torch.no_grad()
def evaluate_tokens(model: CausalLM, batches: Any, runtime: Runtime, batch_size: int,
                    vocab: int) -> tuple[float, int, int, torch.Tensor]:
    """(summed CE in nats, correct next tokens, scored tokens, top-1 predictions int32) over a split."""
    model.eval()
    total, correct, tokens = 0.0, 0, 0
    predictions = []
    for batch, _ in batches.eval_batches(batch_size):
        with runtime.autocast():
            hidden, labels = model.scored(batch)
            summed, predicted = token_predictions(hidden, labels, model.head, vocab)
        total += summed
        correct += int((predicted.long() == labels).sum())
        tokens += int(labels.shape[0])
        predictions.append(predicted.cpu())
    return total, correct, tokens, torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int32)


def freeze(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)
