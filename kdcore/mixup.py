"""Mixup on a training batch: blend each sample with another one of the same batch.

Zhang et al. (2018) blend inputs and their one-hot labels with a weight lam ~ Beta(m, m). For
distillation this matters for another reason (Beyer et al. 2022, "Knowledge distillation: A good
teacher is patient and consistent"): the teacher runs live on the blended inputs, so the student
is taught the teacher's function *between* the training samples, not only at them. Each sample
gets its own lam; labels come back as class probabilities, which `F.cross_entropy` takes as is.

The partner permutation is drawn from the stage's shuffling generator and lam from the global
generator (as dropout is), so a seeded run, and a resumed one, repeats exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Mixup:
    concentration: float  # m of Beta(m, m): small m keeps most samples nearly whole, 1 is uniform
    num_classes: int
    # Built once, not every training step (construction validates its arguments).
    _beta: torch.distributions.Beta = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        m = torch.tensor(float(self.concentration))
        object.__setattr__(self, "_beta", torch.distributions.Beta(m, m))

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(labels)
        lam = _to_device(self._beta.sample((n,)), inputs.device).to(inputs.dtype)
        partner = _to_device(torch.randperm(n, generator=generator), inputs.device)
        weight = lam.view(n, *([1] * (inputs.dim() - 1)))
        mixed = weight * inputs + (1.0 - weight) * inputs[partner]
        one_hot = F.one_hot(labels, self.num_classes).to(inputs.dtype)
        lam_col = lam.view(n, 1)
        return mixed, lam_col * one_hot + (1.0 - lam_col) * one_hot[partner]


def _to_device(cpu_tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    # A plain copy to a GPU makes the host wait for every queued kernel, once per step; a copy
    # from pinned memory is queued like a kernel instead.
    if device.type == "cuda":
        return cpu_tensor.pin_memory().to(device, non_blocking=True)
    return cpu_tensor.to(device)


def build_mixup(concentration: float, num_classes: int) -> Mixup | None:
    """The mixup of `data.mixup`, or None when it is 0 (off)."""
    return Mixup(concentration, num_classes) if concentration > 0 else None


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices: as given, or the dominant class of blended labels (for training accuracy)."""
    return labels.argmax(dim=1) if labels.dim() == 2 else labels
