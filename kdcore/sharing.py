"""Parameter sharing: start a student from the teacher's tensors where names and shapes match."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def share_parameters(teacher: nn.Module, student: nn.Module) -> int:
    """Copy every teacher tensor (parameters and buffers) whose name and shape match; return how many."""
    teacher_state = teacher.state_dict()
    shared = 0
    for name, tensor in student.state_dict().items():
        source = teacher_state.get(name)
        if isinstance(source, torch.Tensor) and source.shape == tensor.shape and source.dtype == tensor.dtype:
            tensor.copy_(source.to(tensor.device))
            shared += 1
    return shared
