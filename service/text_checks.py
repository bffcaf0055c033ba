"""What a submission can check from the sniffed files alone: the job's task and, for text jobs, the fields.

The worker's check stage reads every row and tokenises it; here the summaries recorded at upload
(the teacher's config, the data's columns and label counts) refuse the mistakes a user makes most
(a misspelt column, labels the teacher does not know) before the job waits in the queue.
"""

from __future__ import annotations

import difflib
from typing import Any

from kdcore.errors import KDError, SpecError
from kdcore.spec import JobSpec, for_task
from kdcore.tasks import resolve_task
from kdcore.teacher_sniff import TeacherInfo
from service.errors import ServiceError
from service.lm_checks import check_lm_datasets
from service.models import File


def resolve_spec(spec: JobSpec, teacher: File) -> JobSpec:
    """The spec with its task fixed from the teacher and that task's defaults filled in."""
    try:
        info = TeacherInfo.model_validate(teacher.info)
    except ValueError:
        info = TeacherInfo(format="safetensors")  # a record from before hf sniffing: images, as then
    try:
        return for_task(spec, resolve_task(spec, info))
    except SpecError as exc:
        raise ServiceError(422, "invalid_spec", exc.message, field=exc.field, details=exc.errors) from None
    except KDError as exc:
        raise ServiceError(422, exc.code, exc.message, field=exc.field) from None


def check_datasets(spec: JobSpec, teacher: File, datasets: dict[str, File]) -> None:
    if spec.task == "causal_lm":
        check_lm_datasets(spec, datasets)
        return
    text_job = spec.task == "text_classification"
    for role, dataset in datasets.items():
        field = f"data.{role}"
        is_text = dataset.info.get("kind") == "text"
        if text_job and not is_text:
            raise ServiceError(422, "teacher_data_mismatch", f"{field} is an image dataset but the teacher is a text "
                               "model: give .jsonl, .csv or .tsv rows", field=field)
        if not text_job and is_text:
            raise ServiceError(422, "teacher_data_mismatch", f"{field} holds text rows but the teacher is an image "
                               "model: text jobs need an hf teacher (a zip of a Hugging Face model folder)",
                               field=field)
        if text_job and dataset.info.get("format") == "txt":
            raise ServiceError(422, "teacher_data_mismatch", f"{field} is plain text (a .txt document, for language "
                               "models); a text classifier needs rows with a text and a label: .jsonl, .csv or .tsv",
                               field=field)
        if text_job:
            _check_text_fields(spec, dataset.info, field)
    if text_job:
        _check_labels(spec, teacher.info.get("hf") or {}, datasets)


def _check_text_fields(spec: JobSpec, info: dict[str, Any], role: str) -> None:
    columns = info.get("columns") or []
    wanted = [("data.text_field", spec.data.text_field), ("data.label_field", spec.data.label_field)]
    if spec.data.text_pair_field is not None:
        wanted.append(("data.text_pair_field", spec.data.text_pair_field))
    for setting, name in wanted:
        if name not in columns:
            close = difflib.get_close_matches(name, columns, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ServiceError(422, "invalid_spec", f"{role} has no column {name!r} (its columns: "
                               f"{', '.join(columns[:20])}){hint}", field=setting)
        missing = (info.get("first_missing") or {}).get(name)
        if missing is not None:
            raise ServiceError(422, "bad_file", f"{role} row {missing} has no {name!r} (or it is empty)",
                               field=setting)


def _check_labels(spec: JobSpec, hf: dict[str, Any], datasets: dict[str, File]) -> None:
    teacher_labels = hf.get("labels")
    for role, dataset in datasets.items():
        counts = (dataset.info.get("value_counts") or {}).get(spec.data.label_field)
        if counts is None:
            raise ServiceError(422, "bad_file", f"data.{role}: column {spec.data.label_field!r} does not look like "
                               "labels (more than 1000 distinct values, or long texts)", field="data.label_field")
        if teacher_labels and not all(label.isdigit() for label in counts):
            unknown = sorted(set(counts) - set(teacher_labels))
            if unknown:
                raise ServiceError(422, "teacher_data_mismatch", f"data.{role} has labels the teacher does not know: "
                                   f"{', '.join(unknown[:5])} (the teacher's: {', '.join(teacher_labels[:20])})",
                                   field="data.label_field")
    if not hf.get("has_classifier") and spec.stages.teacher_finetune_epochs == 0:
        raise ServiceError(422, "invalid_spec", "the teacher is a base model without a classification head; set "
                           "stages.teacher_finetune_epochs (2-3 is usual) so it learns one on this data first",
                           field="stages.teacher_finetune_epochs")
