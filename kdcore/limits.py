"""The resource limits a job runs under, torch-free, so the API checks what it can before a worker does.

The operator sets them (the service's `DISTILLERY_*` settings); the engine receives them through
`RunOptions.limits`. A job over a limit fails with `resource_limit`, naming the spec field at fault,
the limit and its setting, before the work it would bound starts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kdcore.architectures import CNNArgs, HFArgs, MLPArgs, ResNetSmallArgs
from kdcore.archive import DEFAULT_LIMITS, ArchiveLimits
from kdcore.errors import KDError

GiB = 1024**3

#: The service setting behind each limit, so a message can say what the operator would change.
SETTINGS = {
    "max_decoded_bytes": "DISTILLERY_MAX_DATASET_BYTES",
    "max_model_parameters": "DISTILLERY_MAX_MODEL_PARAMETERS",
    "max_train_memory_bytes": "DISTILLERY_MAX_TRAIN_MEMORY_BYTES",
    "onnx_arena_bytes": "DISTILLERY_ONNX_ARENA_BYTES",
    "job_memory_bytes": "DISTILLERY_JOB_MEMORY_BYTES",
    "max_job_seconds": "DISTILLERY_MAX_JOB_SECONDS",
}


class ResourceLimitError(KDError):
    """A job would exceed an operator's limit; running it again would too."""

    code = "resource_limit"


class ResourceLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    archive: ArchiveLimits = Field(default=DEFAULT_LIMITS)  # max_decoded_bytes bounds the dataset in memory
    max_model_parameters: int = Field(default=200_000_000, ge=1)
    max_train_memory_bytes: int = Field(default=12 * GiB, ge=1)
    onnx_arena_bytes: int | None = Field(default=4 * GiB, ge=1)


DEFAULT_RESOURCE_LIMITS = ResourceLimits()


def over_limit(what: str, amount: int, limit_name: str, limit: int, *, field: str, advice: str) -> ResourceLimitError:
    return ResourceLimitError(
        f"{what} is {amount:,}, more than the limit of {limit:,} ({limit_name}, set by "
        f"{SETTINGS.get(limit_name, 'the operator')}); {advice}",
        field=field,
    )


def check_dataset_bytes(nbytes: int, limits: ResourceLimits, *, field: str) -> None:
    if nbytes > limits.archive.max_decoded_bytes:
        raise over_limit(
            "the decoded dataset size in bytes", nbytes, "max_decoded_bytes", limits.archive.max_decoded_bytes,
            field=field, advice="use fewer or smaller images, or a smaller data.image_size",
        )


def _channels(info: Mapping[str, Any]) -> int:
    shape = list(info.get("sample_shape") or [])
    if info.get("layout") == "nhwc":
        return int(shape[-1])
    if info.get("layout") == "nchw":
        return int(shape[0])
    return 1


def model_input_shape(info: Mapping[str, Any], image_size: int | None) -> list[int]:
    """One sample as the model will see it, from a sniffed dataset's info (torch-free)."""
    shape = [int(d) for d in info.get("sample_shape") or []]
    layout = info.get("layout")
    if layout == "nf":
        return shape
    channels = _channels(info)
    if image_size is not None:
        return [channels, image_size, image_size]
    return [channels, *(shape[:2] if layout in ("nhw", "nhwc") else shape[1:])]


def dataset_bytes(info: Mapping[str, Any], image_size: int | None) -> int:
    """What a sniffed dataset will take in memory once loaded (and resized), without loading it."""
    samples = int(info.get("num_train") or 0) + int(info.get("num_test") or 0)
    itemsize = 1 if info.get("dtype") == "uint8" else 4
    if image_size is None and info.get("decoded_bytes") is not None:
        return int(info["decoded_bytes"])
    return samples * math.prod(model_input_shape(info, image_size)) * itemsize


def mlp_parameters(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int]) -> int:
    """Parameters of the registry's MLP (weights and biases; a bound good enough to refuse giants early)."""
    widths = [math.prod(input_shape), *hidden, num_classes]
    return sum(a * b + b for a, b in itertools.pairwise(widths))


def cnn_parameters(input_shape: Sequence[int], num_classes: int, args: CNNArgs) -> int:
    """Parameters of the registry's CNN (`kdcore.models.build_cnn`, layer for layer), without torch."""
    channels, height, width = (int(size) for size in input_shape)
    total = 0
    for conv_width in args.widths:
        total += conv_width * channels * args.kernel_size**2 + conv_width  # weights, then bias or BN's shift
        total += conv_width if args.batchnorm else 0  # BN's scale
        if min(height, width) >= 4:
            height, width = height // 2, width // 2
        channels = conv_width
    features = channels * _nearest_divisor(height, args.pool_size) * _nearest_divisor(width, args.pool_size)
    if args.hidden:
        return total + features * args.hidden + args.hidden + args.hidden * num_classes + num_classes
    return total + features * num_classes + num_classes


def resnet_small_parameters(input_shape: Sequence[int], num_classes: int, args: ResNetSmallArgs) -> int:
    """Parameters of the registry's CIFAR ResNet (`kdcore.models.ResNetSmall`), without torch."""
    blocks = (args.depth - 2) // 6
    channels = args.width
    total = 9 * int(input_shape[0]) * args.width + 2 * args.width  # the stem's conv and BN
    for stage, stage_width in enumerate((args.width, 2 * args.width, 4 * args.width)):
        for block in range(blocks):
            total += 9 * channels * stage_width + 9 * stage_width**2 + 4 * stage_width  # two convs, two BNs
            if (stage > 0 and block == 0) or channels != stage_width:
                total += channels * stage_width + 2 * stage_width  # the 1x1 shortcut and its BN
            channels = stage_width
    return total + channels * num_classes + num_classes


def student_parameters(arch: str, arch_args: Mapping[str, Any], input_shape: Sequence[int],
                       num_classes: int) -> int | None:
    """The student's parameter count where a formula gives it without torch, else None (the worker's
    check stage counts it on the meta device)."""
    if arch == "mlp":
        return mlp_parameters(input_shape, num_classes, MLPArgs.model_validate(arch_args).hidden)
    if len(input_shape) != 3:
        return None  # an image architecture on feature vectors: the worker names that mismatch
    if arch == "cnn":
        return cnn_parameters(input_shape, num_classes, CNNArgs.model_validate(arch_args))
    if arch == "resnet_small":
        return resnet_small_parameters(input_shape, num_classes, ResNetSmallArgs.model_validate(arch_args))
    return None


def hf_student_parameters_floor(hf: Mapping[str, Any], arch_args: Mapping[str, Any]) -> int | None:
    """A count an hf student cannot be under, from the teacher's sniffed config and the overrides: the
    query and output projections of attention (hidden_size² each, in every layer of every family). The
    rest (embeddings, keys and values under grouped attention, the feed-forward) varies by family, so it
    is left to the worker's exact count; a floor never refuses a student that would fit. None where the
    config does not tell (or ALBERT, whose layers share one set of weights)."""
    args = HFArgs.model_validate(arch_args)
    hidden = args.hidden_size or hf.get("hidden_size")
    layers = args.num_hidden_layers or hf.get("num_layers")
    if not hidden or not layers or hf.get("model_type") == "albert":
        return None
    return int(layers) * 2 * int(hidden) ** 2


def _nearest_divisor(size: int, target: int) -> int:
    # The same choice as kdcore.models._nearest_divisor (the pooled grid divides the feature map).
    divisors = [d for d in range(1, size + 1) if size % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def check_parameters(parameters: int, limits: ResourceLimits, *, field: str = "student.arch_args") -> None:
    if parameters > limits.max_model_parameters:
        raise over_limit(
            "the student's parameter count", parameters, "max_model_parameters", limits.max_model_parameters,
            field=field, advice="choose a smaller student",
        )
