"""Resumable uploads over HTTP: parts with offsets, a resume after a cut part, the same checks as any upload."""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import File, UploadReservation, UploadSession
from service.quota import used_bytes
from service.settings import Settings
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Account

PART = {"Content-Type": "application/offset+octet-stream"}


def _start(client: TestClient, account: Account, size: int, name: str = "data.npz",
           purpose: str = "dataset") -> Any:
    return client.post("/v1/uploads", headers=account.headers, json={"name": name, "size": size, "purpose": purpose})


def _part(client: TestClient, account: Account, upload_id: str, offset: int, data: bytes) -> Any:
    return client.patch(f"/v1/uploads/{upload_id}", headers={**account.headers, **PART, "Upload-Offset": str(offset)},
                        content=data)


def _counts(session: Session) -> tuple[int, int, int]:
    session.expire_all()
    return tuple(int(session.scalar(select(func.count()).select_from(model)) or 0)  # type: ignore[return-value]
                 for model in (File, UploadSession, UploadReservation))


def test_a_file_sent_in_parts_is_checked_and_recorded_like_any_upload(
        client: TestClient, alice: Account, session: Session, storage: Storage) -> None:
    content = factories.npz_bytes()
    started = _start(client, alice, len(content))
    assert started.status_code == 201, started.text
    upload_id = started.json()["id"]
    assert started.json()["offset"] == 0 and started.headers["location"] == f"/v1/uploads/{upload_id}"

    cut = len(content) // 3
    first = _part(client, alice, upload_id, 0, content[:cut])
    assert first.status_code == 200 and first.json()["offset"] == cut and first.json()["file"] is None
    assert first.headers["upload-offset"] == str(cut)
    # A part from the wrong offset (a client that lost track) is refused and names where to go on.
    wrong = _part(client, alice, upload_id, cut + 10, content[cut + 10:])
    assert wrong.status_code == 409 and wrong.json()["error"]["field"] == "Upload-Offset"
    assert f"at byte {cut}" in wrong.json()["error"]["message"]
    assert client.get(f"/v1/uploads/{upload_id}", headers=alice.headers).json()["offset"] == cut

    last = _part(client, alice, upload_id, cut, content[cut:])
    assert last.status_code == 201, last.text
    file = last.json()["file"]
    assert file["id"] == upload_id and file["size"] == len(content)
    assert file["sha256"] == hashlib.sha256(content).hexdigest() and file["info"]["num_classes"] == 10
    assert last.headers["location"] == f"/v1/files/{upload_id}"
    download = client.get(f"/v1/files/{upload_id}/content", headers=alice.headers)
    assert download.content == content
    # The parts and the session are gone; the file's own bytes are all that is stored.
    assert storage.list("users/") == [f"users/{alice.user.id}/files/{upload_id}"]
    assert _counts(session) == (1, 0, 0)
    assert client.get(f"/v1/uploads/{upload_id}", headers=alice.headers).status_code == 404


def test_a_bad_file_sent_in_parts_is_a_422_and_nothing_is_kept(
        client: TestClient, alice: Account, session: Session, storage: Storage) -> None:
    content = b"not an npz at all " * 100
    upload_id = _start(client, alice, len(content)).json()["id"]
    assert _part(client, alice, upload_id, 0, content[:700]).status_code == 200
    response = _part(client, alice, upload_id, 700, content[700:])
    assert response.status_code == 422 and response.json()["error"]["code"] == "bad_file"
    assert storage.list("users/") == [] and not any(storage.spool_dir.iterdir())
    assert _counts(session) == (0, 0, 0)


def test_the_whole_size_is_held_against_the_quota_from_the_start(
        client: TestClient, alice: Account, session: Session, storage: Storage, settings: Settings) -> None:
    too_big = _start(client, alice, settings.max_upload_bytes + 1)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "file_too_large"
    assert _start(client, alice, 1000).status_code == 201
    assert used_bytes(session=session, owner_id=alice.user.id, settings=settings) == 1000
    factories.make_file(session, storage, alice.user, content=b"x" * (settings.user_quota_bytes - 1500))
    # 1,000 held plus the file leave 500 bytes: a second upload of 1,000 does not fit.
    second = _start(client, alice, 1000)
    assert second.status_code == 413 and second.json()["error"]["code"] == "quota_exceeded"


def test_a_part_past_the_declared_size_is_refused(client: TestClient, alice: Account, storage: Storage) -> None:
    upload_id = _start(client, alice, 100).json()["id"]
    response = _part(client, alice, upload_id, 0, b"x" * 101)
    assert response.status_code == 413 and response.json()["error"]["code"] == "part_too_large"
    assert client.get(f"/v1/uploads/{upload_id}", headers=alice.headers).json()["offset"] == 0
    assert storage.list(f"users/{alice.user.id}/partial/") == []


def test_an_abandoned_upload_frees_its_parts_and_quota(
        client: TestClient, alice: Account, session: Session, storage: Storage, settings: Settings) -> None:
    upload_id = _start(client, alice, 5000).json()["id"]
    assert _part(client, alice, upload_id, 0, b"y" * 2000).status_code == 200
    assert storage.list(f"users/{alice.user.id}/partial/")
    assert client.delete(f"/v1/uploads/{upload_id}", headers=alice.headers).status_code == 204
    assert storage.list("users/") == [] and _counts(session) == (0, 0, 0)
    assert used_bytes(session=session, owner_id=alice.user.id, settings=settings) == 0


def test_a_lapsed_upload_is_gone(client: TestClient, alice: Account, session: Session, storage: Storage,
                                 settings: Settings) -> None:
    from datetime import timedelta

    from service.models import utcnow

    upload_id = _start(client, alice, 5000).json()["id"]
    assert _part(client, alice, upload_id, 0, b"y" * 2000).status_code == 200
    row = session.get(UploadSession, upload_id)
    assert row is not None
    row.updated_at = utcnow() - timedelta(seconds=settings.upload_reservation_seconds + 1)
    session.commit()
    response = _part(client, alice, upload_id, 2000, b"y" * 3000)
    assert response.status_code == 410 and response.json()["error"]["code"] == "upload_expired"
    assert storage.list("users/") == [] and _counts(session) == (0, 0, 0)


def test_uploads_are_private_and_parts_need_their_media_type(
        client: TestClient, alice: Account, mallory: Account) -> None:
    upload_id = _start(client, alice, 100).json()["id"]
    assert client.get(f"/v1/uploads/{upload_id}", headers=mallory.headers).status_code == 404
    assert _part(client, mallory, upload_id, 0, b"x" * 10).status_code == 404
    assert client.delete(f"/v1/uploads/{upload_id}", headers=mallory.headers).status_code == 404
    plain = client.patch(f"/v1/uploads/{upload_id}", headers={**alice.headers, "Upload-Offset": "0",
                                                              "Content-Type": "application/json"}, content=b"{}")
    assert plain.status_code == 415 and plain.json()["error"]["field"] == "Content-Type"
    bad_purpose = client.post("/v1/uploads", headers=alice.headers, json={"name": "x", "size": 1, "purpose": "other"})
    assert bad_purpose.status_code == 422 and bad_purpose.json()["error"]["field"] == "purpose"
