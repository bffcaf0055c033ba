"""Model builders for the registry in `kdcore.architectures`, and helpers to build by name.

Every builder takes the validated arguments, the input shape of one sample (C, H, W) or (F,)
and the number of classes, and returns an `nn.Module` that maps float32 input to logits.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from kdcore.architectures import (
    CNNArgs,
    MLPArgs,
    ResNetSmallArgs,
    get_entry,
    validate_arch_args,
)
from kdcore.errors import MismatchError

Builder = Callable[[Any, Sequence[int], int, str], nn.Module]


def build_model(arch: str, arch_args: dict[str, Any], input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Build a registry architecture for samples of `input_shape` and `num_classes` outputs."""
    entry = get_entry(arch)
    args = validate_arch_args(arch, arch_args)
    module_name, function_name = entry.builder.split(":")
    builder = cast(Builder, getattr(importlib.import_module(module_name), function_name))
    return builder(args, tuple(input_shape), num_classes, arch)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def build_mlp(args: MLPArgs, input_shape: Sequence[int], num_classes: int, arch: str = "mlp") -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    if args.input_dropout:
        layers.append(nn.Dropout(args.input_dropout))
    width = math.prod(input_shape)
    for hidden in args.hidden:
        layers.append(nn.Linear(width, hidden))
        if args.batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(_ACTIVATIONS[args.activation]())
        if args.dropout:
            layers.append(nn.Dropout(args.dropout))
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def build_linear(args: Any, input_shape: Sequence[int], num_classes: int, arch: str = "linear") -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def _image_channels(input_shape: Sequence[int], arch: str) -> int:
    if len(input_shape) != 3:
        raise MismatchError(
            f"architecture {arch!r} needs image input (C×H×W) but the data's samples have shape "
            f"{tuple(input_shape)}; use mlp or linear for feature vectors",
            field="student.arch",
        )
    return int(input_shape[0])


def _nearest_divisor(size: int, target: int) -> int:
    """The divisor of `size` closest to `target` (the larger on a tie).

    An average pool whose grid divides the feature map is a plain strided pool, which every
    export format expresses; an uneven adaptive pool has no ONNX equivalent.
    """
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def build_cnn(args: CNNArgs, input_shape: Sequence[int], num_classes: int, arch: str = "cnn") -> nn.Module:
    channels = _image_channels(input_shape, arch)
    layers: list[nn.Module] = []
    height, width = int(input_shape[1]), int(input_shape[2])
    for conv_width in args.widths:
        layers.append(nn.Conv2d(channels, conv_width, args.kernel_size, padding=args.kernel_size // 2,
                                bias=not args.batchnorm))
        if args.batchnorm:
            layers.append(nn.BatchNorm2d(conv_width))
        layers.append(nn.ReLU(inplace=True))
        # Pool only while the feature map is still worth halving.
        if min(height, width) >= 4:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        channels = conv_width
    # A small grid rather than a global pool: digits and the like are told apart by where strokes are.
    grid = (_nearest_divisor(height, args.pool_size), _nearest_divisor(width, args.pool_size))
    layers += [nn.AdaptiveAvgPool2d(grid), nn.Flatten()]
    features = channels * grid[0] * grid[1]
    if args.dropout:
        layers.append(nn.Dropout(args.dropout))
    if args.hidden:
        layers += [nn.Linear(features, args.hidden), nn.ReLU(inplace=True), nn.Linear(args.hidden, num_classes)]
    else:
        layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """He et al. (2016) CIFAR ResNet: three stages of n basic blocks, widths w, 2w, 4w."""

    def __init__(self, in_channels: int, num_classes: int, depth: int, width: int) -> None:
        super().__init__()
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        channels = width
        for stage, stage_width in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(_BasicBlock(channels, stage_width, stride))
                channels = stage_width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def build_resnet_small(args: ResNetSmallArgs, input_shape: Sequence[int], num_classes: int,
                       arch: str = "resnet_small") -> nn.Module:
    return ResNetSmall(_image_channels(input_shape, arch), num_classes, args.depth, args.width)


class RepeatChannels(nn.Module):
    """Feeds C-channel images to a 3-channel torchvision model (grayscale repeated, extra channels averaged)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 1:
            return x.expand(-1, 3, -1, -1)
        return x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)


class ChannelAdapted(nn.Module):
    def __init__(self, in_channels: int, net: nn.Module) -> None:
        super().__init__()
        self.adapt = RepeatChannels(in_channels)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapt(x))


def build_torchvision(args: Any, input_shape: Sequence[int], num_classes: int, arch: str) -> nn.Module:
    import torchvision.models

    channels = _image_channels(input_shape, arch)
    net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    return net if channels == 3 else ChannelAdapted(channels, net)
