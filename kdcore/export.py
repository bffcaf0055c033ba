"""Student exports: safetensors, TorchScript and ONNX (checked against PyTorch), and int8 quantisation.

Every export takes exactly the tensor the teacher takes (N×C×H×W or N×F float32, normalised as
`data.normalize` says) and returns logits.
"""

from __future__ import annotations

import copy
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from kdcore.errors import KDError

ONNX_TOLERANCE = 1e-3


def _atomic_target(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def export_safetensors(model: nn.Module, path: Path, metadata: dict[str, Any]) -> Path:
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    temporary = _atomic_target(path)
    save_file(state, str(temporary), metadata={key: json.dumps(value) for key, value in metadata.items()})
    os.replace(temporary, path)
    return path


def export_torchscript(model: nn.Module, path: Path, input_shape: Sequence[int]) -> Path:
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        # jit is deprecated upstream, but TorchScript is still what C++/mobile runtimes load.
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
        temporary = _atomic_target(path)
        torch.jit.save(traced, str(temporary))
    os.replace(temporary, path)
    return path


def export_onnx(model: nn.Module, path: Path, input_shape: Sequence[int],
                metadata: dict[str, Any] | None = None) -> Path:
    """Export with a dynamic batch axis, then check onnxruntime agrees with PyTorch on random input.

    `metadata` (the input contract: normalisation, class names, input shape, job id) goes into the
    model's `metadata_props`, each value JSON-encoded, as safetensors metadata is.
    """
    example = torch.randn(3, *input_shape)
    temporary = _atomic_target(path)
    try:
        with warnings.catch_warnings():
            # The TorchScript-based exporter handles every registry model; the dynamo one does not (yet).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.eval(), (example,), str(temporary), input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False, opset_version=17,
            )
    except Exception as exc:
        temporary.unlink(missing_ok=True)
        raise KDError(f"the student cannot be exported to ONNX: {str(exc).splitlines()[0][:300]}; drop onnx from "
                      "export", field="export", code="export_failed") from exc
    max_error = onnx_max_error(model, temporary, example)
    if max_error > ONNX_TOLERANCE:
        temporary.unlink(missing_ok=True)
        raise KDError(f"ONNX export differs from PyTorch by {max_error:.2e} (> {ONNX_TOLERANCE}); "
                      "drop onnx from export", field="export", code="export_failed")
    if metadata:
        write_onnx_metadata(temporary, metadata)
    os.replace(temporary, path)
    return path


def write_onnx_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Set the model's metadata_props (key -> JSON value), so the file carries its own input contract."""
    import onnx

    model = onnx.load(str(path))
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in metadata.items():
        prop = existing.get(key) or model.metadata_props.add()
        prop.key, prop.value = key, json.dumps(value)
    onnx.save_model(model, str(path))


def onnx_max_error(model: nn.Module, path: Path, example: torch.Tensor) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {"input": example.numpy().astype(np.float32)})
    with torch.inference_mode():
        torch_out = model.eval()(example).float().numpy()
    scale = max(1.0, float(np.abs(torch_out).max()))
    return float(np.abs(onnx_out - torch_out).max() / scale)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """Post-training dynamic int8 quantisation of Linear layers (weights int8, activations quantised on the fly)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


def quantized_size_mb(model: nn.Module) -> float:
    """Serialized size of a quantised model (its packed weights are not plain tensors of the state dict)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1e6
