"""A job's artifacts: listed and downloaded by the owner, recorded by the worker."""

from __future__ import annotations

import logging
import mimetypes

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.keys import checkpoint_prefix
from service.models import Artifact
from service.storage import Storage, StoredObject

logger = logging.getLogger("distillery.artifacts")

# Types mimetypes does not know; everything else falls back to its guess or octet-stream.
_CONTENT_TYPES = {
    ".safetensors": "application/octet-stream",
    ".onnx": "application/octet-stream",
    ".ts": "application/octet-stream",  # TorchScript, not MPEG transport streams
    ".pt": "application/octet-stream",
    ".md": "text/markdown; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".json": "application/json",
}


def delete_checkpoints(storage: Storage, job_id: str) -> None:
    """Delete an ended job's checkpoints; cleanup only, so a failing store is logged, not raised."""
    try:
        storage.delete_prefix(checkpoint_prefix(job_id))
    except Exception as exc:  # the job's final state is already written
        logger.warning("job %s: could not remove its checkpoints: %s", job_id, exc)


def guess_content_type(name: str) -> str:
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return _CONTENT_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def list_artifacts(*, session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(*, session: Session, job_id: str, name: str) -> Artifact | None:
    return session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))


def record_artifact(
    *, session: Session, job_id: str, name: str, stored: StoredObject, content_type: str | None = None
) -> Artifact:
    """The worker's call after `storage.put_file(keys.artifact_key(job_id, attempt, name), path)`; replaces a
    same-named one.

    Does not commit: record all of a job's artifacts and finish it in one transaction.
    """
    session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    artifact = Artifact(
        job_id=job_id,
        name=name,
        size=stored.size,
        sha256=stored.sha256,
        storage_key=stored.key,
        content_type=content_type or guess_content_type(name),
    )
    session.add(artifact)
    session.flush()
    return artifact
