"""Where everything lives in the store: one key layout for inputs, checkpoints and artifacts.

    users/<user id>/files/<file id>                        an upload (teacher or dataset)
    users/<user id>/lm_cache/<key>.safetensors             a causal LM teacher's top-K, by content key
    jobs/<job id>/checkpoints/checkpoint.pt                the latest checkpoint of a running job
    jobs/<job id>/artifacts/attempt-<n>/<name>             what attempt n produced

Artifacts are kept per attempt so two runs of one job never write the same object; the job's
artifact rows say which attempt's objects are current. Everything of a job sits under
`job_prefix`, so deleting a job removes it all.
"""

from __future__ import annotations

from service.storage import check_key

CHECKPOINT_NAME = "checkpoint.pt"


def upload_key(owner_id: str, file_id: str) -> str:
    return check_key(f"users/{owner_id}/files/{file_id}")


def lm_cache_key(owner_id: str, content_key: str) -> str:
    """One user's teacher top-K cache: shared by that user's jobs of the same content key, never by another's."""
    return check_key(f"users/{owner_id}/lm_cache/{content_key}.safetensors")


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def checkpoint_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}checkpoints/"


def checkpoint_key(job_id: str) -> str:
    return check_key(checkpoint_prefix(job_id) + CHECKPOINT_NAME)


def artifact_prefix(job_id: str, attempt: int) -> str:
    return f"{job_prefix(job_id)}artifacts/attempt-{attempt}/"


def artifact_key(job_id: str, attempt: int, name: str) -> str:
    return check_key(artifact_prefix(job_id, attempt) + name)


def teacher_cache_key(job_id: str) -> str:
    """A tuned job's teacher logits, computed once by the parent and read by its trials and full run."""
    return check_key(f"{job_prefix(job_id)}teacher_cache.pt")


def upload_part_prefix(owner_id: str, upload_id: str) -> str:
    return f"users/{owner_id}/partial/{upload_id}/"


def upload_part_key(owner_id: str, upload_id: str, offset: int, nonce: str) -> str:
    # The nonce keeps two racing requests for one offset from writing the same object.
    return check_key(f"{upload_part_prefix(owner_id, upload_id)}{offset:020d}-{nonce}")
