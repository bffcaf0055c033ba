"""Why a teacher's weights do not fit the architecture the spec names, in words rather than tensor names.

"missing 10.weight, 10.bias ... unexpected 11.bias" means, to a user, "you forgot the dropout"; "missing
net.conv1.weight and 117 more" means "a 3-channel resnet18 on 1-channel data". This module reads the
parametrised layers of the file and of the built model (weights with two or more dimensions, in
order) and says what differs: input channels or features, outputs, the number of layers, their positions.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

_NUMBER = re.compile(r"(\d+)")
#: Arguments that add or remove layers a user forgets, with the values tried for each (a dropout rate
#: holds no weights, so any rate above 0 loads the same file as 0.5).
_LAYOUT_ARGS: dict[str, tuple[Any, ...]] = {"dropout": (0.5, 0.0), "input_dropout": (0.2, 0.0),
                                            "batchnorm": (True, False)}
#: Rebuilds the spec's architecture with other arch_args and returns its state dict (None: not valid).
Rebuild = Callable[[dict[str, Any]], "Mapping[str, torch.Tensor] | None"]


def _natural(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in _NUMBER.split(name) if part]


def _layers(state: Mapping[str, torch.Tensor],
            order: Mapping[str, int] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """(layer name, weight shape) of every Linear/Conv-like layer, input to output.

    A built model's state dict is in module order already. A file's may not be (safetensors sorts its
    names): where every layer name is also the built model's, `order` (name -> position there) puts it
    right; otherwise the names' natural order does, which is the module order of an nn.Sequential.
    """
    weights = [(name.removesuffix(".weight"), tuple(tensor.shape)) for name, tensor in state.items()
               if (name == "weight" or name.endswith(".weight")) and tensor.dim() >= 2]
    if order is None:
        return weights
    if all(name in order for name, _ in weights):
        return sorted(weights, key=lambda item: order[item[0]])
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


def _signature(state: Mapping[str, torch.Tensor]) -> set[tuple[str, tuple[int, ...]]]:
    return {(name, tuple(tensor.shape)) for name, tensor in state.items()}


def fitting_layout_args(arch_args: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                        rebuild: Rebuild) -> dict[str, Any] | None:
    """The arch_args, with dropout / input_dropout / batchnorm switched, whose model the file fits exactly.

    A forgotten `dropout` renumbers every layer after the first (nn.Sequential counts the weightless
    Dropout too), so the file's names look nothing like the built model's; trying the few switches
    that do that says which one was meant.
    """
    wanted = _signature(state)
    # Fewest changes first: a key in the answer then differs from what the spec builds.
    for count in range(1, len(_LAYOUT_ARGS) + 1):
        for keys in itertools.combinations(_LAYOUT_ARGS, count):
            for values in itertools.product(*(_LAYOUT_ARGS[key] for key in keys)):
                changed = dict(zip(keys, values, strict=True))
                built = rebuild({**arch_args, **changed})
                if built is not None and _signature(built) == wanted:
                    return changed
    return None


def _layout_hint(arch: str, arch_args: Mapping[str, Any], changed: Mapping[str, Any]) -> str:
    meant = " and ".join(f"{key}: {str(value).lower()}" if key == "batchnorm" else (key if value else f"no {key}")
                         for key, value in changed.items())
    text = f"the teacher's file fits {describe_arch(arch, {**arch_args, **changed})}: did you mean {meant}?"
    if any(key != "batchnorm" and value for key, value in changed.items()):
        text += (" (dropout holds no weights but shifts the numbering of the layers after it, so any rate above 0 "
                 "loads this file)")
    return text


def _adapter_only_in_file(built: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> bool:
    """The file is a channel-adapted torchvision model (`net.<name>`) and the built one a plain 3-channel one."""
    if not state or not all(name.startswith("net.") for name in state) or any(k.startswith("net.") for k in built):
        return False
    return {name.removeprefix("net.") for name in state} == set(built)


def _channels_guess(unit: str, in_file: int, in_data: int) -> str:
    """Flattened images: 3x the features is a colour teacher on grey data (and the reverse)."""
    if unit == "input features" and in_file == 3 * in_data:
        return " (3 times as many: a teacher for 3-channel images on 1-channel data?)"
    if unit == "input features" and 3 * in_file == in_data:
        return " (a third as many: a teacher for 1-channel images on 3-channel data?)"
    return ""


def describe_arch(arch: str, arch_args: Mapping[str, Any]) -> str:
    return f"{arch}({', '.join(f'{key}={value}' for key, value in arch_args.items())})"


def explain_mismatch(arch: str, arch_args: Mapping[str, Any], built: Mapping[str, torch.Tensor],
                     state: Mapping[str, torch.Tensor], rebuild: Rebuild | None = None) -> list[str]:
    """Plain sentences for what differs between the file's layers and the built model's (empty if unclear).

    `rebuild` (the spec's architecture built with other arch_args) lets a forgotten dropout or
    batchnorm be named exactly.
    """
    built_layers = _layers(built)
    file_layers = _layers(state, {name: index for index, (name, _) in enumerate(built_layers)})
    if not file_layers or not built_layers:
        return []
    if _adapter_only_in_file(built, state):
        return [f"the teacher was saved from {describe_arch(arch, arch_args)} built for 1- or 4-channel images (its "
                "tensors carry the channel adapter's `net.` prefix), but the data has 3 channels: give the teacher "
                "the data it was trained on (or convert these images to its channels)"]
    if rebuild is not None and (changed := fitting_layout_args(arch_args, state, rebuild)) is not None:
        return [_layout_hint(arch, arch_args, changed)]
    found = []
    file_first, built_first = file_layers[0][1], built_layers[0][1]
    if len(file_first) == len(built_first) and file_first[1] != built_first[1]:
        unit = "input channels" if len(file_first) == 4 else "input features"
        found.append(f"the teacher expects {file_first[1]} {unit}, the data has {built_first[1]}"
                     + _channels_guess(unit, file_first[1], built_first[1]))
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
    elif not found and (widths := [(name, file_shape[0], built_shape[0]) for (name, file_shape), (_, built_shape)
                                   in zip(file_layers, built_layers, strict=True) if file_shape != built_shape]):
        name, in_file, in_built = widths[0]
        found.append(f"the teacher's layers have other widths than {shown} builds ({len(widths)} of "
                     f"{len(built_layers)} layers differ; the first, {name}, has {in_file} outputs in the file, "
                     f"{in_built} built): did you mean other arch_args?")
    return found
