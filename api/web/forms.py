"""The new-job form, generated from the job spec's own schema.

Every field of `kdcore.spec.JobSpec` becomes a form control (its default, bounds and one-line
help come from the spec's field descriptions), so a field added to the spec appears in the form
without touching this module: the layout below only orders the known ones into groups, and an
unplaced field lands in "More settings". The student's and teacher's architecture arguments are
generated the same way from each registry entry's `args_schema`.

A submitted form becomes a spec dict (`to_spec`) that is validated by the same `parse_spec` the
API uses; each error is mapped back to the control it concerns (`validate`), and the typed
values are kept as they were (`FormValues`) so a re-rendered form loses nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from starlette.datastructures import FormData

from kdcore.architectures import ARCHITECTURES, ArchInfo, list_architectures, validate_arch_args
from kdcore.errors import SpecError
from kdcore.spec import JobSpec, ResolvedTask, for_task, parse_spec

FieldKind = Literal["text", "number", "select", "checkbox", "checks", "list", "file", "arch", "json"]
FormValue = str | bool | list[str]
FormValues = dict[str, FormValue]

FILE_FIELDS = {"teacher.file": "teacher", "data.train": "dataset", "data.test": "dataset", "student.file": "teacher"}
ARCH_OWNERS = ("teacher", "student")

LABELS = {
    "name": "Job name",
    "task": "Task",
    "student.file": "Pretrained student",
    "student.teacher_layers": "Teacher layers to copy",
    "data.text_field": "Text column",
    "data.text_pair_field": "Second text column",
    "data.label_field": "Label column",
    "data.max_length": "Max length (tokens)",
    "method.hidden_weight": "Hidden-state weight",
    "method.divergence": "Divergence",
    "method.top_k": "Teacher top-k",
    "method.beta": "JSD beta",
    "method.max_new_tokens": "Teacher answer length (tokens)",
    "method.sampling": "Teacher answers by",
    "data.prompt_field": "Prompt field",
    "data.completion_field": "Completion field",
    "data.messages_field": "Messages field",
    "gradient_checkpointing": "Gradient checkpointing",
    "optim.warmup_ratio": "Warm-up share",
    "teacher.file": "Teacher checkpoint",
    "teacher.format": "Teacher format",
    "teacher.arch": "Teacher architecture",
    "student.arch": "Student architecture",
    "student.init_from_teacher": "Initialise from the teacher",
    "data.train": "Training data",
    "data.test": "Test data",
    "data.val_fraction": "Validation fraction",
    "data.normalize.mean": "Normalise: mean",
    "data.normalize.std": "Normalise: std",
    "data.augment": "Augmentation",
    "data.mixup": "Mixup",
    "data.image_size": "Image size",
    "method.name": "Method",
    "method.temperature": "Temperature",
    "method.alpha": "Alpha",
    "stages.teacher_finetune_epochs": "Teacher fine-tune epochs",
    "stages.distill_epochs": "Distillation epochs",
    "stages.finetune_epochs": "Student fine-tune epochs",
    "stages.baseline": "Train a baseline",
    "optim.name": "Optimiser",
    "optim.lr": "Learning rate",
    "optim.weight_decay": "Weight decay",
    "optim.momentum": "Momentum",
    "optim.schedule": "LR schedule",
    "optim.warmup_steps": "Warm-up steps",
    "optim.teacher_lr": "Teacher learning rate",
    "optim.grad_clip": "Gradient clipping",
    "batch_size": "Batch size",
    "eval_batch_size": "Evaluation batch size",
    "seed": "Seed",
    "device": "Device",
    "precision": "Precision",
    "threads": "CPU threads",
    "export": "Exports",
    "quantize": "Quantisation",
}
# Where the spec's own description speaks to a CLI user (paths) rather than to the form's.
HELP = {
    "teacher.file": "The trained model to imitate: safetensors or a state_dict (name its architecture), ONNX, or a "
    ".zip of a Hugging Face model folder (text).",
    "data.train": "Training data: .npz (x_train, y_train[, x_test, y_test]) or an ImageFolder .zip; for a text teacher "
    ".jsonl, .csv or .tsv rows; for a causal LM a .txt file or .jsonl rows (text, prompt + completion, or messages).",
    "task": "Follows from the teacher: a Hugging Face encoder makes a text classification job, a causal LM "
    "(...ForCausalLM: GPT-2, Llama, Qwen, ...) a language-model job.",
    "student.file": "Text jobs: start from a pretrained smaller model of the teacher's tokenizer instead (an hf .zip).",
    "stages.baseline": "Also train the same student without a teacher, for as many epochs: the report can then say "
    "what distillation gained. It roughly doubles the student's training time.",
    "data.test": "A separate test set; without one the npz test split (or the validation split) is used.",
    "teacher.arch": "Registry architecture of the teacher; needed for safetensors and state_dict files.",
    "optim.name": "Optimiser: adamw is a safe default; sgd uses the momentum below.",
    "data.normalize.mean": "Per-channel mean, comma-separated (or one for all); applied after uint8 → [0, 1].",
    "data.normalize.std": "Per-channel std, comma-separated (or one for all); every value > 0.",
}
PLACEHOLDERS = {"name": "e.g. mnist-mlp", "device": "auto, cpu, cuda or cuda:N"}

# (title, [(path, advanced)]): the order of the form. Arch arguments follow their `arch` field.
LAYOUT: list[tuple[str, list[str], list[str]]] = [
    ("Job", ["name", "task"], []),
    ("Teacher", ["teacher.file", "teacher.format", "teacher.arch"], []),
    ("Data", ["data.train", "data.test", "data.text_field", "data.label_field", "data.max_length"],
     ["data.val_fraction", "data.text_pair_field", "data.prompt_field", "data.completion_field",
      "data.messages_field", "data.normalize.mean", "data.normalize.std", "data.augment", "data.mixup",
      "data.image_size"]),
    ("Student", ["student.arch", "student.init_from_teacher", "student.teacher_layers"], ["student.file"]),
    ("Distillation", ["method.temperature", "method.alpha", "method.name", "method.divergence", "method.top_k"],
     ["method.hidden_weight", "method.beta", "method.max_new_tokens", "method.sampling"]),
    ("Search", ["tune.find", "tune.trials"], []),
    ("Stages", ["stages.distill_epochs", "stages.teacher_finetune_epochs", "stages.finetune_epochs",
                "stages.baseline"], ["stages.teacher_check", "stages.select"]),
    ("Training", ["optim.name", "optim.lr", "batch_size", "precision"],
     ["optim.schedule", "optim.weight_decay", "optim.momentum", "optim.warmup_steps", "optim.warmup_ratio",
      "optim.teacher_lr",
      "optim.grad_clip", "eval_batch_size", "seed", "device", "threads", "gradient_checkpointing"]),
    ("Output", ["export", "quantize"], []),
]
OTHER_GROUP = "Other settings"
TASKS: tuple[ResolvedTask, ...] = ("image_classification", "text_classification", "causal_lm")
_IMAGE, _TEXT, _LM = TASKS
# Fields that mean something for some tasks only; the page shows them when the teacher's task is one of them.
ONLY: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("data.text_field", "data.max_length", "student.teacher_layers", "student.file"), (_TEXT, _LM)),
    **dict.fromkeys(("data.text_pair_field", "data.label_field", "method.hidden_weight"), (_TEXT,)),
    **dict.fromkeys(("method.divergence", "method.top_k", "method.beta", "method.max_new_tokens", "method.sampling",
                     "data.prompt_field", "data.completion_field", "data.messages_field", "gradient_checkpointing"),
                    (_LM,)),
    **dict.fromkeys(("teacher.arch", "data.normalize.mean", "data.normalize.std", "data.augment", "data.mixup",
                     "data.image_size"), (_IMAGE,)),
}


@dataclass(frozen=True)
class FormField:
    name: str  # the control's name (arch arguments: `student.args.mlp.hidden`)
    path: str  # where the value goes in the spec (`student.arch_args.hidden`)
    label: str
    help: str
    kind: FieldKind
    default: Any = None
    options: tuple[Any, ...] = ()
    nullable: bool = False
    integer: bool = False  # number fields and list items
    minimum: float | None = None
    maximum: float | None = None
    required: bool = False
    purpose: str | None = None  # file fields: teacher | dataset
    owner: str | None = None  # arch fields and arguments: teacher | student
    arch: str | None = None  # arch arguments: the architecture they belong to
    placeholder: str = ""
    # Each task's default, where they differ (the page switches a value still at the old task's default).
    task_defaults: dict[str, FormValue] | None = None

    @property
    def form_default(self) -> FormValue:
        return to_form_value(self, self.default)

    @property
    def only(self) -> str | None:
        """The tasks this field belongs to, space-separated; None for every task."""
        return " ".join(ONLY[self.path]) if self.path in ONLY else None

    @property
    def id(self) -> str:
        return "f-" + re.sub(r"[^A-Za-z0-9_-]", "-", self.name)

    @property
    def step(self) -> str:
        return "1" if self.integer else "any"

    def option_label(self, option: Any) -> str:
        return "" if option is None else str(option)


# "Find the best T and alpha for me": the search the form offers (the API takes any `tune` block).
TUNE_SPACE = {"method.temperature": [1.0, 2.0, 4.0, 8.0], "method.alpha": [0.5, 0.7, 0.9]}
TUNE_FIELDS = (
    FormField(name="tune.find", path="tune.find", label="Find the best T and alpha for me", kind="checkbox",
              default=False, help="Runs short trials on the queue first (T in 1, 2, 4, 8; alpha in 0.5, 0.7, 0.9), "
              "chosen on the validation split, then the full job with the best and a baseline."),
    FormField(name="tune.trials", path="tune.trials", label="Trials", kind="number", integer=True, default=8,
              minimum=1, maximum=200, help="Trials of the search, each a quarter of the epochs; up to 4 at once."),
)


@dataclass
class FieldGroup:
    title: str
    fields: list[FormField] = field(default_factory=list)
    advanced: list[FormField] = field(default_factory=list)

    @property
    def summary(self) -> str:
        """The advanced part's toggle: "More data settings"; a group of advanced fields only says how many."""
        if not self.fields:
            return f"Show {len(self.advanced)} setting{'s' if len(self.advanced) != 1 else ''}"
        return f"More {self.title.lower().removesuffix(' settings')} settings"


@dataclass
class Validation:
    spec: JobSpec | None
    errors: dict[str, list[str]]  # control name -> messages
    general: list[str]  # errors no control owns

    @property
    def ok(self) -> bool:
        return self.spec is not None and not self.errors and not self.general


# --------------------------------------------------------------------------------------- schema


def _resolve(schema: Mapping[str, Any], defs: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = schema.get("$ref") or (schema.get("allOf") or [{}])[0].get("$ref")
    if ref:
        return defs[ref.rsplit("/", 1)[-1]]
    return schema


def _nullable(schema: Mapping[str, Any]) -> tuple[Mapping[str, Any], bool]:
    options = schema.get("anyOf")
    if not options:
        return schema, False
    kept = [option for option in options if option.get("type") != "null"]
    nullable = len(kept) < len(options)
    merged = {**{k: v for k, v in schema.items() if k != "anyOf"}, **(kept[0] if len(kept) == 1 else {})}
    return merged, nullable


def _humanize(key: str) -> str:
    words = key.replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def _field_from_schema(
    name: str, path: str, schema: Mapping[str, Any], *, required: bool, default: Any, label: str | None = None
) -> FormField:
    schema, nullable = _nullable(schema)
    help_text = HELP.get(path) or str(schema.get("description") or "")
    common: dict[str, Any] = {
        "name": name,
        "path": path,
        "label": label or LABELS.get(path) or _humanize(path.rsplit(".", 1)[-1]),
        "help": help_text,
        "default": default,
        "nullable": nullable,
        "required": required,
        "placeholder": PLACEHOLDERS.get(path, ""),
    }
    kind = schema.get("type")
    if "enum" in schema or "const" in schema:
        options = tuple(schema.get("enum") or [schema["const"]])
        return FormField(kind="select", options=((None, *options) if nullable else options), **common)
    if kind == "boolean":
        return FormField(kind="checkbox", **common)
    if kind in ("integer", "number"):
        return FormField(
            kind="number",
            integer=kind == "integer",
            minimum=schema.get("minimum"),
            maximum=schema.get("maximum"),
            **common,
        )
    if kind == "array":
        items = schema.get("items") or {}
        if "enum" in items:
            return FormField(kind="checks", options=tuple(items["enum"]), **common)
        if items.get("type") in ("integer", "number"):
            return FormField(kind="list", integer=items.get("type") == "integer", **common)
    if kind == "object":
        return FormField(kind="json", **common)
    return FormField(kind="text", **common)


def _spec_leaves(schema: Mapping[str, Any], defs: Mapping[str, Any], prefix: str = "") -> Iterator[FormField]:
    required = set(schema.get("required") or ())
    for key, prop in (schema.get("properties") or {}).items():
        path = f"{prefix}{key}"
        resolved = _resolve(prop, defs)
        if resolved is not prop and resolved.get("type") == "object" and "properties" in resolved:
            yield from _spec_leaves(resolved, defs, prefix=f"{path}.")
            continue
        if path.endswith(".arch_args"):
            continue  # generated per architecture
        if path == "tune":
            yield from TUNE_FIELDS  # the form's one search, not the block's every field
            continue
        default = prop.get("default")
        if path in FILE_FIELDS:
            yield FormField(
                name=path,
                path=path,
                label=LABELS[path],
                help=HELP.get(path) or str(prop.get("description") or ""),
                kind="file",
                nullable=key not in required,
                required=key in required,
                purpose=FILE_FIELDS[path],
            )
        elif path in ("teacher.arch", "student.arch"):
            owner = path.split(".")[0]
            base = _field_from_schema(path, path, prop, required=key in required, default=default)
            names = tuple(info.name for info in _architectures())
            yield FormField(**{**base.__dict__, "kind": "arch", "owner": owner,
                               "options": ((None, *names) if base.nullable else names)})
        else:
            yield _field_from_schema(path, path, prop, required=key in required, default=default)


def _arch_arg_fields(owner: str, info: ArchInfo) -> list[FormField]:
    schema = info.args_schema
    defs = schema.get("$defs") or {}
    fields = []
    for key, prop in (schema.get("properties") or {}).items():
        prop = _resolve(prop, defs)
        base = _field_from_schema(
            f"{owner}.args.{info.name}.{key}",
            f"{owner}.arch_args.{key}",
            prop,
            required=False,
            default=info.defaults.get(key),
            label=_humanize(key),
        )
        fields.append(FormField(**{**base.__dict__, "owner": owner, "arch": info.name}))
    return fields


def _with_task_defaults(leaves: list[FormField]) -> list[FormField]:
    """Each field's default per task, where `kdcore.spec.for_task` makes them differ from the image one's."""
    from dataclasses import replace

    minimal = {"teacher": {"file": "x"}, "data": {"train": "x"}}
    resolved = {task: for_task(parse_spec(minimal), task).model_dump(mode="json") for task in TASKS}
    updated = []
    for f in leaves:
        image_value = _lookup(resolved[_IMAGE], f.path)[1]
        if f.path == "student.arch":
            # The schema's None means "the task's default": the form shows what that is.
            names = tuple(option for option in f.options if option is not None)
            f = replace(f, default=image_value, nullable=False, options=names)
        values = {task: _lookup(spec, f.path) for task, spec in resolved.items()}
        defaults: dict[str, FormValue] = {task: to_form_value(f, value if found else f.default)
                                          for task, (found, value) in values.items()}
        if len({repr(value) for value in defaults.values()}) > 1:
            f = replace(f, task_defaults=defaults)
        updated.append(f)
    return updated


@lru_cache(maxsize=1)
def _architectures() -> tuple[ArchInfo, ...]:
    return tuple(list_architectures())


class SpecForm:
    """The form's fields and the conversions between form values, spec dicts and errors."""

    def __init__(self) -> None:
        schema = JobSpec.model_json_schema()
        leaves = list(_spec_leaves(schema, schema.get("$defs") or {}))
        self.architectures = _architectures()
        self.arch_args: dict[tuple[str, str], list[FormField]] = {
            (owner, info.name): _arch_arg_fields(owner, info) for owner in ARCH_OWNERS for info in self.architectures
        }
        leaves = _with_task_defaults(leaves)
        self.fields: list[FormField] = leaves + [f for fs in self.arch_args.values() for f in fs]
        self.by_name = {f.name: f for f in self.fields}
        self.groups = self._layout({f.path: f for f in leaves})

    @staticmethod
    def _layout(leaves: dict[str, FormField]) -> list[FieldGroup]:
        groups: list[FieldGroup] = []
        placed: set[str] = set()
        for title, main, advanced in LAYOUT:
            group = FieldGroup(title)
            group.fields = [leaves[path] for path in main if path in leaves]
            group.advanced = [leaves[path] for path in advanced if path in leaves]
            placed.update(main, advanced)
            groups.append(group)
        rest = [f for path, f in leaves.items() if path not in placed]
        if rest:
            groups.append(FieldGroup(OTHER_GROUP, advanced=rest))
        return groups

    def arch_info(self, name: str) -> ArchInfo | None:
        return next((info for info in self.architectures if info.name == name), None)

    # ----------------------------------------------------------------------- values

    def defaults(self) -> FormValues:
        return {f.name: to_form_value(f, f.default) for f in self.fields}

    def values_from_spec(self, spec: Mapping[str, Any]) -> FormValues:
        """Prefill from a job's spec (resubmit with changes): its values, defaults elsewhere."""
        values = self.defaults()
        for f in self.fields:
            if f.arch is not None and _get_path(spec, f"{f.owner}.arch") != f.arch:
                continue
            found, value = _lookup(spec, f.path)
            if found:
                values[f.name] = to_form_value(f, value)
        return values

    def values_from_form(self, form: FormData) -> FormValues:
        values: FormValues = {}
        for f in self.fields:
            if f.kind == "checkbox":
                values[f.name] = f.name in form
            elif f.kind == "checks":
                values[f.name] = [str(v) for v in form.getlist(f.name)]
            elif f.name not in form:
                values[f.name] = to_form_value(f, f.default)  # a control the page did not have: its default
            else:
                raw = form.get(f.name)
                values[f.name] = raw.strip() if isinstance(raw, str) else ""
        return values

    def selected_arch(self, values: Mapping[str, FormValue], owner: str) -> str | None:
        value = values.get(f"{owner}.arch")
        return value if isinstance(value, str) and value else None

    def active_fields(self, values: Mapping[str, FormValue]) -> list[FormField]:
        """The fields that make the spec: every plain one, and the arguments of the chosen architectures."""
        chosen = {owner: self.selected_arch(values, owner) for owner in ARCH_OWNERS}
        return [f for f in self.fields if f.arch is None or chosen.get(f.owner or "") == f.arch]

    def to_spec(self, values: Mapping[str, FormValue]) -> dict[str, Any]:
        """The spec the values describe, unvalidated: numbers converted where they parse, raw text elsewhere
        (so that validation names the field)."""
        spec: dict[str, Any] = {}
        for f in self.active_fields(values):
            raw = values.get(f.name, to_form_value(f, f.default))
            converted = from_form_value(f, raw)
            if converted is _OMIT:
                continue
            _set_path(spec, f.path, converted)
        tune = spec.pop("tune", None) or {}
        if tune.get("find"):
            spec["tune"] = {"trials": tune.get("trials", 8), "space": TUNE_SPACE}
        return spec

    # --------------------------------------------------------------------- validate

    def validate(self, values: Mapping[str, FormValue]) -> Validation:
        data = self.to_spec(values)
        errors: dict[str, list[str]] = {}
        general: list[str] = []

        def add(path: str, message: str) -> str | None:
            name, rest = self.control_for(path, values)
            if name is None:
                general.append(f"{path}: {message}")
            else:
                errors.setdefault(name, []).append(f"item {int(rest) + 1}: {message}" if rest.isdigit() else message)
            return name

        # First what the form knows better than the spec: empty uploads and each architecture argument.
        reported: set[str | None] = set()
        for f in self.fields:
            if f.kind == "file" and f.required and not values.get(f.name):
                reported.add(add(f.path, "upload a file, or choose one you uploaded before"))
        for owner in ARCH_OWNERS:
            arch = self.selected_arch(values, owner)
            if arch in ARCHITECTURES:
                try:
                    validate_arch_args(arch, data.get(owner, {}).get("arch_args", {}), field=f"{owner}.arch_args")
                except SpecError as exc:
                    reported.add(f"{owner}.arch_args")
                    reported.update(add(error["field"], error["message"]) for error in exc.errors)
        spec = None
        try:
            spec = parse_spec(data)
        except SpecError as exc:
            for error in exc.errors:
                # The spec says the same as the checks above, less precisely: `student.arch_args: hidden.1: ...`.
                if error["field"] not in reported and self.control_for(error["field"], values)[0] not in reported:
                    add(error["field"], error["message"])
        return Validation(spec=spec if not errors and not general else None, errors=errors, general=general)

    def control_for(self, path: str, values: Mapping[str, FormValue]) -> tuple[str | None, str]:
        """The control an error path belongs to (the longest field path it starts with), and the rest."""
        best: FormField | None = None
        for f in self.active_fields(values):
            if (path == f.path or path.startswith(f.path + ".")) and (best is None or len(f.path) > len(best.path)):
                best = f
        if best is None:
            return None, ""
        return best.name, path[len(best.path):].lstrip(".")


_OMIT = object()


def to_form_value(f: FormField, value: Any) -> FormValue:
    if f.kind == "checkbox":
        return bool(value)
    if f.kind == "checks":
        return [str(v) for v in (value or [])]
    if value is None:
        return ""
    if f.kind == "list":
        return ", ".join(_format_number(v) for v in value) if isinstance(value, list) else str(value)
    if f.kind == "number":
        return _format_number(value)
    if f.kind == "json":
        import json

        return json.dumps(value)
    return str(value)


def from_form_value(f: FormField, raw: FormValue) -> Any:
    if f.kind == "checkbox":
        return bool(raw)
    if f.kind == "checks":
        chosen = raw if isinstance(raw, list) else [str(raw)]
        by_text = {str(option): option for option in f.options}
        return [by_text.get(v, v) for v in chosen]
    text = raw if isinstance(raw, str) else str(raw)
    if text == "":
        if f.nullable:
            return None
        if f.kind == "list":
            return []
        return "" if f.required or f.kind in ("number", "select", "arch") else _OMIT
    if f.kind in ("select", "arch"):
        by_text = {f.option_label(option): option for option in f.options}
        return by_text.get(text, text)
    if f.kind == "number":
        return _parse_number(text, integer=f.integer)
    if f.kind == "list":
        return [_parse_number(item, integer=f.integer) for item in re.split(r"[,\s]+", text) if item]
    if f.kind == "json":
        import json

        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _parse_number(text: str, *, integer: bool) -> Any:
    """A number where the text is one; else the text itself, for validation to name the field."""
    if integer:
        return int(text) if re.fullmatch(r"[+-]?\d{1,18}", text) else text
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def _format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"{value:.1f}"
    return repr(value) if isinstance(value, float) else str(value)


def _lookup(data: Mapping[str, Any], path: str) -> tuple[bool, Any]:
    current: Any = data
    for part in path.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return False, None
        current = current[part]
    return True, current


def _get_path(data: Mapping[str, Any], path: str) -> Any:
    return _lookup(data, path)[1]


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    current = data
    for part in parents:
        current = current.setdefault(part, {})
    current[last] = value


@lru_cache(maxsize=1)
def spec_form() -> SpecForm:
    return SpecForm()
