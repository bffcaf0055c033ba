"""causal_lm jobs' teacher top-K caches, kept in storage per user and lent to each attempt.

The engine reads and writes caches in a folder (`RunOptions.lm_cache_dir`), by a content key
(teacher, data, tokenisation, K: `kdcore.lm_cache.cache_key`). The worker gives each attempt a
folder of its own, inside the attempt's scratch, holding at most the one cache its key names,
fetched from `users/<owner>/lm_cache/<key>.safetensors`; a cache the engine wrote there is
stored back under that key. So a user's later job with the same key trains without loading the
teacher, on any worker of the cluster, and no job ever sees another user's cache: the owner is
part of the storage key, and a folder is never shared between attempts.

The key is computed from the sha256 the upload recorded, so the worker does not hash the files
once more to know what to fetch (the engine's own hash then agrees, or it finds nothing and
computes the cache anew).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from kdcore.spec import JobSpec
from service.keys import lm_cache_key
from service.storage import Storage

logger = logging.getLogger("distillery.worker")


@dataclass(frozen=True)
class LentCache:
    folder: Path  # the attempt's lm_cache_dir
    path: Path  # where the engine reads (or writes) this job's cache
    object_key: str  # where it is kept in storage
    fetched_mtime_ns: int | None = None  # the fetched file's; unchanged afterwards means nothing to store

    def written(self) -> bool:
        """The engine wrote the cache in this attempt (none was stored, or the stored one did not fit)."""
        return self.path.exists() and self.path.stat().st_mtime_ns != self.fetched_mtime_ns


def shareable(spec: JobSpec) -> bool:
    """The engine shares a cache only for top-K distillation of a teacher it does not fine-tune first."""
    return spec.task == "causal_lm" and bool(spec.method.top_k) and not spec.stages.teacher_finetune_epochs


def lend(storage: Storage, spec: JobSpec, *, owner_id: str, sha256: Mapping[str, str],
         folder: Path) -> LentCache | None:
    """The attempt's cache folder, with the owner's cache for this job's key in it where one is stored."""
    from kdcore.lm_cache import cache_key  # torch: imported by the jobs that need it

    if not shareable(spec) or "teacher" not in sha256 or "train" not in sha256:
        return None
    key = cache_key(spec, teacher_sha256=sha256["teacher"], train_sha256=sha256["train"],
                    test_sha256=sha256.get("test"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.safetensors"
    try:
        storage.get_file(lm_cache_key(owner_id, key), path)
    except FileNotFoundError:
        return LentCache(folder=folder, path=path, object_key=lm_cache_key(owner_id, key))
    logger.info("teacher top-K cache %s found (%d bytes)", key[:12], path.stat().st_size)
    return LentCache(folder=folder, path=path, object_key=lm_cache_key(owner_id, key),
                     fetched_mtime_ns=path.stat().st_mtime_ns)


def keep(storage: Storage, lent: LentCache | None) -> None:
    """Store a cache the engine wrote in this attempt, for the owner's next job (a retry of this one too)."""
    if lent is None or not lent.written():
        return
    try:
        storage.put_file(lent.object_key, lent.path)
    except Exception as exc:  # the job's own result does not depend on it: the next job computes it again
        logger.warning("could not store the teacher top-K cache: %s", exc)
        return
    logger.info("teacher top-K cache stored (%d bytes)", lent.path.stat().st_size)
