"""Hugging Face text classifiers: the teacher folder, the students, and the DistilBERT layer copy.

Models are built from `config.json` by transformers' auto classes and filled from safetensors
only (`use_safetensors=True`); `trust_remote_code` is never set, and the sniffer has already
refused folders with code or `auto_map`. Every model is wrapped in `TextClassifier`, whose
forward takes a `TokenBatch` and returns logits, so the trainer treats it like an image model.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcore.architectures import HFArgs, TextBiLSTMArgs
from kdcore.archive import check_zip, safe_member_path
from kdcore.errors import BadInputError, KDError, MismatchError
from kdcore.hf_sniff import HfInfo, sniff_hf_zip
from kdcore.text_data import TokenBatch


class TextClassifier(nn.Module):
    """A transformers sequence classifier behind the engine's model interface.

    With `capture_hidden` set, forward also keeps the hidden states of the last call (embeddings,
    then every layer) and its attention mask, which `kd_hidden` reads.
    """

    model: Any  # a transformers PreTrainedModel (its config and methods are not nn.Module's)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.capture_hidden = False
        self.hidden_states: tuple[torch.Tensor, ...] | None = None
        self.attention_mask: torch.Tensor | None = None
        self._takes_type_ids = "token_type_ids" in inspect.signature(model.forward).parameters

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        extra: dict[str, Any] = {}
        if self._takes_type_ids and batch.token_type_ids is not None:
            extra["token_type_ids"] = batch.token_type_ids
        output = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            output_hidden_states=self.capture_hidden, **extra)
        if self.capture_hidden:
            self.hidden_states, self.attention_mask = tuple(output.hidden_states), batch.attention_mask
        return output.logits

    @property
    def deployable(self) -> nn.Module:
        return self.model


class TextBiLSTM(nn.Module):
    """Tang et al. (2019): embeddings → BiLSTM → max over time → ReLU layer → logits."""

    def __init__(self, embeddings: torch.Tensor, args: TextBiLSTMArgs, num_classes: int, pad_id: int) -> None:
        super().__init__()
        vocab, dim = embeddings.shape
        self.embed = nn.Embedding(vocab, dim, padding_idx=pad_id)
        self.embed.weight.data.copy_(embeddings)
        self.embed.weight.requires_grad_(not args.freeze_embeddings)
        self.dropout = nn.Dropout(args.dropout)
        self.lstm = nn.LSTM(dim, args.hidden, num_layers=args.layers, batch_first=True, bidirectional=True,
                            dropout=args.dropout if args.layers > 1 else 0.0)
        width = 2 * args.hidden
        head: list[nn.Module] = [nn.Linear(width, args.mlp_hidden), nn.ReLU()] if args.mlp_hidden else []
        self.head = nn.Sequential(*head, nn.Dropout(args.dropout), nn.Linear(args.mlp_hidden or width, num_classes))

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        lengths = batch.attention_mask.sum(dim=1).clamp(min=1)
        embedded = self.dropout(self.embed(batch.input_ids))
        packed = nn.utils.rnn.pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        output, _ = self.lstm(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=batch.input_ids.shape[1])
        # Padding must never win the max: it is pushed to -inf before pooling.
        pad = batch.attention_mask[:, :, None] == 0
        pooled = states.masked_fill(pad, float("-inf")).max(dim=1).values
        return self.head(self.dropout(pooled))

    @property
    def deployable(self) -> nn.Module:
        return self


@dataclass
class HfFolder:
    """An unpacked, sniffed hf model folder."""

    path: Path
    info: HfInfo


def unpack_hf_zip(zip_path: Path, target: Path, *, field: str) -> HfFolder:
    """Check and unpack an hf zip (only the files it needs: no pickles) into `target`."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            info = sniff_hf_zip(zf, field=field)
            target.mkdir(parents=True, exist_ok=True)
            skip = set(info.ignored_files)
            for member in check_zip(zf):
                if member.is_dir() or not member.filename.startswith(info.root):
                    continue
                name = member.filename.removeprefix(info.root)
                if name in skip:
                    continue
                destination = safe_member_path(target, name)
                destination.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as source, destination.open("wb") as out:
                    while chunk := source.read(1024 * 1024):
                        out.write(chunk)
    except zipfile.BadZipFile as exc:
        raise BadInputError(f"not a zip archive: {exc}", field=field) from None
    return HfFolder(target, info)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers warns about every freshly initialised head; the engine reports that itself."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()  # a job's log is not a terminal: no "Loading weights" bars in it
    try:
        yield
    finally:
        logging.set_verbosity(previous)
        if bars:
            logging.enable_progress_bar()


def load_config(folder: HfFolder, *, field: str) -> Any:
    from transformers import AutoConfig

    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(str(folder.path), trust_remote_code=False, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise BadInputError(f"config.json cannot be read by transformers: {str(exc).splitlines()[0][:300]}",
                            field=field) from None


def load_tokenizer(folder: HfFolder, *, field: str) -> Any:
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(folder.path), trust_remote_code=False,
                                                      local_files_only=True)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise BadInputError(f"the tokenizer cannot be loaded: {str(exc).splitlines()[0][:300]}", field=field) from None
    if tokenizer.pad_token_id is None:
        # GPT-style vocabularies have no pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def check_classifier_family(config: Any, *, field: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise BadInputError(f"transformers has no sequence classifier for model_type {config.model_type!r}",
                            field=field)


def load_teacher_classifier(folder: HfFolder, class_names: list[str], *, field: str = "teacher.file") -> TextClassifier:
    """The teacher as a sequence classifier: its own head where it has one, else a new one sized to the data."""
    from transformers import AutoModelForSequenceClassification

    config = load_config(folder, field=field)
    check_classifier_family(config, field=field)
    labels: dict[str, Any] = {"num_labels": len(class_names), "id2label": dict(enumerate(class_names)),
              "label2id": {name: i for i, name in enumerate(class_names)}}
    try:
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder.path), trust_remote_code=False, use_safetensors=True, local_files_only=True,
                **({} if folder.info.has_classifier else labels))
    except (ValueError, OSError, RuntimeError) as exc:
        raise BadInputError(f"the weights do not load into {config.model_type}: {str(exc).splitlines()[0][:300]}",
                            field=field) from None
    if model.config.num_labels != len(class_names):
        raise MismatchError(f"the teacher has {model.config.num_labels} outputs, the data {len(class_names)} classes",
                            field="data.label_field")
    return TextClassifier(model)


# --- students --------------------------------------------------------------------------------------


@dataclass
class StudentPlan:
    """What the student is and what it took from the teacher, for the report."""

    model: nn.Module
    description: str
    shared_parameters: int = 0
    teacher_layers: list[int] | None = None


def encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer layers: the longest one, which is the stack in every encoder family."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise KDError("the model has no layer stack to copy", code="bad_input")
    return best


def evenly_spaced(teacher_layers: int, student_layers: int) -> list[int]:
    """DistilBERT keeps one layer out of two; in general the last of every equal share (6 → 3: 1, 3, 5)."""
    return [round((i + 1) * teacher_layers / student_layers) - 1 for i in range(student_layers)]


def student_parameters_on_meta(folder: HfFolder, arch: str | None, arch_args: dict[str, Any], *,
                               num_classes: int) -> int:
    """The parameters of the student a text job would build, counted on the meta device (nothing
    allocated): the hf student from the teacher's config and its overrides, or the BiLSTM over the
    teacher's embeddings. A 100-billion-parameter config costs milliseconds here, not the worker's memory."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        if arch == "text_bilstm":
            vocab, width = folder.info.vocab_size or 1, folder.info.hidden_size or 1
            model: nn.Module = TextBiLSTM(torch.empty(vocab, width), TextBiLSTMArgs.model_validate(arch_args),
                                          num_classes, pad_id=0)
        else:
            config = copy.deepcopy(load_config(folder, field="teacher.file"))
            for key, value in HFArgs.model_validate(arch_args).model_dump(exclude_none=True).items():
                setattr(config, key, value)
            config.num_labels = num_classes
            with _quiet_transformers():
                model = AutoModelForSequenceClassification.from_config(config)
    return sum(parameter.numel() for parameter in model.parameters())


def build_hf_student(teacher: TextClassifier, args: HFArgs, *, seed: int, init_from_teacher: bool,
                     teacher_layers: list[int] | None) -> StudentPlan:
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(teacher.model.config)
    for key, value in args.model_dump(exclude_none=True).items():
        setattr(config, key, value)
    if config.hidden_size % config.num_attention_heads:
        raise KDError(f"{config.num_attention_heads} heads do not divide hidden_size {config.hidden_size}: set "
                      "student.arch_args.num_attention_heads", field="student.arch_args", code="bad_input")
    teacher_depth = len(encoder_layers(teacher.model)[1])
    depth = config.num_hidden_layers
    layers = teacher_layers or evenly_spaced(teacher_depth, depth)
    if len(layers) != depth:
        raise KDError(f"names {len(layers)} teacher layers for a student of {depth}: give one per student layer",
                      field="student.teacher_layers", code="bad_input")
    if max(layers) >= teacher_depth:
        raise KDError(f"layer {max(layers)} does not exist: the teacher has layers 0-{teacher_depth - 1}",
                      field="student.teacher_layers", code="bad_input")
    torch.manual_seed(seed)
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_config(config)
    plan = StudentPlan(TextClassifier(model), f"{config.model_type}, {depth} layers x {config.hidden_size}",
                       teacher_layers=layers)
    if init_from_teacher:
        plan.shared_parameters = copy_teacher_layers(teacher.model, model, layers)
    return plan


def copy_teacher_layers(teacher: nn.Module, student: nn.Module, layers: list[int]) -> int:
    """Copy embeddings, heads and teacher layer `layers[i]` into student layer i, where shapes match.

    Returns the number of parameters copied (0 where the widths differ throughout).
    """
    prefix, _ = encoder_layers(teacher)
    # Keyed by the student's layer, so one teacher layer may seed several student layers.
    sources = {f"{prefix}.{student}.": f"{prefix}.{teacher_index}." for student, teacher_index in enumerate(layers)}
    teacher_state = teacher.state_dict()
    copied = 0
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            source = _teacher_name(name, prefix, sources)
            if source is None or source not in teacher_state or teacher_state[source].shape != tensor.shape:
                continue
            tensor.copy_(_whole(teacher_state[source]))
            copied += tensor.numel()
    return copied


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A teacher fine-tuned under fsdp holds shards (DTensors): gather the whole tensor to copy it.

    A collective, but every rank builds the student the same way, so they gather the same tensors in turn.
    """
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _teacher_name(name: str, prefix: str, sources: dict[str, str]) -> str | None:
    if not name.startswith(f"{prefix}."):
        return name
    for student_prefix, teacher_prefix in sources.items():
        if name.startswith(student_prefix):
            return teacher_prefix + name.removeprefix(student_prefix)
    return None  # a student layer beyond the map: it stays as initialised


def load_pretrained_student(folder: HfFolder, teacher_tokenizer: Any, class_names: list[str]) -> StudentPlan:
    """A pretrained student of the same tokenizer; its head is replaced where it has another size."""
    from transformers import AutoModelForSequenceClassification

    field = "student.file"
    check_same_tokenizer(teacher_tokenizer, load_tokenizer(folder, field=field), field=field)
    config = load_config(folder, field=field)
    check_classifier_family(config, field=field)
    try:
        with _quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(
                str(folder.path), trust_remote_code=False, use_safetensors=True, local_files_only=True,
                num_labels=len(class_names), id2label=dict(enumerate(class_names)),
                label2id={name: i for i, name in enumerate(class_names)}, ignore_mismatched_sizes=True)
    except (ValueError, OSError, RuntimeError) as exc:
        raise BadInputError(f"the student's weights do not load: {str(exc).splitlines()[0][:300]}",
                            field=field) from None
    depth = len(encoder_layers(model)[1])
    return StudentPlan(TextClassifier(model), f"pretrained {config.model_type}, {depth} layers x "
                       f"{config.hidden_size}")


def check_same_tokenizer(teacher: Any, student: Any, *, field: str) -> None:
    """One vocabulary for both, or the soft targets would compare different tokens."""
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    if teacher_vocab == student_vocab:
        return
    differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda item: item[1])[:3]
    listed = ", ".join(f"{token!r} (id {index})" for token, index in differing)
    raise MismatchError(f"the student's tokenizer differs from the teacher's ({len(teacher_vocab)} against "
                        f"{len(student_vocab)} tokens; first differences: {listed}; by id: "
                        f"{'; '.join(first_differing_ids(teacher_vocab, student_vocab))}): both must share one "
                        "tokenizer", field=field)


def first_differing_ids(teacher_vocab: dict[str, int], student_vocab: dict[str, int], count: int = 3) -> list[str]:
    """The lowest ids whose token differs, each side's token named (None where a side has no such id)."""
    teacher_tokens = {index: token for token, index in teacher_vocab.items()}
    student_tokens = {index: token for token, index in student_vocab.items()}
    differing = [index for index in sorted(set(teacher_tokens) | set(student_tokens))
                 if teacher_tokens.get(index) != student_tokens.get(index)][:count]
    return [f"id {index} is {teacher_tokens.get(index)!r} for the teacher, {student_tokens.get(index)!r} for the "
            "student" for index in differing]


def build_text_bilstm(teacher: TextClassifier, args: TextBiLSTMArgs, *, num_classes: int, pad_id: int,
                      seed: int) -> StudentPlan:
    torch.manual_seed(seed)
    embeddings = teacher.model.get_input_embeddings().weight.detach().float().cpu()
    model = TextBiLSTM(embeddings, args, num_classes, pad_id)
    description = f"BiLSTM {args.layers} x {args.hidden} over the teacher's {embeddings.shape[1]}-wide embeddings"
    return StudentPlan(model, description, shared_parameters=embeddings.numel())


def deployable(model: nn.Module) -> nn.Module:
    """The part of a wrapped model that ships (no distillation-only projections)."""
    inner = getattr(model, "deployable", None)
    return inner if isinstance(inner, nn.Module) else model
