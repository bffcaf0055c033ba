"""Uploads: streamed, hashed, checked without torch, limited; list, read, download, delete."""

from __future__ import annotations

import hashlib

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import File, FilePurpose, JobState
from service.settings import Settings
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Account


def _upload(client: TestClient, account: Account, content: bytes, purpose: str = "dataset", name: str = "data.npz"):  # type: ignore[no-untyped-def]
    return client.post("/v1/files", headers=account.headers, files={"file": (name, content)}, data={"purpose": purpose})


def _stored_keys(storage: Storage) -> list[str]:
    return storage.list("users/")


def test_create_file_dataset_201(client: TestClient, alice: Account, storage: Storage) -> None:
    content = factories.npz_bytes()
    response = _upload(client, alice, content)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["size"] == len(content) and body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["purpose"] == "dataset" and body["name"] == "data.npz"
    assert body["info"]["num_classes"] == 10 and body["info"]["sample_shape"] == [28, 28]
    assert response.headers["location"] == f"/v1/files/{body['id']}"
    assert _stored_keys(storage) == [f"users/{alice.user.id}/files/{body['id']}"]


def test_create_file_teacher_201_with_format(client: TestClient, alice: Account) -> None:
    response = _upload(client, alice, factories.safetensors_bytes(outputs=7), "teacher", "t.safetensors")
    assert response.status_code == 201, response.text
    assert response.json()["info"]["format"] == "safetensors"
    assert response.json()["info"]["output_size"] == 7


def test_create_file_bad_dataset_422_nothing_stored(
    client: TestClient, alice: Account, storage: Storage, session: Session
) -> None:
    response = _upload(client, alice, b"this is not an npz")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "bad_file" and error["field"] == "file" and "dataset" in error["message"]
    assert _stored_keys(storage) == []
    assert not any(storage.spool_dir.iterdir())
    assert session.scalar(select(func.count()).select_from(File)) == 0


def test_create_file_bad_teacher_422(client: TestClient, alice: Account) -> None:
    response = _upload(client, alice, b"\x00" * 64, "teacher", "model.bin")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "bad_file"


def test_create_file_too_large_413_nothing_left(
    client: TestClient, alice: Account, storage: Storage, settings: Settings
) -> None:
    response = _upload(client, alice, b"x" * (settings.max_upload_bytes + 1))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    assert _stored_keys(storage) == [] and not any(storage.spool_dir.iterdir())


def test_create_file_over_quota_413(
    client: TestClient, alice: Account, session: Session, storage: Storage, settings: Settings
) -> None:
    factories.make_file(session, storage, alice.user, content=b"x" * (settings.user_quota_bytes - 1000))
    response = _upload(client, alice, factories.npz_bytes())
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "quota_exceeded"
    assert "quota" in response.json()["error"]["message"]


def test_create_file_missing_purpose_422(client: TestClient, alice: Account) -> None:
    response = client.post("/v1/files", headers=alice.headers, files={"file": ("d.npz", factories.npz_bytes())})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "purpose"


def test_create_file_bad_purpose_422(client: TestClient, alice: Account) -> None:
    response = _upload(client, alice, factories.npz_bytes(), purpose="weights")
    assert response.status_code == 422 and response.json()["error"]["field"] == "purpose"


def test_create_file_missing_file_part_422(client: TestClient, alice: Account) -> None:
    response = client.post(
        "/v1/files", headers=alice.headers, data={"purpose": "dataset"}, files={"other": ("x", b"1")}
    )
    assert response.status_code == 422 and response.json()["error"]["field"] == "file"


def test_create_file_not_multipart_422(client: TestClient, alice: Account) -> None:
    response = client.post("/v1/files", headers=alice.headers, json={"purpose": "dataset"})
    assert response.status_code == 422


def test_create_file_truncated_body_400(client: TestClient, alice: Account, storage: Storage) -> None:
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="d.npz"\r\n\r\n' + b"x" * 1000
    response = client.post(
        "/v1/files", headers={**alice.headers, "Content-Type": "multipart/form-data; boundary=b"}, content=body
    )
    assert response.status_code == 400
    assert _stored_keys(storage) == [] and not any(storage.spool_dir.iterdir())


def test_list_files_newest_first_paginated(
    client: TestClient, alice: Account, session: Session, storage: Storage
) -> None:
    rows = [factories.make_file(session, storage, alice.user) for _ in range(3)]
    teacher = factories.make_file(session, storage, alice.user, FilePurpose.TEACHER)
    first = client.get("/v1/files", headers=alice.headers, params={"limit": 2}).json()
    assert [item["id"] for item in first["items"]] == [teacher.id, rows[2].id]
    second = client.get("/v1/files", headers=alice.headers, params={"limit": 2, "cursor": first["next_cursor"]})
    assert [item["id"] for item in second.json()["items"]] == [rows[1].id, rows[0].id]
    assert second.json()["next_cursor"] is None
    teachers = client.get("/v1/files", headers=alice.headers, params={"purpose": "teacher"}).json()
    assert [item["id"] for item in teachers["items"]] == [teacher.id]


def test_get_file_200(client: TestClient, alice: Account, session: Session, storage: Storage) -> None:
    row = factories.make_file(session, storage, alice.user, content=b"abc")
    body = client.get(f"/v1/files/{row.id}", headers=alice.headers).json()
    assert body["id"] == row.id and body["size"] == 3


def test_download_file_round_trip(client: TestClient, alice: Account) -> None:
    content = factories.npz_bytes()
    file_id = _upload(client, alice, content).json()["id"]
    response = client.get(f"/v1/files/{file_id}/content", headers=alice.headers)
    assert response.status_code == 200 and response.content == content
    assert response.headers["x-checksum-sha256"] == hashlib.sha256(content).hexdigest()
    assert response.headers["content-length"] == str(len(content))


def test_delete_file_204_removes_bytes(client: TestClient, alice: Account, session: Session, storage: Storage) -> None:
    row = factories.make_file(session, storage, alice.user)
    assert client.delete(f"/v1/files/{row.id}", headers=alice.headers).status_code == 204
    assert client.get(f"/v1/files/{row.id}", headers=alice.headers).status_code == 404
    assert not storage.exists(row.storage_key)


def test_delete_file_used_by_running_job_409(
    client: TestClient, alice: Account, session: Session, storage: Storage
) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.RUNNING)
    teacher_id = job.spec["teacher"]["file"]
    response = client.delete(f"/v1/files/{teacher_id}", headers=alice.headers)
    assert response.status_code == 409 and response.json()["error"]["code"] == "file_in_use"


def test_delete_file_used_by_finished_job_204(
    client: TestClient, alice: Account, session: Session, storage: Storage
) -> None:
    job = factories.make_job(session, storage, alice.user, job_state=JobState.SUCCEEDED)
    assert client.delete(f"/v1/files/{job.spec['teacher']['file']}", headers=alice.headers).status_code == 204


def _onnx_zip_bytes(tmp_path) -> bytes:  # type: ignore[no-untyped-def]
    """A 4 -> 3 linear ONNX model whose weights live in a data file, zipped together (as torch exports them)."""
    import io
    import zipfile

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "weight"], ["logits"])], "linear",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [weight])
    onnx.save_model(helper.make_model(graph), str(tmp_path / "teacher.onnx"), save_as_external_data=True,
                    location="teacher.onnx.data", size_threshold=0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("teacher.onnx", "teacher.onnx.data"):
            archive.write(tmp_path / name, name)
    return buffer.getvalue()


def test_create_file_onnx_with_external_data_as_zip_201(client: TestClient, alice: Account, tmp_path) -> None:  # type: ignore[no-untyped-def]
    response = _upload(client, alice, _onnx_zip_bytes(tmp_path), "teacher", "teacher.zip")
    assert response.status_code == 201, response.text
    info = response.json()["info"]
    assert info["format"] == "onnx" and info["output_size"] == 3
    assert info["onnx"]["parameters"] == 12 and info["onnx"]["data_members"] == ["teacher.onnx.data"]


def test_create_file_dataset_as_teacher_422_says_so(client: TestClient, alice: Account) -> None:
    response = _upload(client, alice, factories.npz_bytes(), "teacher", "data.npz")
    assert response.status_code == 422
    assert "this looks like a dataset" in response.json()["error"]["message"]
