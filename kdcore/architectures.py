"""The model registry's metadata: names, descriptions and argument models, without torch.

The API lists and validates architectures from here without importing torch; the builders
themselves live in `kdcore.models` and are looked up by the same name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdcore.errors import SpecError


class ArchArgs(BaseModel):
    """Base for every architecture's arguments: unknown keys are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class MLPArgs(ArchArgs):
    hidden: list[int] = Field(default=[800, 800], description="Width of each hidden layer, input to output.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout after every hidden layer.")
    input_dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout on the input features (Hinton et al. used 0.2)."
    )
    activation: Literal["relu", "gelu", "tanh"] = Field(default="relu", description="Hidden activation.")
    batchnorm: bool = Field(default=False, description="BatchNorm1d after every hidden linear layer.")

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, hidden: list[int]) -> list[int]:
        if any(width < 1 or width > 65536 for width in hidden):
            raise ValueError("every hidden width must be between 1 and 65536")
        return hidden


class CNNArgs(ArchArgs):
    widths: list[int] = Field(default=[32, 64], min_length=1, description="Channels of each conv block.")
    kernel_size: int = Field(default=3, ge=1, le=11, description="Kernel size of every conv layer.")
    pool_size: int = Field(default=4, ge=1, le=32, description="Side of the pooled grid the classifier sees.")
    hidden: int = Field(default=128, ge=0, le=65536, description="Width of the classifier's hidden layer; 0 = none.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout before the classifier.")
    batchnorm: bool = Field(default=True, description="BatchNorm2d after every conv layer.")

    @field_validator("widths")
    @classmethod
    def _positive_widths(cls, widths: list[int]) -> list[int]:
        if any(width < 1 or width > 4096 for width in widths):
            raise ValueError("every width must be between 1 and 4096")
        return widths


class ResNetSmallArgs(ArchArgs):
    depth: Literal[8, 14, 20, 32, 44, 56] = Field(default=20, description="6n+2 layers, CIFAR-style ResNet.")
    width: int = Field(default=16, ge=4, le=256, description="Channels of the first stage (doubled per stage).")


class LinearArgs(ArchArgs):
    pass


class TorchvisionArgs(ArchArgs):
    pass


class ArchEntry(BaseModel):
    """One registry entry. `builder` is a "module:function" path resolved lazily (torch lives there)."""

    name: str
    family: str
    description: str
    args_model: type[ArchArgs]
    builder: str


class ArchInfo(BaseModel):
    """What `GET /v1/architectures` serves for one entry."""

    name: str
    family: str
    description: str
    args_schema: dict[str, Any]
    defaults: dict[str, Any]


ARCHITECTURES: dict[str, ArchEntry] = {}


def register(name: str, *, family: str, description: str, args_model: type[ArchArgs], builder: str) -> None:
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} registered twice")
    ARCHITECTURES[name] = ArchEntry(
        name=name, family=family, description=description, args_model=args_model, builder=builder
    )


register(
    "mlp",
    family="builtin",
    description="Multi-layer perceptron over the flattened input (Hinton et al.'s MNIST students).",
    args_model=MLPArgs,
    builder="kdcore.models:build_mlp",
)
register(
    "cnn",
    family="builtin",
    description="Small convnet: conv-BN-ReLU-maxpool blocks, average pool to a small grid, MLP head.",
    args_model=CNNArgs,
    builder="kdcore.models:build_cnn",
)
register(
    "resnet_small",
    family="builtin",
    description="CIFAR-style ResNet (He et al. 2016) with 6n+2 layers; good for small images.",
    args_model=ResNetSmallArgs,
    builder="kdcore.models:build_resnet_small",
)
register(
    "linear",
    family="builtin",
    description="A single linear layer over the flattened input (multinomial logistic regression).",
    args_model=LinearArgs,
    builder="kdcore.models:build_linear",
)

# torchvision classification models; channels other than 3 are adapted in front of the first layer.
TORCHVISION_MODELS: dict[str, str] = {
    "resnet18": "ResNet-18 (11.7M parameters at 1000 classes).",
    "resnet34": "ResNet-34.",
    "resnet50": "ResNet-50.",
    "mobilenet_v2": "MobileNetV2.",
    "mobilenet_v3_small": "MobileNetV3-Small: a strong student for phones.",
    "mobilenet_v3_large": "MobileNetV3-Large.",
    "efficientnet_b0": "EfficientNet-B0.",
    "shufflenet_v2_x0_5": "ShuffleNetV2 0.5x.",
    "shufflenet_v2_x1_0": "ShuffleNetV2 1.0x.",
    "squeezenet1_1": "SqueezeNet 1.1.",
    "mnasnet0_5": "MNASNet 0.5.",
    "regnet_y_400mf": "RegNetY-400MF.",
    "densenet121": "DenseNet-121.",
    "convnext_tiny": "ConvNeXt-Tiny.",
}
for _name, _description in TORCHVISION_MODELS.items():
    register(
        _name,
        family="torchvision",
        description=f"torchvision {_description} num_classes comes from the data; randomly initialised.",
        args_model=TorchvisionArgs,
        builder="kdcore.models:build_torchvision",
    )


def known_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def get_entry(name: str, *, field: str = "arch") -> ArchEntry:
    entry = ARCHITECTURES.get(name)
    if entry is None:
        raise SpecError([{"field": field, "message": f"unknown architecture {name!r}; known: "
                          + ", ".join(known_architectures())}])
    return entry


def validate_arch_args(name: str, args: dict[str, Any], *, field: str = "arch_args") -> ArchArgs:
    """Parse `args` with the architecture's model; errors name `field.<key>`."""
    entry = get_entry(name)
    try:
        return entry.args_model.model_validate(args)
    except ValidationError as exc:
        raise SpecError([
            {"field": ".".join([field, *(str(part) for part in err["loc"])]), "message": err["msg"]}
            for err in exc.errors()
        ]) from exc


def list_architectures() -> list[ArchInfo]:
    return [
        ArchInfo(
            name=entry.name,
            family=entry.family,
            description=entry.description,
            args_schema=entry.args_model.model_json_schema(),
            defaults=entry.args_model().model_dump(),
        )
        for entry in sorted(ARCHITECTURES.values(), key=lambda e: (e.family, e.name))
    ]
