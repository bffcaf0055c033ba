"""Why a teacher's weights do not fit the architecture the spec names, in words rather than tensor names.

"missing 10.weight, 10.bias ... unexpected 11.bias" means, to a user, "you forgot the dropout"; "missing
net.conv1.weight and 117 more" means "a 3-channel resnet18 on 1-channel data". This module reads the
parametrised layers of the file and of the built model (weights with two or more dimensions, in
order) and says what differs: input channels or features, outputs, the number of layers, their positions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

_NUMBER = re.compile(r"(\d+)")


def _natural(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in _NUMBER.split(name) if part]


def _layers(state: Mapping[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...]]]:
    """(layer name, weight shape) of every Linear/Conv-like layer, in natural name order."""
    weights = [(name.removesuffix(".weight"), tuple(tensor.shape)) for name, tensor in state.items()
               if (name == "weight" or name.endswith(".weight")) and tensor.dim() >= 2]
    return sorted(weights, key=lambda item: _natural(item[0]))


def adapt_channel_prefix(built: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision teacher saved bare loads into the registry's channel adapter (`net.` + its names).

    The registry wraps torchvision models for 1- or 4-channel data in an adapter that feeds them 3
    channels, so their tensors are named `net.<name>`; a state dict of the plain model fits it once prefixed.
    """
    if built and all(name.startswith("net.") for name in built) and not any(k.startswith("net.") for k in state):
        prefixed = {f"net.{name}": tensor for name, tensor in state.items()}
        if set(prefixed) == set(built):
            return prefixed
    return state


def describe_arch(arch: str, arch_args: Mapping[str, Any]) -> str:
    return f"{arch}({', '.join(f'{key}={value}' for key, value in arch_args.items())})"


def explain_mismatch(arch: str, arch_args: Mapping[str, Any], built: Mapping[str, torch.Tensor],
                     state: Mapping[str, torch.Tensor]) -> list[str]:
    """Plain sentences for what differs between the file's layers and the built model's (empty if unclear)."""
    file_layers, built_layers = _layers(state), _layers(built)
    if not file_layers or not built_layers:
        return []
    found = []
    file_first, built_first = file_layers[0][1], built_layers[0][1]
    if len(file_first) == len(built_first) and file_first[1] != built_first[1]:
        unit = "input channels" if len(file_first) == 4 else "input features"
        found.append(f"the teacher expects {file_first[1]} {unit}, the data has {built_first[1]}")
    file_out, built_out = file_layers[-1][1][0], built_layers[-1][1][0]
    if file_out != built_out:
        found.append(f"the teacher has {file_out} outputs, the data {built_out} classes")
    shown = describe_arch(arch, arch_args)
    difference = len(file_layers) - len(built_layers)
    hidden = [shape[0] for _, shape in file_layers[:-1]] if arch == "mlp" else None
    if difference:
        more = "more" if difference > 0 else "fewer"
        hint = f"did you mean hidden: {hidden}?" if hidden is not None else "did you mean other arch_args?"
        layers = "layer" if abs(difference) == 1 else "layers"
        found.append(f"the teacher's file has {abs(difference)} {more} {layers} than {shown} builds: {hint}")
    elif [name for name, _ in file_layers] != [name for name, _ in built_layers]:
        found.append(f"the teacher's layers sit at other positions than {shown} puts them (file: "
                     f"{', '.join(name for name, _ in file_layers)}; built: "
                     f"{', '.join(name for name, _ in built_layers)}): it was built with layers that have no "
                     "weights (dropout, batchnorm) where these arch_args have none, or the reverse: did you mean "
                     "dropout, input_dropout or batchnorm?")
    elif hidden is not None and hidden != [shape[0] for _, shape in built_layers[:-1]]:
        found.append(f"the teacher's hidden widths are {hidden}, {shown} builds "
                     f"{[shape[0] for _, shape in built_layers[:-1]]}: did you mean hidden: {hidden}?")
    return found
