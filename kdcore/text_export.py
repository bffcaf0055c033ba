"""Text student exports: an hf folder zip, ONNX with dynamic batch and sequence axes, safetensors.

`student_hf.zip` unpacks to a folder that `AutoModelForSequenceClassification.from_pretrained`
and `AutoTokenizer.from_pretrained` load; the ONNX graph takes `input_ids` and `attention_mask`
(and `token_type_ids` where the family has them) of any batch and length, checked against PyTorch
in onnxruntime on two shapes before it is kept.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcore.errors import KDError
from kdcore.export import ONNX_TOLERANCE, export_safetensors
from kdcore.text_data import TokenBatch

__all__ = ["export_hf_zip", "export_safetensors", "export_text_onnx"]


def export_hf_zip(model: Any, tokenizer: Any, path: Path, metadata: dict[str, Any]) -> Path:
    """save_pretrained of model and tokenizer, plus distillery.json, zipped atomically."""
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        folder = Path(scratch) / "student"
        model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
        (folder / "distillery.json").write_text(json.dumps(metadata, indent=2))
        temporary = path.with_name(f".{path.name}.tmp")
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(folder.rglob("*")):
                if file.is_file():
                    archive.write(file, file.relative_to(folder).as_posix())
        os.replace(temporary, path)
    return path


class _OnnxFacade(nn.Module):
    """Plain tensors in, logits out: what an ONNX graph can take."""

    def __init__(self, model: nn.Module, with_type_ids: bool) -> None:
        super().__init__()
        self.model = model
        self.with_type_ids = with_type_ids

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        type_ids = token_type_ids if self.with_type_ids else None
        return self.model(TokenBatch(input_ids, attention_mask, type_ids))


def export_text_onnx(model: nn.Module, path: Path, *, vocab_size: int, with_type_ids: bool) -> Path:
    facade = _OnnxFacade(model.eval(), with_type_ids).eval()
    names = ["input_ids", "attention_mask", *(["token_type_ids"] if with_type_ids else [])]
    example = _example(2, 7, vocab_size, with_type_ids)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(facade, example, str(temporary), input_names=names, output_names=["logits"],
                              dynamic_axes={**axes, "logits": {0: "batch"}}, dynamo=False, opset_version=17)
    except Exception as exc:
        temporary.unlink(missing_ok=True)
        raise KDError(f"the student cannot be exported to ONNX: {str(exc).splitlines()[0][:300]}; drop onnx from "
                      "export", field="export", code="export_failed") from exc
    error = max(onnx_text_max_error(facade, temporary, _example(batch, length, vocab_size, with_type_ids))
                for batch, length in ((1, 5), (3, 11)))
    if error > ONNX_TOLERANCE:
        temporary.unlink(missing_ok=True)
        raise KDError(f"ONNX export differs from PyTorch by {error:.2e} (> {ONNX_TOLERANCE}); drop onnx from export",
                      field="export", code="export_failed")
    os.replace(temporary, path)
    return path


def _example(batch: int, length: int, vocab_size: int, with_type_ids: bool) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 2:] = 0  # a padded row, so the mask's path is checked too
    return (ids, mask, torch.zeros_like(ids)) if with_type_ids else (ids, mask)


def onnx_text_max_error(facade: nn.Module, path: Path, example: tuple[torch.Tensor, ...]) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]
    feeds = {name: tensor.numpy().astype(np.int64) for name, tensor in zip(names, example, strict=False)}
    (onnx_out,) = session.run(None, feeds)
    with torch.inference_mode():
        torch_out = facade(*example).float().numpy()
    scale = max(1.0, float(np.abs(torch_out).max()))
    return float(np.abs(onnx_out - torch_out).max() / scale)
