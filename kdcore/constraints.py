"""Weight constraints applied after each optimiser step.

Max-norm (Srivastava et al. 2014, used for Hinton et al. 2015's MNIST teacher) bounds the L2 norm of
every unit's incoming weight vector, so dropout nets can train with large learning rates without
their weights blowing up.
"""

from __future__ import annotations

import torch
from torch import nn

_CONSTRAINED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Rescale each output unit's weights (dim 0 of Linear/Conv weights) to an L2 norm <= max_norm."""
    for module in model.modules():
        if isinstance(module, _CONSTRAINED):
            module.weight.renorm_(p=2, dim=0, maxnorm=max_norm)
