"""The worker's per-user teacher top-K caches (worker.lm_cache) on a real storage folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kdcore.spec import JobSpec, for_task, parse_spec
from service.settings import Settings
from service.storage import Storage
from worker import lm_cache

SHA = {"teacher": "a" * 64, "train": "b" * 64}


def _spec(**overrides: Any) -> JobSpec:
    raw: dict[str, Any] = {"teacher": {"file": "t"}, "data": {"train": "d"}, "method": {"top_k": 8}}
    raw.update(overrides)
    return for_task(parse_spec(raw), "causal_lm")


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage.from_settings(Settings(data_dir=tmp_path / "data"))


def test_a_written_cache_is_stored_for_its_owner_and_lent_to_their_next_job(storage: Storage, tmp_path: Path) -> None:
    first = lm_cache.lend(storage, _spec(), owner_id="usr_alice", sha256=SHA, folder=tmp_path / "a1")
    assert first is not None and not first.path.exists()
    assert first.object_key.startswith("users/usr_alice/lm_cache/") and first.path.parent == tmp_path / "a1"
    lm_cache.keep(storage, first)  # nothing written: nothing stored
    assert not storage.exists(first.object_key)
    first.path.write_bytes(b"top-k of the teacher")
    lm_cache.keep(storage, first)
    assert storage.exists(first.object_key)

    again = lm_cache.lend(storage, _spec(), owner_id="usr_alice", sha256=SHA, folder=tmp_path / "a2")
    assert again is not None and again.path.read_bytes() == b"top-k of the teacher" and not again.written()
    # Another user's job of the same key finds nothing: the owner is part of the storage key.
    other = lm_cache.lend(storage, _spec(), owner_id="usr_bob", sha256=SHA, folder=tmp_path / "b1")
    assert other is not None and not other.path.exists() and other.path.name == first.path.name


def test_a_refetched_cache_the_engine_rewrote_is_stored_again(storage: Storage, tmp_path: Path) -> None:
    lent = lm_cache.lend(storage, _spec(), owner_id="usr_alice", sha256=SHA, folder=tmp_path / "x")
    assert lent is not None
    lent.path.write_bytes(b"old")
    lm_cache.keep(storage, lent)
    refetched = lm_cache.lend(storage, _spec(), owner_id="usr_alice", sha256=SHA, folder=tmp_path / "y")
    assert refetched is not None
    refetched.path.write_bytes(b"new tokenisation")  # the cached rows did not fit: computed again
    stat = refetched.path.stat()
    os.utime(refetched.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    lm_cache.keep(storage, refetched)
    assert storage.open(refetched.object_key).read() == b"new tokenisation"


@pytest.mark.parametrize("overrides", [
    {"method": {"top_k": 0}},
    {"stages": {"teacher_finetune_epochs": 1}},
])
def test_no_cache_is_lent_where_the_engine_shares_none(storage: Storage, tmp_path: Path,
                                                       overrides: dict[str, Any]) -> None:
    assert lm_cache.lend(storage, _spec(**overrides), owner_id="usr_alice", sha256=SHA, folder=tmp_path) is None


def test_the_key_follows_the_data_and_k(storage: Storage, tmp_path: Path) -> None:
    keys = set()
    for spec, sha in ((_spec(), SHA), (_spec(method={"top_k": 16}), SHA), (_spec(), {**SHA, "train": "c" * 64}),
                      (_spec(), {**SHA, "test": "d" * 64})):
        lent = lm_cache.lend(storage, spec, owner_id="usr_alice", sha256=sha, folder=tmp_path)
        assert lent is not None
        keys.add(lent.object_key)
    assert len(keys) == 4
