"""The student's cost, measured on the meta device before anything is allocated.

A student is built with `torch.device("meta")` (shapes only, no storage, no initialisation
work) and one training batch runs through it there, so parameters and activations can be
counted in milliseconds for any registry architecture, however large it claims to be.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdcore.limits import ResourceLimits, check_parameters, over_limit
from kdcore.models import build_model

# Per parameter during training, in fp32: the weight, its gradient and Adam's two moments.
_BYTES_PER_PARAMETER = 4 * 4


def estimate_training_bytes(model: nn.Module, input_shape: Sequence[int], batch_size: int) -> tuple[int, int]:
    """(parameters, estimated peak training bytes) of a meta-device model for one batch.

    Activations: every leaf module's output is kept for the backward pass, and the backward
    pass needs about as much again for the gradients flowing through them.
    """
    parameters = sum(p.numel() for p in model.parameters())
    activations = 0

    def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal activations
        outputs = output if isinstance(output, tuple | list) else (output,)
        activations += sum(o.numel() * o.element_size() for o in outputs if isinstance(o, torch.Tensor))

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        model.train()
        model(torch.empty((batch_size, *input_shape), device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
    return parameters, parameters * _BYTES_PER_PARAMETER + 2 * activations


def check_student_budget(
    arch: str, arch_args: dict[str, Any], input_shape: Sequence[int], num_classes: int, batch_size: int,
    limits: ResourceLimits,
) -> tuple[int, int]:
    """Refuse a student over the parameter or training-memory limit; returns (parameters, bytes)."""
    with torch.device("meta"):
        model = build_model(arch, arch_args, input_shape, num_classes)
    parameters = sum(p.numel() for p in model.parameters())
    check_parameters(parameters, limits)
    parameters, peak = estimate_training_bytes(model, input_shape, batch_size)
    if peak > limits.max_train_memory_bytes:
        raise over_limit(
            f"the estimated peak training memory of the student at batch_size {batch_size} (bytes)", peak,
            "max_train_memory_bytes", limits.max_train_memory_bytes, field="batch_size",
            advice="lower batch_size or choose a smaller student",
        )
    return parameters, peak
