"""The job spec: one pydantic model shared by the API, the database, the worker and the engine.

Field names follow ARCHITECTURE.md. Every model forbids unknown keys so that a typo
(`temprature`) is an error naming the field rather than a silently ignored setting.
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from kdcore.architectures import ARCHITECTURES, SpecError, unknown_architecture, validate_arch_args
from kdcore.tune_space import apply_settings, check_path

TeacherFormat = Literal["auto", "torchscript", "exported", "safetensors", "onnx", "state_dict", "hf"]
ExportFormat = Literal["safetensors", "torchscript", "onnx", "hf"]
Task = Literal["auto", "image_classification", "text_classification", "causal_lm"]
ResolvedTask = Literal["image_classification", "text_classification", "causal_lm"]
IMAGE_EXPORTS: list[ExportFormat] = ["safetensors", "torchscript", "onnx"]
TEXT_EXPORTS: list[ExportFormat] = ["hf", "safetensors", "onnx"]
LM_EXPORTS: list[ExportFormat] = ["hf", "safetensors"]
Augment = Literal["none", "flip_crop", "shift"]
Precision = Literal["fp32", "bf16", "fp16"]
MAX_SPEC_BYTES = 1_000_000

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d{1,2})$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherSpec(_Strict):
    file: str = Field(min_length=1, max_length=4096, description="File id (service) or local path (CLI).")
    format: TeacherFormat = Field(
        default="auto",
        description="How the teacher is stored; auto sniffs it. hf: a .zip of a Hugging Face model folder.",
    )
    arch: str | None = Field(
        default=None, validate_default=True, description="Registry architecture; needed for safetensors/state_dict."
    )
    arch_args: dict[str, Any] = Field(default_factory=dict, validate_default=True, description="Arguments of `arch`.")

    @field_validator("arch")
    @classmethod
    def _arch_known_and_needed(cls, arch: str | None, info: ValidationInfo) -> str | None:
        if arch is not None:
            _check_arch_name(arch)
            if ARCHITECTURES[arch].task != "image_classification":
                raise ValueError(f"{arch!r} is a student architecture; an hf teacher needs no arch (format hf)")
        elif info.data.get("format") in ("safetensors", "state_dict"):
            raise ValueError(f"format {info.data['format']!r} holds weights only: name the registry architecture")
        return arch

    @field_validator("arch_args")
    @classmethod
    def _args_fit_arch(cls, arch_args: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _check_arch_args(info.data.get("arch"), arch_args)


class StudentSpec(_Strict):
    arch: str | None = Field(
        default=None, description="Registry architecture of the student; default mlp for images, hf for text."
    )
    arch_args: dict[str, Any] = Field(default_factory=dict, validate_default=True, description="Arguments of `arch`.")
    init_from_teacher: bool = Field(
        default=False,
        description="Parameter sharing: copy every teacher tensor whose name and shape match; for hf students the "
        "embeddings, heads and the layers named by teacher_layers (the default for text jobs).",
    )
    file: str | None = Field(
        default=None, min_length=1, max_length=4096,
        description="Text jobs: a pretrained student to start from (an hf .zip with the teacher's tokenizer).",
    )
    teacher_layers: list[int] | None = Field(
        default=None, min_length=1, max_length=128,
        description="hf students: the teacher layers (0-based) that initialise the student's, one per student layer; "
        "default evenly spaced (DistilBERT's one layer out of two).",
    )

    @field_validator("teacher_layers")
    @classmethod
    def _layers_ordered(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and any(layer < 0 for layer in layers):
            raise ValueError("layer indices start at 0")
        return layers

    @field_validator("arch")
    @classmethod
    def _arch_known(cls, arch: str | None) -> str | None:
        return arch if arch is None else _check_arch_name(arch)

    @field_validator("arch_args")
    @classmethod
    def _args_fit_arch(cls, arch_args: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _check_arch_args(info.data.get("arch"), arch_args)


class NormalizeSpec(_Strict):
    mean: list[float] = Field(default=[0.0], min_length=1, description="Per-channel mean (or one for all).")
    std: list[float] = Field(default=[1.0], min_length=1, description="Per-channel std (or one for all).")

    @field_validator("std")
    @classmethod
    def _std_positive(cls, std: list[float]) -> list[float]:
        if any(value <= 0 for value in std):
            raise ValueError("every std must be > 0")
        return std


class DataSpec(_Strict):
    train: str = Field(
        min_length=1, max_length=4096,
        description="Training data: .npz or ImageFolder .zip; text: .jsonl, .csv or .tsv.",
    )
    test: str | None = Field(default=None, description="Separate test set; else the npz test split.")
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0, description="Share of train held out for validation.")
    normalize: NormalizeSpec = Field(default_factory=NormalizeSpec, description="Applied after uint8 → [0, 1].")
    augment: Augment = Field(
        default="none", description="Random augmentation; none (and no mixup) lets teacher logits be cached."
    )
    mixup: float = Field(
        default=0.0,
        ge=0.0,
        le=100.0,
        description="Blend pairs of training samples and their labels, weight ~ Beta(m, m); 0 = off. "
        "The teacher then runs live on the blends (function matching); 0.2-1 are usual.",
    )
    image_size: int | None = Field(default=None, ge=4, le=1024, description="Resize ImageFolder images to this.")
    text_field: str = Field(default="text", min_length=1, max_length=200, description="Text jobs: the text column.")
    text_pair_field: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="Text jobs: a second text column, for sentence pairs (NLI, paraphrase).",
    )
    label_field: str = Field(
        default="label", min_length=1, max_length=200, description="Text jobs: the label column (names or integers)."
    )
    max_length: int = Field(
        default=128, ge=4, le=8192,
        description="Text jobs: tokens per example, longer texts are truncated; causal_lm: the block length "
        "documents are packed into (default 256).",
    )
    prompt_field: str = Field(
        default="prompt", min_length=1, max_length=200,
        description="causal_lm: the prompt column; with completion_field the loss is on the completion only, "
        "alone (prompt-only rows) it is valid for seq_kd, whose teacher writes the answers.",
    )
    completion_field: str = Field(
        default="completion", min_length=1, max_length=200, description="causal_lm: the answer to a prompt."
    )
    messages_field: str = Field(
        default="messages", min_length=1, max_length=200,
        description="causal_lm: a chat as [{role, content}, ...], rendered by the tokenizer's chat template; the "
        "loss is on the assistant turns only.",
    )


class MethodSpec(_Strict):
    name: Literal["kd", "kd_hidden", "seq_kd"] = Field(
        default="kd",
        description="kd: Hinton soft targets on the logits; kd_hidden (hf students): plus the hidden states of the "
        "layers of student.teacher_layers matched by cosine (DistilBERT), projected where widths differ; seq_kd "
        "(causal_lm): the teacher writes answers to the prompts and the student learns them (Kim & Rush 2016).",
    )
    temperature: float = Field(default=4.0, gt=0, le=1000, description="Softmax temperature T (> 0); causal_lm: 1.")
    alpha: float = Field(default=0.9, ge=0.0, le=1.0, description="Weight of the soft term; 1 = labels unused.")
    hidden_weight: float = Field(default=1.0, ge=0.0, le=1000.0, description="kd_hidden: weight of the hidden term.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        default="forward_kl",
        description="causal_lm kd: the soft term per token; forward_kl KL(teacher || student) covers every mode "
        "of the teacher, reverse_kl KL(student || teacher) seeks one (MiniLLM), jsd mixes both with beta.",
    )
    beta: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="causal_lm jsd: the teacher's weight in the mixture m = beta*p_teacher + (1-beta)*p_student.",
    )
    top_k: int = Field(
        default=0, ge=0, le=4096,
        description="causal_lm kd: cache and match only the teacher's top-k tokens per position, the rest as one "
        "tail bucket (0 = the full vocabulary, the teacher run live).",
    )
    max_new_tokens: int = Field(
        default=128, ge=1, le=8192, description="seq_kd: the longest answer the teacher writes, in tokens."
    )
    sampling: Literal["greedy", "sample"] = Field(
        default="greedy", description="seq_kd: the teacher's decoding; sample draws at temperature 1 (seeded)."
    )


class StagesSpec(_Strict):
    teacher_finetune_epochs: int = Field(default=0, ge=0, le=10000, description="Adapt the teacher first.")
    distill_epochs: int = Field(default=10, ge=0, le=10000, description="Knowledge transfer epochs.")
    finetune_epochs: int = Field(
        default=0, ge=0, le=10000, validate_default=True, description="Hard-label fine-tune of the student."
    )
    baseline: bool = Field(
        default=True,
        description="Also train the same student without a teacher, same epochs and seed, so the report can show "
        "what distillation bought (with a 95% interval). Costs the student's training time once more; "
        "turn off for a quicker job.",
    )
    teacher_check: Literal["fail", "warn", "off"] = Field(
        default="fail",
        description="Before any training, score the teacher on the validation split; near chance it fails the job "
        "(warn: only reports it) with what it tried: the data's own normalisation, swapped colour channels, "
        "another label order (text jobs: the label order only). Warns only when an image teacher is fine-tuned "
        "first; a text teacher fine-tuned first is not checked.",
    )
    select: Literal["best_val", "last"] = Field(
        default="best_val",
        description="Which weights of the student (and baseline) ship: those of the epoch with the best validation "
        "accuracy, so a late collapse does not ship, or the last epoch's. best_val needs val_fraction > 0 "
        "(else last).",
    )

    @field_validator("finetune_epochs")
    @classmethod
    def _student_is_trained(cls, finetune_epochs: int, info: ValidationInfo) -> int:
        if finetune_epochs == 0 and info.data.get("distill_epochs") == 0:
            raise ValueError("the student needs at least one training stage: distill_epochs or finetune_epochs > 0")
        return finetune_epochs

    @property
    def student_epochs(self) -> int:
        return self.distill_epochs + self.finetune_epochs


class OptimSpec(_Strict):
    name: Literal["adamw", "adam", "sgd"] = Field(default="adamw", description="Optimiser.")
    # 3e-3: measured on the docs' first jobs (docs/choosing-t-and-alpha.md); 1e-3 left a student that
    # distils in 10 epochs short of its baseline. Text and LM jobs have their own (_TEXT_OPTIM, _LM_OPTIM).
    lr: float = Field(default=3e-3, gt=0, le=10, description="Peak learning rate (image jobs; text: 5e-5).")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="Weight decay.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD momentum.")
    schedule: Literal["cosine", "constant", "linear"] = Field(default="cosine", description="LR schedule per stage.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps at the start of each stage.")
    warmup_ratio: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Warm-up as a share of each stage's steps, where warmup_steps is 0."
    )
    teacher_lr: float | None = Field(default=None, gt=0, le=10, description="LR of the teacher fine-tune; lr/10.")
    grad_clip: float | None = Field(default=None, gt=0, description="Clip the gradient norm to this.")
    max_norm: float | None = Field(
        default=None,
        gt=0,
        description="Max-norm constraint: after each step, cap every unit's incoming weight vector at this L2 norm.",
    )


class TuneRange(_Strict):
    """A numeric range to search: integers when low and high are integers (and no log scale of floats)."""

    low: float = Field(description="Smallest value.")
    high: float = Field(description="Largest value.")
    log: bool = Field(default=False, description="Sample on a log scale (learning rates).")
    step: float | None = Field(default=None, gt=0, description="Only multiples of this above low.")
    integer: bool = Field(default=False, description="Whole numbers only (set by itself when low and high are).")

    @model_validator(mode="before")
    @classmethod
    def _integers_stay_integers(cls, data: Any) -> Any:
        if isinstance(data, dict) and "integer" not in data:
            low, high, step = data.get("low"), data.get("high"), data.get("step")
            whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high))
            data = {**data, "integer": whole and (step is None or float(step).is_integer())}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> TuneRange:
        if self.high < self.low:
            raise ValueError("high must be at least low")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


class DistributedSpec(_Strict):
    """One job on several processes of one node (torch.distributed): GPUs, or gloo processes on a CPU."""

    nproc: int = Field(default=1, ge=1, le=64, description="Processes: one per GPU on a GPU node; on a CPU, "
                       "gloo processes sharing its cores.")
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="ddp: every rank holds the whole student (any job: image, text, causal LM); "
        "fsdp: hf students of text classification and causal-LM jobs sharded across the ranks (FSDP2, one unit "
        "per transformer layer), checkpoints through torch.distributed.checkpoint, resumable on any nproc."
    )
    timeout_s: float = Field(default=300.0, ge=10, le=86400, description="A collective waiting longer fails the "
                             "job: a stuck rank is a clear error, never a hang.")
    max_restarts: int = Field(default=1, ge=0, le=10, description="When a rank dies the group restarts from the "
                              "last checkpoint, this many times (all within one attempt).")
    replicate_teacher_mb: float = Field(default=2048.0, ge=0, le=10_000_000, description="fsdp: a frozen teacher "
                                        "whose weights take more than this in bf16 (2 bytes a parameter) is sharded "
                                        "like the student; a smaller one is replicated on every rank (no gather per "
                                        "step). 0 always shards it.")


class TuneObjective(_Strict):
    """A deployment budget: only students within it may win; the most accurate of those does."""

    max_latency_ms: float | None = Field(default=None, gt=0, description="CPU latency at batch 1, as measured.")
    max_params: int | None = Field(default=None, ge=1, description="Parameters of the student.")

    @model_validator(mode="after")
    def _some_budget(self) -> TuneObjective:
        if self.max_latency_ms is None and self.max_params is None:
            raise ValueError("name max_latency_ms or max_params (or leave objective out)")
        return self


class TuneSpec(_Strict):
    """Search the distillation's own settings on child jobs first, then run the full job with the best."""

    trials: int = Field(default=8, ge=1, le=200, description="Child jobs on the queue, each one setting of the space.")
    space: dict[str, list[Any] | TuneRange] = Field(
        min_length=1,
        description="Dotted spec path -> choices [a, b, ...] or a range {low, high, log, step}; "
        "e.g. method.temperature, method.alpha, method.name, student.arch_args.<arg>, optim.lr.",
    )
    budget: float = Field(default=0.25, gt=0, le=1, description="Each trial's epochs as a share of the full run's.")
    metric: Literal["val_accuracy", "val_loss"] = Field(
        default="val_accuracy", description="Chosen on the validation split, never the test split."
    )
    sampler: Literal["auto", "tpe", "grid"] = Field(
        default="auto", description="Optuna's TPE, or every combination of the choices; auto: grid when it fits."
    )
    parallel: int = Field(default=4, ge=1, le=64, description="At most this many trials queued or running at once.")
    prune: bool = Field(default=True, description="Stop hopeless trials at epoch boundaries (median rule).")
    objective: TuneObjective | None = Field(default=None, description="A latency or size budget for the student.")

    @field_validator("space", mode="before")
    @classmethod
    def _entries_parse(cls, space: Any) -> Any:
        # One entry at a time, so an error names its path rather than both arms of the union.
        if not isinstance(space, dict):
            return space
        parsed: dict[str, Any] = {}
        for path, values in space.items():
            field = f"tune.space.{path}"
            if isinstance(values, list | TuneRange):
                parsed[path] = values
            elif isinstance(values, dict):
                try:
                    parsed[path] = TuneRange.model_validate(values)
                except ValidationError as exc:
                    message = "; ".join(e["message"] for e in validation_errors(exc))
                    raise PydanticCustomError("tune_space", "{message}", {"field": field, "message": message}) from None
            else:
                raise PydanticCustomError("tune_space", "{message}", {
                    "field": field, "message": "must be a list of choices or a range {low, high, log, step}"})
        return parsed

    @field_validator("space")
    @classmethod
    def _choices_usable(cls, space: dict[str, list[Any] | TuneRange]) -> dict[str, list[Any] | TuneRange]:
        for path, values in space.items():
            if isinstance(values, list) and not values:
                raise PydanticCustomError("tune_space", "{message}", {"field": f"tune.space.{path}",
                                                                      "message": "needs at least one choice"})
        return space

    def grid_size(self) -> int | None:
        """Combinations of the choices, or None when a range makes the space continuous."""
        size = 1
        for values in self.space.values():
            if not isinstance(values, list):
                return None
            size *= len(values)
        return size


class JobSpec(_Strict):
    name: str | None = Field(default=None, max_length=200, description="Optional label.")
    task: Task = Field(
        default="auto", description="auto (from the teacher: an hf encoder → text_classification, an hf "
        "...ForCausalLM → causal_lm) or the task itself."
    )
    teacher: TeacherSpec
    student: StudentSpec = Field(default_factory=StudentSpec)
    data: DataSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    stages: StagesSpec = Field(default_factory=StagesSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    batch_size: int = Field(default=128, ge=1, le=65536, description="Training batch size.")
    eval_batch_size: int = Field(default=1024, ge=1, le=65536, description="Batch size for teacher and eval passes.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed for splits, init and shuffling.")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    precision: Precision = Field(default="fp32", description="Autocast precision for training.")
    gradient_checkpointing: bool = Field(
        default=False, description="causal_lm: recompute the student's layers in backward; less memory, ~30% slower."
    )
    threads: int | None = Field(default=None, ge=1, le=512, description="torch threads; default: the machine's.")
    export: list[ExportFormat] = Field(
        default=IMAGE_EXPORTS, description="Student exports; text jobs default to hf, safetensors and onnx."
    )
    quantize: Literal["none", "dynamic_int8"] = Field(default="none", description="Post-training quantisation.")
    tune: TuneSpec | None = Field(default=None, description="Search T, alpha, student size, ... on child jobs first.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="One job on several processes of one node (torch.distributed)."
    )

    @field_validator("device")
    @classmethod
    def _device_known(cls, device: str) -> str:
        if not _DEVICE_PATTERN.match(device):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return device

    @field_validator("export")
    @classmethod
    def _export_unique(cls, export: list[str]) -> list[str]:
        return list(dict.fromkeys(export))

    @model_validator(mode="after")
    def _batch_fits_group(self) -> JobSpec:
        # batch_size is the global batch: every rank needs a share of it.
        if self.batch_size < self.distributed.nproc:
            raise PydanticCustomError("distributed", "{message}", {
                "field": "batch_size", "message": f"the global batch ({self.batch_size}) is smaller than "
                f"distributed.nproc ({self.distributed.nproc}): every process needs at least one sample"})
        return self

    @model_validator(mode="after")
    def _tune_space_fits(self) -> JobSpec:
        if self.tune is None:
            return self
        if self.data.val_fraction == 0:
            raise PydanticCustomError("tune_space", "{message}", {
                "field": "data.val_fraction",
                "message": "a search chooses on the validation split: set val_fraction > 0 (never the test split)"})
        base = self.model_dump(mode="json", exclude={"tune"})
        for path, values in self.tune.space.items():
            field = f"tune.space.{path}"
            if (reason := check_path(JobSpec, path)) is not None:
                raise PydanticCustomError("tune_space", "{message}", {"field": field, "message": f"{path} {reason}"})
            candidates = values if isinstance(values, list) else [_range_value(values, values.low),
                                                                  _range_value(values, values.high)]
            for value in candidates:
                try:
                    JobSpec.model_validate(apply_settings(base, {path: value}))
                except ValidationError as exc:
                    reason = "; ".join(e["message"] for e in validation_errors(exc))
                    raise PydanticCustomError("tune_space", "{message}", {
                        "field": field, "message": f"{value!r} does not fit {path}: {reason}"}) from None
        return self


def for_task(spec: JobSpec, task: ResolvedTask) -> JobSpec:
    """The spec with the task's own defaults where the user left a field unset; the task then fixed.

    Text jobs default to an hf student initialised from the teacher and hf exports; an image
    architecture or export given explicitly for text (or the reverse) is an error naming the field,
    as is a field of another task (kd_hidden or a label column for causal_lm, a divergence for images).
    """
    if task == "causal_lm":
        return _for_causal_lm(spec)
    resolved = spec.model_copy(deep=True, update={"task": task})
    student = resolved.student
    if student.arch is None:
        student.arch = "hf" if task == "text_classification" else "mlp"
        try:
            _check_arch_args(student.arch, student.arch_args)
        except ValueError as exc:
            raise SpecError([{"field": "student.arch_args", "message": str(exc)}]) from None
    if task == "text_classification":
        _text_defaults(spec, resolved)
    errors = _lm_only_fields(spec)
    if ARCHITECTURES[student.arch].task != task:
        same = ", ".join(name for name, entry in sorted(ARCHITECTURES.items()) if entry.task == task)
        errors.append({"field": "student.arch", "message": f"{student.arch!r} is not a {task} architecture; use one "
                       f"of: {same}"})
    if task == "text_classification" and "torchscript" in resolved.export:
        errors.append({"field": "export",
                       "message": "text students export as hf, safetensors or onnx, not torchscript"})
    if task == "image_classification":
        if "hf" in resolved.export:
            errors.append({"field": "export", "message": "hf exports are for text students"})
        if student.file is not None or student.teacher_layers is not None:
            field = "student.file" if student.file is not None else "student.teacher_layers"
            errors.append({"field": field, "message": "only text jobs (hf students) take this"})
        if spec.method.name == "kd_hidden":
            errors.append({"field": "method.name", "message": "kd_hidden matches transformer layers: text jobs only"})
    if task == "text_classification" and student.arch != "hf" and "hf" in resolved.export:
        errors.append({"field": "export", "message": f"a {student.arch} student has no Hugging Face folder to "
                       "export; use safetensors or onnx"})
    if student.arch != "hf" and spec.method.name == "kd_hidden":
        errors.append({"field": "method.name", "message": "kd_hidden needs an hf student (student.arch: hf)"})
    if errors:
        raise SpecError(errors)
    return resolved


# Settings that only a causal_lm job reads; elsewhere a value set for them is an error, not ignored.
_LM_METHOD_FIELDS = ("divergence", "beta", "top_k", "max_new_tokens", "sampling")
_LM_DATA_FIELDS = ("prompt_field", "completion_field", "messages_field")


def _differs_from_default(model: BaseModel, name: str) -> bool:
    return bool(getattr(model, name) != type(model).model_fields[name].get_default(call_default_factory=True))


def _lm_only_fields(spec: JobSpec) -> list[dict[str, str]]:
    # Compared with the defaults, not by "was it set": a stored spec (the service keeps the resolved
    # one) names every field, and an image job's stored defaults are no error.
    errors = [{"field": f"method.{name}", "message": "only causal_lm jobs take this"}
              for name in _LM_METHOD_FIELDS if _differs_from_default(spec.method, name)]
    errors += [{"field": f"data.{name}", "message": "only causal_lm jobs take this"}
               for name in _LM_DATA_FIELDS if _differs_from_default(spec.data, name)]
    if spec.method.name == "seq_kd":
        errors.append({"field": "method.name", "message": "seq_kd (teacher-written answers) is for causal_lm jobs"})
    if spec.gradient_checkpointing:
        errors.append({"field": "gradient_checkpointing", "message": "only causal_lm jobs take this"})
    return errors


# Fields of the other tasks a causal_lm job would silently ignore; each is refused by name instead.
_NOT_LM_DATA = {
    "label_field": "a language model's labels are the next tokens",
    "text_pair_field": "sentence pairs are for text classification",
    "normalize": "image jobs only", "augment": "image jobs only", "mixup": "image jobs only",
    "image_size": "image jobs only",
}
# Language-model settings (Chinchilla-era small-model pretraining and TRL's SFT/GKD defaults, scaled down).
_LM_OPTIM = {"lr": 5e-4, "teacher_lr": 1e-4, "weight_decay": 0.01, "schedule": "cosine", "warmup_ratio": 0.05}
_LM_JOB = {"batch_size": 8, "eval_batch_size": 16}


def _for_causal_lm(spec: JobSpec) -> JobSpec:
    """causal_lm: an hf student (the teacher's family, or student.file) sharing the teacher's tokenizer."""
    resolved = spec.model_copy(deep=True, update={"task": "causal_lm"})
    student, method = resolved.student, resolved.method
    errors = [{"field": f"data.{name}", "message": f"causal_lm does not take this: {why}"}
              for name, why in _NOT_LM_DATA.items() if _differs_from_default(spec.data, name)]
    if student.arch is None:
        student.arch = "hf"
        try:
            _check_arch_args(student.arch, student.arch_args)
        except ValueError as exc:
            errors.append({"field": "student.arch_args", "message": str(exc)})
    if spec.precision == "fp16":
        errors.append({"field": "precision", "message": "causal_lm trains in fp32 or bf16 (fp16 needs loss scaling "
                       "a token-level loss does not get here): use bf16"})
    if student.arch != "hf":
        errors.append({"field": "student.arch", "message": f"{student.arch!r} is not a causal_lm student; use hf "
                       "(the teacher's family with arch_args) or student.file"})
    if method.name == "kd_hidden":
        errors.append({"field": "method.name", "message": "causal_lm methods are kd (logits) and seq_kd"})
    if method.name == "seq_kd" and method.top_k:
        errors.append({"field": "method.top_k", "message": "seq_kd trains on the teacher's answers, not its "
                       "logits: leave top_k at 0"})
    if _differs_from_default(spec.method, "hidden_weight"):
        errors.append({"field": "method.hidden_weight", "message": "kd_hidden only; causal_lm does not take this"})
    other_exports = [fmt for fmt in spec.export if fmt not in LM_EXPORTS] if "export" in spec.model_fields_set else []
    if other_exports:
        errors.append({"field": "export", "message": f"causal_lm students export as hf and safetensors, not "
                       f"{', '.join(other_exports)}"})
    if spec.quantize != "none":
        errors.append({"field": "quantize", "message": "causal_lm students are not quantised here yet"})
    if errors:
        raise SpecError(errors)
    if "init_from_teacher" not in spec.student.model_fields_set:
        student.init_from_teacher = True
    if "export" not in spec.model_fields_set:
        resolved.export = list(LM_EXPORTS)
    if "max_length" not in spec.data.model_fields_set:
        resolved.data.max_length = 256
    if "temperature" not in spec.method.model_fields_set:
        method.temperature = 1.0  # the next-token distribution as the teacher samples it
    for key, value in _LM_OPTIM.items():
        if key not in spec.optim.model_fields_set:
            setattr(resolved.optim, key, value)
    for key, value in _LM_JOB.items():
        if key not in spec.model_fields_set:
            setattr(resolved, key, value)
    if "distill_epochs" not in spec.stages.model_fields_set:
        resolved.stages.distill_epochs = 1
    return resolved


# Fine-tuning settings of BERT-family models (Devlin et al.; the figures in ../shared/data/text/README.md).
_TEXT_OPTIM = {"lr": 5e-5, "teacher_lr": 5e-5, "weight_decay": 0.01, "schedule": "linear", "warmup_ratio": 0.1}
_TEXT_JOB = {"batch_size": 32, "eval_batch_size": 256}


def _text_defaults(spec: JobSpec, resolved: JobSpec) -> None:
    """Fill what a text job's user left unset: an hf student copied from the teacher, BERT fine-tuning settings."""
    student = resolved.student
    if "init_from_teacher" not in spec.student.model_fields_set:
        student.init_from_teacher = True
    if "export" not in spec.model_fields_set:
        resolved.export = list(TEXT_EXPORTS) if student.arch == "hf" else ["safetensors", "onnx"]
    for key, value in _TEXT_OPTIM.items():
        if key not in spec.optim.model_fields_set:
            setattr(resolved.optim, key, value)
    for key, value in _TEXT_JOB.items():
        if key not in spec.model_fields_set:
            setattr(resolved, key, value)
    if "distill_epochs" not in spec.stages.model_fields_set:
        resolved.stages.distill_epochs = 3


def _check_arch_name(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise ValueError(unknown_architecture(arch))
    return arch


def _check_arch_args(arch: str | None, arch_args: dict[str, Any]) -> dict[str, Any]:
    """Validate against the architecture's argument model; an unknown arch is reported on `arch` alone."""
    if arch is None or arch not in ARCHITECTURES:
        return arch_args
    try:
        validate_arch_args(arch, arch_args, field="")
    except SpecError as exc:
        raise ValueError("; ".join(f"{e['field'].lstrip('.')}: {e['message']}" for e in exc.errors)) from None
    return arch_args


def _range_value(values: TuneRange, bound: float) -> float | int:
    return int(bound) if values.integer else bound


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Flatten pydantic's errors into {field, message} with dotted field paths."""
    errors = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "spec"
        # A check over several fields names the one at fault itself (tune.space.<path>).
        field = str((err.get("ctx") or {}).get("field", field))
        message = err["msg"].removeprefix("Value error, ") + _did_you_mean(err)
        errors.append({"field": field, "message": message})
    return errors


def _did_you_mean(err: Any) -> str:
    """'; did you mean ...?' for a misspelt field name or choice, else nothing (difflib's close matches)."""
    if err["type"] == "extra_forbidden":
        model = _model_at(err["loc"][:-1])
        typed, known = str(err["loc"][-1]), list(model.model_fields) if model is not None else []
    elif err["type"] == "literal_error":
        typed, known = str(err.get("input")), re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected")))
    else:
        return ""
    close = difflib.get_close_matches(typed, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The spec model that holds the fields at `loc` (a path of field names), or None past a list or dict."""
    model: type[BaseModel] = JobSpec
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        nested = [arg for arg in (field.annotation, *get_args(field.annotation))
                  if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def parse_spec(data: Any) -> JobSpec:
    """Validate a decoded spec; raise SpecError naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError([{"field": "spec", "message": "must be a mapping of fields"}])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_errors(exc)) from None


def load_spec(path: str | Path) -> JobSpec:
    """Read a spec from a YAML or JSON file (YAML is a superset, but JSON errors read better)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError([{"field": "spec", "message": f"file larger than {MAX_SPEC_BYTES} bytes"}])
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([{"field": "spec", "message": f"cannot read {path}: {exc.strerror}"}]) from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        kind = path.suffix.lstrip(".") or "YAML"
        raise SpecError([{"field": "spec", "message": f"not valid {kind}: {exc}"}]) from None
    return parse_spec(data)


def resolve_local_paths(spec: JobSpec, base: Path) -> JobSpec:
    """Make the spec's relative file paths relative to the spec file's folder (the CLI's convention)."""
    def resolve(value: str | None) -> str | None:
        if value is None:
            return None
        candidate = Path(value).expanduser()
        return str(candidate if candidate.is_absolute() else (base / candidate).resolve())

    update = spec.model_copy(deep=True)
    update.teacher.file = resolve(spec.teacher.file) or spec.teacher.file
    update.data.train = resolve(spec.data.train) or spec.data.train
    update.data.test = resolve(spec.data.test)
    update.student.file = resolve(spec.student.file)
    return update
