"""The model registry's metadata: names, descriptions and argument models, without torch.

The API lists and validates architectures from here without importing torch; the builders
themselves live in `kdcore.models` and are looked up by the same name.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from kdcore.errors import SpecError

Task = Literal["image_classification", "text_classification", "causal_lm"]


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


class HFArgs(ArchArgs):
    """Overrides of the teacher's `config.json`; a field left unset keeps the teacher's value.

    Names are transformers' standard ones; families that spell them differently (DistilBERT's
    `n_layers`, `dim`) map them through their config's `attribute_map`.
    """

    num_hidden_layers: int | None = Field(default=None, ge=1, le=128, description="Transformer layers.")
    hidden_size: int | None = Field(default=None, ge=8, le=16384, description="Width of every layer.")
    num_attention_heads: int | None = Field(default=None, ge=1, le=256, description="Heads; must divide hidden_size.")
    intermediate_size: int | None = Field(default=None, ge=8, le=65536, description="Width of the feed-forward.")

    @field_validator("num_attention_heads")
    @classmethod
    def _heads_divide_width(cls, heads: int | None, info: ValidationInfo) -> int | None:
        hidden = info.data.get("hidden_size")
        if heads is not None and hidden is not None and hidden % heads:
            raise ValueError(f"{heads} heads do not divide hidden_size {hidden}")
        return heads


class TextBiLSTMArgs(ArchArgs):
    hidden: int = Field(default=300, ge=1, le=8192, description="LSTM width per direction (Tang et al.: 300).")
    layers: int = Field(default=1, ge=1, le=8, description="Stacked BiLSTM layers.")
    mlp_hidden: int = Field(default=400, ge=0, le=65536, description="Width of the ReLU layer before the output.")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="Dropout on the embeddings and the pooled state.")
    freeze_embeddings: bool = Field(default=False, description="Keep the teacher's token embeddings fixed.")


class ArchEntry(BaseModel):
    """One registry entry. `builder` is a "module:function" path resolved lazily (torch lives there)."""

    name: str
    family: str
    task: Task = "image_classification"
    also: tuple[Task, ...] = ()  # further tasks it is a student for (hf: causal_lm too)
    description: str
    args_model: type[ArchArgs]
    builder: str


class ArchInfo(BaseModel):
    """What `GET /v1/architectures` serves for one entry."""

    name: str
    family: str
    task: Task = Field(description="The kind of job this architecture is a student for (the first of `tasks`).")
    tasks: list[Task] = Field(description="Every kind of job it is a student for.")
    description: str
    args_schema: dict[str, Any]
    defaults: dict[str, Any]


ARCHITECTURES: dict[str, ArchEntry] = {}


def register(name: str, *, family: str, description: str, args_model: type[ArchArgs], builder: str,
             task: Task = "image_classification", also: tuple[Task, ...] = ()) -> None:
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} registered twice")
    ARCHITECTURES[name] = ArchEntry(
        name=name, family=family, task=task, also=also, description=description, args_model=args_model,
        builder=builder,
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


register(
    "hf",
    family="transformers",
    task="text_classification",
    also=("causal_lm",),
    description="The teacher's transformers family (BERT, RoBERTa, DistilBERT, MiniLM, DeBERTa, ModernBERT, ...; "
    "for causal_lm GPT-2, Llama, Qwen, Mistral, ...) with arch_args overriding its config; with init_from_teacher "
    "it starts from the teacher's embeddings (and head) and the layers named by student.teacher_layers "
    "(DistilBERT's copy, Minitron's depth pruning).",
    args_model=HFArgs,
    builder="kdcore.hf_models:build_hf_student",
)
register(
    "text_bilstm",
    family="text",
    task="text_classification",
    description="BiLSTM over the teacher's token embeddings, max-pooled, then a ReLU layer (Tang et al. 2019, "
    "'Distilling Task-Specific Knowledge from BERT into Simple Neural Networks'): the smallest budgets.",
    args_model=TextBiLSTMArgs,
    builder="kdcore.hf_models:build_text_bilstm",
)


def known_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def unknown_architecture(name: str) -> str:
    """The message for a name the registry lacks: the closest names first, then every known one."""
    close = difflib.get_close_matches(name, known_architectures(), n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"unknown architecture {name!r}; {hint}known: {', '.join(known_architectures())}"


def get_entry(name: str, *, field: str = "arch") -> ArchEntry:
    entry = ARCHITECTURES.get(name)
    if entry is None:
        raise SpecError([{"field": field, "message": unknown_architecture(name)}])
    return entry


def validate_arch_args(name: str, args: dict[str, Any], *, field: str = "arch_args") -> ArchArgs:
    """Parse `args` with the architecture's model; errors name `field.<key>`."""
    entry = get_entry(name)
    try:
        return entry.args_model.model_validate(args)
    except ValidationError as exc:
        raise SpecError([
            {"field": ".".join([field, *(str(part) for part in err["loc"])]),
             "message": err["msg"] + _closest_field(err, entry.args_model)}
            for err in exc.errors()
        ]) from exc


def _closest_field(err: Any, model: type[BaseModel]) -> str:
    if err["type"] != "extra_forbidden" or len(err["loc"]) != 1:
        return ""
    close = difflib.get_close_matches(str(err["loc"][0]), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def list_architectures() -> list[ArchInfo]:
    return [
        ArchInfo(
            name=entry.name,
            family=entry.family,
            task=entry.task,
            tasks=[entry.task, *entry.also],
            description=entry.description,
            args_schema=entry.args_model.model_json_schema(),
            defaults=entry.args_model().model_dump(),
        )
        for entry in sorted(ARCHITECTURES.values(), key=lambda e: (e.task, e.family, e.name))
    ]
