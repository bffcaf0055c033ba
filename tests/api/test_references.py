"""Files by reference: a file under an operator-allowed prefix is copied in and checked like an upload."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.deps import get_settings
from service.models import File, UploadReservation
from service.settings import Settings
from service.storage import Storage
from tests.api import factories
from tests.api.conftest import Account


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cluster-models"
    folder.mkdir()
    (folder / "data.npz").write_bytes(factories.npz_bytes())
    (folder / "junk.npz").write_bytes(b"not a dataset")
    (tmp_path / "secret.npz").write_bytes(factories.npz_bytes())
    (folder / "escape.npz").symlink_to(tmp_path / "secret.npz")
    return folder


@pytest.fixture
def allowing(app: FastAPI, settings: Settings, models_dir: Path) -> Settings:
    allowed = settings.model_copy(update={"reference_prefixes": [f"{models_dir}/"]})
    app.dependency_overrides[get_settings] = lambda: allowed
    return allowed


def _add(client: TestClient, account: Account, url: str, purpose: str = "dataset"):  # type: ignore[no-untyped-def]
    return client.post("/v1/files/by-reference", headers=account.headers, json={"url": url, "purpose": purpose})


def test_a_file_under_an_allowed_prefix_is_copied_in_and_checked(
        client: TestClient, alice: Account, allowing: Settings, models_dir: Path, storage: Storage,
        session: Session) -> None:
    response = _add(client, alice, f"file://{models_dir}/data.npz")
    assert response.status_code == 201, response.text
    body = response.json()
    content = (models_dir / "data.npz").read_bytes()
    assert body["name"] == "data.npz" and body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["info"]["num_classes"] == 10
    assert storage.list("users/") == [f"users/{alice.user.id}/files/{body['id']}"]
    assert session.scalar(select(func.count()).select_from(UploadReservation)) == 0


@pytest.mark.parametrize(("url", "code"), [
    ("{tmp}/secret.npz", "reference_not_allowed"),                 # outside every prefix
    ("{models}/../secret.npz", "reference_not_allowed"),           # .. out of the prefix
    ("{models}/escape.npz", "reference_not_allowed"),              # a symlink out of the prefix
    ("{models}/missing.npz", "no_such_file"),
    ("s3://models/teacher.zip", "reference_not_allowed"),
])
def test_a_reference_outside_the_prefixes_is_refused(client: TestClient, alice: Account, allowing: Settings,
                                                     models_dir: Path, url: str, code: str) -> None:
    response = _add(client, alice, url.format(tmp=models_dir.parent, models=models_dir))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["field"] == "url"


def test_a_bad_referenced_file_is_a_422_and_nothing_is_kept(
        client: TestClient, alice: Account, allowing: Settings, models_dir: Path, storage: Storage,
        session: Session) -> None:
    response = _add(client, alice, f"{models_dir}/junk.npz")
    assert response.status_code == 422 and response.json()["error"]["code"] == "bad_file"
    assert storage.list("users/") == []
    assert session.scalar(select(func.count()).select_from(File)) == 0
    assert session.scalar(select(func.count()).select_from(UploadReservation)) == 0


def test_references_are_off_unless_the_operator_names_prefixes(client: TestClient, alice: Account,
                                                               models_dir: Path) -> None:
    response = _add(client, alice, f"{models_dir}/data.npz")
    assert response.status_code == 422 and response.json()["error"]["code"] == "references_disabled"
