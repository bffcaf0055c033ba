"""Where the trainer's batches come from: one protocol, one implementation per kind of data.

The trainer asks a `Batches` for the order of an epoch (sample indices per step, drawn from the
stage's generator so a resumed run draws the same) and for the model inputs of those indices.
Images are preprocessed and augmented on the device (`ImageBatches`); token sequences are padded
per batch (`kdcore.text_data.TokenBatches`). Inputs are whatever the models take: a tensor for
images, a `TokenBatch` for text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from kdcore.mixup import Mixup

Augment = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


class Batches(Protocol):
    """A training or evaluation split as the trainer reads it."""

    def __len__(self) -> int: ...

    def steps_per_epoch(self, batch_size: int) -> int: ...

    def epoch_order(self, batch_size: int, rng: torch.Generator) -> list[torch.Tensor]:
        """Sample indices of every step of one epoch (exactly `steps_per_epoch` of them)."""
        ...

    def train_batch(self, indices: torch.Tensor, rng: torch.Generator) -> tuple[Any, torch.Tensor]:
        """Model inputs and labels (class indices, or probabilities after mixup) for a training step."""
        ...

    def eval_batches(self, batch_size: int) -> Iterator[tuple[Any, torch.Tensor]]:
        """Inputs and labels in stored order, without augmentation."""
        ...


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    # A final batch of one sample breaks BatchNorm in training mode, so it is dropped.
    full, rest = divmod(num_samples, batch_size)
    return full + (1 if rest > 1 else 0)


@dataclass
class DeviceData:
    """A split moved to the device once, in stored form."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


class ImageBatches:
    """Stored images (uint8 or float) → normalised, augmented, optionally mixed batches on the device."""

    def __init__(self, data: DeviceData, preprocess: nn.Module, augment: Augment | None = None,
                 mixup: Mixup | None = None) -> None:
        self.data = data
        self.preprocess = preprocess
        self.augment = augment
        self.mixup = mixup

    def __len__(self) -> int:
        return len(self.data)

    def steps_per_epoch(self, batch_size: int) -> int:
        return steps_per_epoch(len(self.data), batch_size)

    def epoch_order(self, batch_size: int, rng: torch.Generator) -> list[torch.Tensor]:
        order = torch.randperm(len(self.data), generator=rng).to(self.data.y.device)
        return [order[step * batch_size:(step + 1) * batch_size] for step in range(self.steps_per_epoch(batch_size))]

    def train_batch(self, indices: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = self.preprocess(self.data.x[indices])
        if self.augment is not None:
            inputs = self.augment(inputs, rng)
        labels = self.data.y[indices]
        if self.mixup is not None:
            inputs, labels = self.mixup(inputs, labels, rng)
        return inputs, labels

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.data), batch_size):
            yield self.preprocess(self.data.x[start:start + batch_size]), self.data.y[start:start + batch_size]
