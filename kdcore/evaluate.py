"""The numbers of a report: accuracy, top-5, loss, size, CPU latency and the teacher/student comparison."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn


class ModelMetrics(BaseModel):
    accuracy: float
    top5: float
    loss: float
    params: int
    size_mb: float
    latency_ms: float
    per_class_accuracy: list[float | None]


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, object]:
    """Accuracy, top-5, mean cross-entropy and per-class accuracy (None for a class absent from the split)."""
    logits = logits.float()
    predictions = logits.argmax(dim=1)
    k = min(5, logits.shape[1])
    top5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()
    per_class: list[float | None] = []
    for cls in range(num_classes):
        mask = labels == cls
        per_class.append((predictions[mask] == cls).float().mean().item() if mask.any() else None)
    return {
        "accuracy": (predictions == labels).float().mean().item(),
        "top5": top5,
        "loss": F.cross_entropy(logits, labels).item(),
        "per_class_accuracy": per_class,
    }


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    predictions = logits.argmax(dim=1)
    flat = labels * num_classes + predictions
    counts = torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    return counts.tolist()


def correct(logits: torch.Tensor, labels: torch.Tensor) -> list[bool]:
    """Per sample: whether the model's top class is the label (what the paired gain tests compare)."""
    return (logits.argmax(dim=1) == labels.to(logits.device)).tolist()


def agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    """Share of samples where two models predict the same class."""
    return (first.argmax(dim=1) == second.argmax(dim=1)).float().mean().item()


def parameter_count(model: nn.Module) -> int:
    declared = getattr(model, "num_parameters", None)
    if isinstance(declared, int):
        return declared
    return sum(p.numel() for p in model.parameters())


def size_mb(model: nn.Module, file: Path | None = None) -> float:
    """Serialized weight size in MB (10^6 bytes): the state's tensors, or the file for opaque models."""
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()
                       if isinstance(t, torch.Tensor))
    if tensor_bytes == 0:
        # Opaque models (ONNX) declare their weights' bytes; else the file is the best measure there is.
        declared = getattr(model, "weight_bytes", 0)
        tensor_bytes = declared if isinstance(declared, int) and declared else (file.stat().st_size if file else 0)
    return tensor_bytes / 1e6


def image_example(input_shape: Sequence[int]) -> torch.Tensor:
    """The batch-1 input latency is measured on for an image model."""
    return torch.zeros(1, *input_shape)


@torch.inference_mode()
def cpu_latency_ms(model: nn.Module, example: Any, *, runs: int = 50, warmup: int = 5) -> float:
    """Median wall time of one forward pass over `example` (a batch of one) on the CPU, in milliseconds."""
    model = model.eval()
    for _ in range(warmup):
        model(example)
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        model(example)
        timings.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(timings)


def size_and_speed_warnings(teacher: dict[str, Any], student: dict[str, Any], runtime: str) -> list[str]:
    """Plain warnings when the student is not smaller or not faster than its teacher (a report must not hide it)."""
    found = []
    if student["params"] >= teacher["params"] > 0:
        found.append(f"the student is not smaller than its teacher: {student['params']:,} parameters against "
                     f"{teacher['params']:,}")
    if student["latency_ms"] >= teacher["latency_ms"]:
        found.append(f"the student is not faster than its teacher: {student['latency_ms']:.3f} ms against "
                     f"{teacher['latency_ms']:.3f} ms per sample ({runtime}, CPU, batch 1)")
    return found
