"""Row and file factories: real teacher and dataset files made with numpy, never torch."""

from __future__ import annotations

import io
import zipfile
from datetime import timedelta
from typing import Any

import numpy as np
from safetensors.numpy import save as save_safetensors
from sqlalchemy.orm import Session

from service import artifacts, keys, state, users
from service.ids import new_id
from service.keys import upload_key
from service.models import File, FilePurpose, Job, JobFile, JobState, User, utcnow
from service.storage import Storage


def make_user(session: Session, name: str | None = None) -> tuple[User, str]:
    return users.create_user(session=session, name=name or new_id("name"))


def npz_bytes(num: int = 40, classes: int = 10, shape: tuple[int, ...] = (28, 28), test: bool = True) -> bytes:
    rng = np.random.default_rng(0)
    arrays: dict[str, Any] = {
        "x_train": rng.integers(0, 255, (num, *shape), dtype=np.uint8),
        "y_train": np.arange(num) % classes,
    }
    if test:
        arrays["x_test"] = rng.integers(0, 255, (10, *shape), dtype=np.uint8)
        arrays["y_test"] = np.arange(10) % classes
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def safetensors_bytes(outputs: int = 10, inputs: int = 784, hidden: int = 32) -> bytes:
    """An MLP teacher's weights (registry `mlp` naming), as `safetensors.torch.save_file` would write them."""
    tensors = {
        "net.1.weight": np.zeros((hidden, inputs), np.float32),
        "net.1.bias": np.zeros(hidden, np.float32),
        "net.3.weight": np.zeros((outputs, hidden), np.float32),
        "net.3.bias": np.zeros(outputs, np.float32),
    }
    return save_safetensors(tensors)


def torchscript_bytes() -> bytes:
    """The layout of a `torch.jit.save` archive (code and constants records), without torch."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("model/constants.pkl", b"\x80\x02).")
        archive.writestr("model/code/__torch__.py", "class Model: pass\n")
        archive.writestr("model/version", "3\n")
    return buffer.getvalue()


TEACHER_INFO = {"format": "safetensors", "output_size": 10, "input_shape": None, "num_tensors": 4, "details": ""}
DATASET_INFO = {"kind": "npz", "num_train": 40, "num_test": 10, "sample_shape": [28, 28], "num_classes": 10}


def make_file(
    session: Session,
    storage: Storage,
    owner: User,
    purpose: FilePurpose = FilePurpose.DATASET,
    *,
    content: bytes = b"data",
    info: dict[str, Any] | None = None,
    name: str | None = None,
) -> File:
    file_id = new_id("file")
    stored = storage.put_bytes(upload_key(owner.id, file_id), content)
    default_info = TEACHER_INFO if purpose == FilePurpose.TEACHER else DATASET_INFO
    row = File(
        id=file_id,
        owner_id=owner.id,
        name=name or f"{purpose}.bin",
        purpose=purpose,
        size=stored.size,
        sha256=stored.sha256,
        storage_key=stored.key,
        info=info if info is not None else dict(default_info),
    )
    session.add(row)
    session.commit()
    return row


def spec_for(teacher: File, train: File, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "teacher": {"file": teacher.id, "arch": "mlp", "arch_args": {"hidden": [32]}},
        "student": {"arch": "mlp", "arch_args": {"hidden": [16]}},
        "data": {"train": train.id},
        "stages": {"distill_epochs": 2},
    }
    spec.update(overrides)
    return spec


def make_job(
    session: Session,
    storage: Storage,
    owner: User,
    *,
    job_state: JobState = JobState.QUEUED,
    teacher: File | None = None,
    train: File | None = None,
    worker_id: str = "worker-1",
) -> Job:
    """A job in any state, reached through the real transitions (so its event log is real too)."""
    teacher = teacher or make_file(session, storage, owner, FilePurpose.TEACHER)
    train = train or make_file(session, storage, owner, FilePurpose.DATASET)
    spec = spec_for(teacher, train)
    job = Job(
        id=new_id("job"),
        owner_id=owner.id,
        spec=spec,
        spec_sha256="0" * 64,
        queue="default",
        progress={"fraction": 0.0},
    )
    session.add(job)
    session.add_all(
        [
            JobFile(job_id=job.id, role="teacher", file_id=teacher.id),
            JobFile(job_id=job.id, role="train", file_id=train.id),
        ]
    )
    state.append_event(session, job.id, "state", {"state": "queued"})
    session.commit()
    if job_state == JobState.CANCELLED:
        state.request_cancel(session, job.id)
    elif job_state != JobState.QUEUED:
        assert state.claim(session, job.id, worker_id, lease_seconds=60)
        if job_state != JobState.RUNNING:
            error = ("bad_input", "broken teacher") if job_state == JobState.FAILED else (None, None)
            state.finish(
                session,
                job.id,
                worker_id,
                state=job_state,
                error_code=error[0],
                error_message=error[1],
                now=utcnow() + timedelta(seconds=5),
            )
    session.commit()
    session.refresh(job)
    return job


def make_artifact(
    session: Session, storage: Storage, job: Job, name: str = "student.onnx", content: bytes = b"onnx-bytes" * 100
) -> Any:
    stored = storage.put_bytes(keys.artifact_key(job.id, max(job.attempts, 1), name), content)
    artifact = artifacts.record_artifact(session=session, job_id=job.id, name=name, stored=stored)
    session.commit()
    return artifact
