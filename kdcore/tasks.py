"""Which task a job is: what the spec says, checked against what the teacher file is. Torch-free."""

from __future__ import annotations

from kdcore.errors import KDError
from kdcore.spec import JobSpec, ResolvedTask
from kdcore.teacher_sniff import TeacherInfo


def resolve_task(spec: JobSpec, info: TeacherInfo) -> ResolvedTask:
    """An hf ...ForCausalLM (or a decoder family's base config) is causal_lm, another hf folder text
    classification; every other teacher format is an image model."""
    implied: ResolvedTask = "image_classification"
    if info.hf is not None:
        implied = info.hf.task
    if spec.task not in ("auto", implied):
        raise KDError(f"task is {spec.task} but the teacher file is {info.details or info.format}",
                      field="task", code="teacher_data_mismatch")
    return implied
