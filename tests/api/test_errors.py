"""One error shape everywhere, FastAPI's own errors included."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.api.conftest import Account


def test_list_jobs_bad_limit_422_names_field(client: TestClient, alice: Account) -> None:
    response = client.get("/v1/jobs", headers=alice.headers, params={"limit": 0})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == "limit"
    assert error["details"][0]["field"] == "limit"


def test_create_job_malformed_json_422(client: TestClient, alice: Account) -> None:
    response = client.post(
        "/v1/jobs", headers={**alice.headers, "Content-Type": "application/json"}, content=b"{not json"
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_create_job_missing_body_422(client: TestClient, alice: Account) -> None:
    response = client.post("/v1/jobs", headers=alice.headers)
    assert response.status_code == 422 and response.json()["error"]["field"] == "body"


def test_get_unknown_route_404_shape(client: TestClient) -> None:
    response = client.get("/v2/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_put_jobs_405_shape(client: TestClient, alice: Account) -> None:
    response = client.put("/v1/jobs", headers=alice.headers)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_unexpected_error_500_shape_with_request_id(app: FastAPI) -> None:
    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("kaboom")

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom", headers={"X-Request-ID": "req-123"})
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal", "message": "internal error; quote the X-Request-ID"}}
    assert response.headers["x-request-id"] == "req-123"


def test_list_jobs_unknown_query_parameter_422(client: TestClient, alice: Account) -> None:
    response = client.get("/v1/jobs", headers=alice.headers, params={"stat": "running"})
    assert response.status_code == 422
    assert response.json()["error"]["field"] == "stat" and "state" in response.json()["error"]["message"]
