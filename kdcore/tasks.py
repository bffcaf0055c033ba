"""Which task a job is: what the spec says, checked against what the teacher file is. Torch-free."""

from __future__ import annotations

from kdcore.errors import KDError
from kdcore.spec import JobSpec, ResolvedTask
from kdcore.teacher_sniff import TeacherInfo


def resolve_task(spec: JobSpec, info: TeacherInfo) -> ResolvedTask:
    """The task an hf encoder implies is text classification; every other teacher format is an image model."""
    implied: ResolvedTask = "image_classification"
    if info.hf is not None:
        if info.hf.task == "causal_lm":
            raise KDError(f"the teacher is a causal language model ({info.hf.model_type}); language-model "
                          "distillation is not available yet, only text classification", field="teacher.file",
                          code="bad_input")
        implied = "text_classification"
    if spec.task not in ("auto", implied):
        raise KDError(f"task is {spec.task} but the teacher file is {info.details or info.format}",
                      field="task", code="teacher_data_mismatch")
    return implied
