"""API keys: required on /v1, checked against the stored hash, revocable; health stays open."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service import users
from service.models import ApiKey, User, utcnow
from service.security import generate_key, parse_key
from tests.api.conftest import Account


def test_list_jobs_without_key_401(client: TestClient) -> None:
    response = client.get("/v1/jobs")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"
    assert response.headers["www-authenticate"] == "Bearer"


def test_list_jobs_malformed_key_401(client: TestClient) -> None:
    response = client.get("/v1/jobs", headers={"Authorization": "Bearer not-a-key"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_list_jobs_wrong_secret_401(client: TestClient, alice: Account) -> None:
    lookup_id = parse_key(alice.key)
    forged = f"dk_{lookup_id}_{generate_key().plaintext.rsplit('_', 1)[1]}"
    response = client.get("/v1/jobs", headers={"Authorization": f"Bearer {forged}"})
    assert response.status_code == 401


def test_list_jobs_valid_key_200_and_last_used(client: TestClient, alice: Account, session: Session) -> None:
    response = client.get("/v1/jobs", headers=alice.headers)
    assert response.status_code == 200
    session.expire_all()
    key = session.get_one(ApiKey, parse_key(alice.key))
    assert key.last_used_at is not None and key.last_used_at <= utcnow()


def test_list_jobs_revoked_key_401(client: TestClient, alice: Account, session: Session) -> None:
    assert users.revoke_key(session=session, key_id=alice.key)
    response = client.get("/v1/jobs", headers=alice.headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "api_key_revoked"


def test_list_jobs_disabled_user_403(client: TestClient, alice: Account, session: Session) -> None:
    session.get_one(User, alice.user.id).disabled_at = utcnow()
    session.commit()
    assert client.get("/v1/jobs", headers=alice.headers).status_code == 403


def test_create_key_stores_only_hash(session: Session, alice: Account) -> None:
    key = session.get_one(ApiKey, parse_key(alice.key))
    assert alice.key not in key.secret_hash and len(key.secret_hash) == 64
    secret = alice.key.rsplit("_", 1)[1]
    assert len(secret) * 5 >= 128  # base32: 5 bits a character


def test_get_health_routes_open(client: TestClient) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_every_v1_operation_requires_auth(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v1"):
                assert operation.get("security"), f"{method} {path} is not authenticated"
                url = path.replace("{job_id}", "job_x").replace("{file_id}", "file_x").replace("{name}", "a")
                assert client.request(method, url).status_code == 401, f"{method} {path}"
            else:
                assert not operation.get("security"), f"{method} {path} should be open"


def test_list_jobs_revoked_key_401_at_once_without_cache(
    app,
    alice: Account,
    session: Session,  # type: ignore[no-untyped-def]
    settings,
) -> None:
    app.state.auth_cache.ttl_seconds = 0
    with TestClient(app) as client:
        assert client.get("/v1/jobs", headers=alice.headers).status_code == 200
        users.revoke_key(session=session, key_id=alice.key)
        assert client.get("/v1/jobs", headers=alice.headers).status_code == 401


def test_auth_cache_skips_key_lookup(client: TestClient, alice: Account, app) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/v1/jobs", headers=alice.headers).status_code == 200
    assert app.state.auth_cache.get(alice.key).id == alice.user.id
