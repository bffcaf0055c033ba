"""Batched forward passes over a whole dataset without gradients."""

from __future__ import annotations

import torch
from torch import nn

from kdcore.runtime import Runtime


@torch.inference_mode()
def predict_logits(
    model: nn.Module, x: torch.Tensor, *, preprocess: nn.Module, runtime: Runtime, batch_size: int
) -> torch.Tensor:
    """Logits for every sample of `x` (stored form), as float32 on the CPU. Leaves the model in eval mode."""
    model.eval()
    outputs = []
    for start in range(0, len(x), batch_size):
        batch = preprocess(x[start:start + batch_size].to(runtime.device, non_blocking=True))
        with runtime.autocast():
            outputs.append(model(batch).float().cpu())
    return torch.cat(outputs) if outputs else torch.empty(0)
