"""CPU latency of teacher, student and baseline measured alike: the same runtime, input, threads and runs.

Timing an ONNX teacher in onnxruntime and the student in PyTorch compares the runtimes more than the
models (the same resnet18 read "5.0x faster" as safetensors and "0.8x the speed" as ONNX). So when
every model runs in PyTorch, all are timed there; when one is an ONNX graph, every model is exported to
ONNX and all are timed in onnxruntime. A model that cannot be exported is timed in PyTorch and the
figures are marked as not comparable.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdcore.evaluate import cpu_latency_ms, image_example


@dataclass
class Latencies:
    ms: dict[str, float]
    runtime: str  # pytorch | onnxruntime | mixed
    warnings: list[str] = field(default_factory=list)


def onnx_file_of(model: nn.Module) -> Path | None:
    """The ONNX file a model runs from (an ONNX teacher), or None for a PyTorch model."""
    path = getattr(model, "model_path", None)
    return path if isinstance(path, Path) else None


def like_for_like_latency(models: Mapping[str, nn.Module], input_shape: Sequence[int], *, runs: int) -> Latencies:
    """Batch-1 CPU latency of every model, in PyTorch unless one of them only runs in onnxruntime."""
    example = image_example(input_shape)
    if not any(onnx_file_of(model) is not None for model in models.values()):
        return Latencies({key: cpu_latency_ms(model.cpu(), example, runs=runs) for key, model in models.items()},
                         "pytorch")
    result = Latencies({}, "onnxruntime")
    with tempfile.TemporaryDirectory(prefix="latency-") as folder:
        for key, model in models.items():
            path = onnx_file_of(model) or _export_for_timing(model.cpu(), Path(folder) / f"{key}.onnx", example)
            if path is None:
                result.ms[key] = cpu_latency_ms(model.cpu(), example, runs=runs)
                result.runtime = "mixed"
                result.warnings.append(f"the {key} cannot be exported to ONNX, so its latency was measured in "
                                       "PyTorch and the ONNX teacher's in onnxruntime: the speedup compares runtimes")
            else:
                result.ms[key] = onnx_latency_ms(path, example.numpy(), runs=runs)
    return result


def _export_for_timing(model: nn.Module, path: Path, example: torch.Tensor) -> Path | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (example,), str(path), input_names=["input"], output_names=["logits"],
                              dynamo=False, opset_version=17)
    except Exception:  # an architecture the exporter cannot express: reported as a warning by the caller
        return None
    return path


def onnx_latency_ms(path: Path, example: np.ndarray, *, runs: int = 50, warmup: int = 5) -> float:
    """Median wall time of one onnxruntime run on the CPU, with PyTorch's thread count (as the PyTorch timing)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    feed = {model_input.name: example.astype(np.float16 if model_input.type == "tensor(float16)" else np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        timings.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(timings)
