"""What a causal_lm submission can check from the sniffed files: the data's kind, the tokenizers, the memory.

The worker's check stage tokenises every row and builds the student; here the summaries recorded at
upload refuse, before the job waits in the queue, the mistakes a user makes most: a field name
misspelt, prompts without answers for a method that needs answers, a pretrained student of another
tokenizer, and a job whose estimated training memory is over the operator's limit (the estimate is
in the error).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from kdcore.errors import KDError
from kdcore.limits import ResourceLimits
from kdcore.lm_memory import check_memory_estimate, estimate_memory, sniffed_student, teacher_bytes_per_parameter
from kdcore.spec import JobSpec
from kdcore.text_sniff import LMKind, lm_kind_of
from service.errors import ServiceError
from service.models import File

_FORMS = ".txt file or .jsonl rows with text, prompt + completion, or messages"


def data_kind(spec: JobSpec, info: Mapping[str, Any], role: str) -> LMKind:
    """The kind of language-model rows a sniffed dataset holds under the spec's field names, or a 422."""
    field = f"data.{role}"
    if info.get("kind") != "text":
        raise ServiceError(422, "teacher_data_mismatch", f"{field} is an image dataset but the teacher is a causal "
                           f"language model: give a {_FORMS}", field=field)
    if info.get("format") == "txt":
        return "text"
    if info.get("format") != "jsonl":
        raise ServiceError(422, "teacher_data_mismatch", f"{field} is a .{info.get('format')} table; causal_lm data "
                           f"is a {_FORMS}", field=field)
    data = spec.data
    columns = list(info.get("columns") or [])
    kind = lm_kind_of(columns, text_field=data.text_field, prompt_field=data.prompt_field,
                      completion_field=data.completion_field, messages_field=data.messages_field)
    if kind is None:
        wanted = (data.text_field, data.prompt_field, data.messages_field)
        close = next((found[0] for name in wanted if (found := difflib.get_close_matches(name, columns, n=1))), None)
        hint = f"; did you mean {close!r}? (set data.text_field, data.prompt_field or data.messages_field)" if close \
            else ""
        raise ServiceError(422, "invalid_spec", f"{field} has none of the fields {', '.join(map(repr, wanted))} (its "
                           f"fields: {', '.join(columns[:20])}){hint}", field="data.text_field")
    _check_every_row(spec, info, kind, field)
    return kind


def _check_every_row(spec: JobSpec, info: Mapping[str, Any], kind: LMKind, field: str) -> None:
    """Every row of one kind: the fields that decide it present (and not empty) in each."""
    data = spec.data
    needed = {"text": [("data.text_field", data.text_field)], "chat": [("data.messages_field", data.messages_field)],
              "prompt": [("data.prompt_field", data.prompt_field)],
              "completion": [("data.prompt_field", data.prompt_field),
                             ("data.completion_field", data.completion_field)]}[kind]
    first_missing = info.get("first_missing") or {}
    for setting, name in needed:
        row = first_missing.get(name)
        if row is not None:
            raise ServiceError(422, "bad_file", f"{field} row {row} has no {name!r} (or it is empty), which the "
                               "other rows have: every row must be of one kind", field=setting)


def check_lm_datasets(spec: JobSpec, datasets: Mapping[str, File]) -> None:
    """The data's kind against the method: prompts alone for seq_kd only, and seq_kd needs prompts."""
    for role, dataset in datasets.items():
        kind = data_kind(spec, dataset.info, role)
        if kind == "prompt" and spec.method.name != "seq_kd":
            raise ServiceError(422, "invalid_spec", f"data.{role} holds prompts without completions: that is data "
                               "for method.name seq_kd (the teacher writes the answers); for kd give prompt + "
                               "completion rows", field="method.name")
        if spec.method.name == "seq_kd" and kind in ("text", "chat"):
            raise ServiceError(422, "invalid_spec", f"seq_kd needs prompts for the teacher to answer, but data.{role} "
                               f"holds {'plain text' if kind == 'text' else 'chats'}: give .jsonl rows with "
                               f"{spec.data.prompt_field!r}, or use method.name kd", field="method.name")
        if kind == "prompt" and spec.stages.teacher_finetune_epochs:
            raise ServiceError(422, "invalid_spec", "prompt-only rows have no answers to fine-tune the teacher on: "
                               "set stages.teacher_finetune_epochs to 0, or give prompt + completion rows",
                               field="stages.teacher_finetune_epochs")


def check_lm_student(teacher: File, student: File | None) -> None:
    """A pretrained student must be a causal LM of the teacher's tokenizer (the soft targets compare tokens)."""
    if student is None:
        return
    teacher_hf, student_hf = teacher.info.get("hf") or {}, student.info.get("hf") or {}
    if student_hf.get("task") != "causal_lm":
        raise ServiceError(422, "teacher_data_mismatch", "student.file is not a causal language model (a Hugging "
                           "Face ...ForCausalLM folder): the student must be of the teacher's kind",
                           field="student.file")
    ours, theirs = teacher_hf.get("vocab_sha256"), student_hf.get("vocab_sha256")
    if ours and theirs and ours != theirs:
        raise ServiceError(422, "tokenizer_mismatch", f"the student's tokenizer differs from the teacher's "
                           f"({teacher_hf.get('tokenizer_size')} against {student_hf.get('tokenizer_size')} tokens in "
                           "their tokenizer.json): both must share one tokenizer, as a smaller model of the same "
                           "family does", field="student.file")


def check_lm_memory(spec: JobSpec, teacher: File, student: File | None, limits: ResourceLimits) -> dict[str, int]:
    """The training memory estimated from the sniffed configs; a 422 naming batch_size when over the limit."""
    hf = teacher.info.get("hf") or {}
    if student is not None:
        student_hf = student.info.get("hf") or {}
        params, hidden = int(student_hf.get("params") or 0), int(student_hf.get("hidden_size") or 0)
        layers = int(student_hf.get("num_layers") or 0)
    else:
        params, hidden, layers = sniffed_student(hf, spec.student.arch_args, spec.student.teacher_layers)
    memory = estimate_memory(
        teacher_params=int(hf.get("params") or 0),
        teacher_bytes=teacher_bytes_per_parameter(precision=spec.precision,
                                                  teacher_finetune_epochs=spec.stages.teacher_finetune_epochs),
        student_params=params, hidden=hidden, layers=layers, tokens_per_batch=spec.batch_size * spec.data.max_length,
        vocab=int(hf.get("vocab_size") or 1), gradient_checkpointing=spec.gradient_checkpointing)
    try:
        check_memory_estimate(memory, limits)
    except KDError as exc:
        raise ServiceError(422, exc.code, exc.message, field=exc.field) from None
    return memory
