from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kdcore.models import build_model


@dataclass
class TeacherZoo:
    """One small registry MLP saved in every teacher format, and a batch to compare logits on."""

    model: nn.Module
    arch: str
    arch_args: dict[str, list[int]]
    input_shape: tuple[int, ...]
    num_classes: int
    batch: torch.Tensor
    files: dict[str, Path]


@pytest.fixture(scope="session")
def teacher_zoo(tmp_path_factory: pytest.TempPathFactory) -> TeacherZoo:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    arch, arch_args, input_shape, num_classes = "mlp", {"hidden": [16, 8]}, (1, 4, 4), 3
    model = build_model(arch, arch_args, input_shape, num_classes).eval()
    batch = torch.randn(5, *input_shape)
    folder = tmp_path_factory.mktemp("teachers")
    # Names without telling extensions: the sniffer must go by content.
    files = {name: folder / f"teacher_{name}.bin" for name in
             ("safetensors", "state_dict", "legacy", "checkpoint", "onnx", "torchscript", "exported")}

    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, files["safetensors"])
    torch.save(model.state_dict(), files["state_dict"])
    torch.save(model.state_dict(), files["legacy"], _use_new_zipfile_serialization=False)
    torch.save({"epoch": 3, "model": model.state_dict(), "lr": 0.1}, files["checkpoint"])
    torch.onnx.export(
        model, (batch,), str(files["onnx"]), dynamo=False, input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), str(files["torchscript"]))
    program = torch.export.export(model, (batch,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with files["exported"].open("wb") as handle:  # a handle: torch warns about paths not ending in .pt2
        torch.export.save(program, handle)
    return TeacherZoo(model, arch, arch_args, input_shape, num_classes, batch, files)
