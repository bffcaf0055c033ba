"""The browser interface in process: sign-in, the session cookie, CSRF, and what every page shows."""

from __future__ import annotations

import hashlib
import io
import json
import re
from typing import Any

from service import state
from service.artifacts import record_artifact
from service.models import File, FilePurpose, Job, JobState
from service.users import get_user_by_name, revoke_key
from tests.api import factories
from tests.web.conftest import WebApp, csrf_from, make_person, sign_in

METRICS = {
    "teacher": {"accuracy": 0.95, "top5": 1.0, "loss": 0.2, "params": 110_000, "size_mb": 0.44, "latency_ms": 0.3,
                "per_class_accuracy": [0.9, 1.0]},
    "student": {"accuracy": 0.93, "top5": 1.0, "loss": 0.25, "params": 11_000, "size_mb": 0.044, "latency_ms": 0.1,
                "per_class_accuracy": [0.9, 0.96]},
    "baseline": {"accuracy": 0.9, "top5": 1.0, "loss": 0.3, "params": 11_000, "size_mb": 0.044, "latency_ms": 0.1,
                 "per_class_accuracy": [0.85, 0.95]},
    "agreement": 0.97,
    "compression": 10.0,
    "speedup": 3.0,
    "distillation_gain": 0.03,
    "eval_split": "test split",
    "eval_samples": 200,
    "class_names": ["cat", "dog"],
}


def _succeeded_job(web: WebApp, owner_name: str = "alice") -> tuple[Job, bytes]:
    with web.session_factory() as session:
        owner = get_user_by_name(session=session, name=owner_name)
        assert owner is not None
        job = factories.make_job(session, web.storage, owner, job_state=JobState.RUNNING)
        for epoch in (1, 2):
            training = {"stage": "distill", "epoch": epoch, "epochs": 2, "train_loss": 1.0 / epoch,
                        "val_loss": 1.2 / epoch, "train_accuracy": 0.5 * epoch, "val_accuracy": 0.45 * epoch}
            state.record_progress(session, job.id, "worker-1", stage="distill",
                                  progress={"fraction": epoch / 2, "epoch": epoch, "epochs": 2, "eta_s": 3.0},
                                  metrics={"training": training})
        state.record_progress(session, job.id, "worker-1", metrics=METRICS)
        content = b"student-weights" * 50
        stored = web.storage.put_bytes(f"jobs/{job.id}/artifacts/student.safetensors", content)
        record_artifact(session=session, job_id=job.id, name="student.safetensors", stored=stored)
        state.finish(session, job.id, "worker-1", state=JobState.SUCCEEDED)
        session.commit()
        session.refresh(job)
        return job, content


def _form(csrf: str, teacher_id: str, train_id: str, **changes: str) -> dict[str, str]:
    data = {
        "csrf_token": csrf,
        "teacher.file": teacher_id,
        "teacher.format": "auto",
        "teacher.arch": "mlp",
        "teacher.args.mlp.hidden": "32",
        "teacher.args.mlp.dropout": "0",
        "teacher.args.mlp.activation": "relu",
        "data.train": train_id,
        "student.arch": "mlp",
        "student.args.mlp.hidden": "16",
        "student.args.mlp.dropout": "0",
        "student.args.mlp.activation": "relu",
        "method.name": "kd",
        "method.temperature": "4",
        "method.alpha": "0.9",
        "stages.distill_epochs": "2",
        "stages.teacher_finetune_epochs": "0",
        "stages.finetune_epochs": "0",
        "optim.name": "adamw",
        "optim.lr": "0.001",
        "batch_size": "32",
        "precision": "fp32",
        "export": "onnx",
        "quantize": "none",
        "idempotency_key": "form-1",
    }
    data.update(changes)
    return data


def _files(web: WebApp, owner_name: str) -> tuple[str, str]:
    with web.session_factory() as session:
        owner = get_user_by_name(session=session, name=owner_name)
        assert owner is not None
        teacher = factories.make_file(session, web.storage, owner, FilePurpose.TEACHER, name="teacher.safetensors")
        train = factories.make_file(session, web.storage, owner, FilePurpose.DATASET, name="mnist.npz")
        return teacher.id, train.id


def test_pages_redirect_to_sign_in(web: WebApp) -> None:
    response = web.client.get("/web/jobs?state=running", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/web/login?next=/web/jobs%3Fstate%3Drunning"
    assert web.client.get("/", follow_redirects=False).headers["location"] == "/web/login"
    assert web.client.post("/web/files", headers={"X-CSRF-Token": "x"}).status_code in (401, 403)


OPEN_PAGES = {("GET", "/"), ("GET", "/web"), ("GET", "/web/login"), ("POST", "/web/login"), ("POST", "/web/logout")}


def test_every_page_but_the_open_ones_needs_a_session(web: WebApp) -> None:
    from fastapi.routing import APIRoute

    from api.web import views

    def pages(router: Any) -> set[tuple[str, str]]:
        return {(method, route.path) for route in router.routes if isinstance(route, APIRoute)
                for method in route.methods}

    assert pages(views.open_router) == OPEN_PAGES
    guarded = pages(views.router)
    assert guarded & OPEN_PAGES == set()
    assert len(guarded) >= 10
    for method, path in sorted(guarded):
        url = re.sub(r"\{[^}]+\}", "job_x", path)
        response = web.client.request(method, url, headers={"X-CSRF-Token": "x"} if method == "POST" else {},
                                      follow_redirects=False)
        # A page redirects to the sign-in form; what scripts call (posts, streams) gets a 401.
        assert response.status_code in (303, 401), (method, path)
        if response.status_code == 303:
            assert method == "GET" and response.headers["location"].startswith("/web/login?next="), (method, path)
        else:
            assert response.json()["error"]["code"] == "unauthenticated", (method, path)


def test_sign_in_with_a_bad_key_says_so(web: WebApp) -> None:
    make_person(web, "alice")
    token = csrf_from(web.client.get("/web/login").text)
    response = web.client.post("/web/login", data={"api_key": "dk_nope", "csrf_token": token, "next": ""})
    assert response.status_code == 200  # the form again, with the error by the field
    assert 'id="api-key-error" role="alert">That API key is not valid' in response.text
    assert web.client.get("/web/jobs", follow_redirects=False).status_code == 303


def test_sign_in_sets_a_signed_httponly_lax_cookie_without_the_key(web: WebApp) -> None:
    alice = make_person(web, "alice")
    token = csrf_from(web.client.get("/web/login").text)
    response = web.client.post("/web/login", data={"api_key": alice.key, "csrf_token": token, "next": "/web/jobs/new"},
                               follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/web/jobs/new"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("distillery_session=") and "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert alice.key not in cookie and alice.key.split("_")[-1] not in cookie
    page = web.client.get("/web/jobs")
    assert page.status_code == 200 and "alice" in page.text
    assert csrf_from(page.text) != token  # a new session, a new token
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_forged_cookie_is_ignored(web: WebApp) -> None:
    web.client.cookies.set("distillery_session", "eyJ1IjoidXNlcl94In0.forged.sig")
    assert web.client.get("/web/jobs", follow_redirects=False).status_code == 303


def test_posts_without_the_csrf_token_are_refused(web: WebApp) -> None:
    alice = make_person(web, "alice")
    assert web.client.post("/web/login", data={"api_key": alice.key}).status_code == 403
    token = sign_in(web.client, alice.key)
    assert web.client.post("/web/jobs/preview", data={}).status_code == 403
    assert web.client.post("/web/jobs/preview", data={"csrf_token": "wrong"}).status_code == 403
    assert web.client.post("/web/logout", data={"csrf_token": token},
                           headers={"Origin": "https://evil.example"}).status_code == 403
    assert web.client.post("/web/jobs/preview", data={"csrf_token": token}).status_code == 200
    upload = web.client.post("/web/files", files={"file": ("x.npz", b"x")}, data={"purpose": "dataset"})
    assert upload.status_code == 403 and upload.json()["error"]["code"] == "csrf_failed"


def test_sign_in_never_redirects_off_site(web: WebApp) -> None:
    alice = make_person(web, "alice")
    token = csrf_from(web.client.get("/web/login").text)
    response = web.client.post("/web/login", data={"api_key": alice.key, "csrf_token": token,
                                                   "next": "//evil.example/x"}, follow_redirects=False)
    assert response.headers["location"] == "/web/jobs"


def test_sign_out_and_revocation_end_the_session(web: WebApp) -> None:
    alice = make_person(web, "alice")
    token = sign_in(web.client, alice.key)
    response = web.client.post("/web/logout", data={"csrf_token": token}, follow_redirects=False)
    assert response.headers["location"] == "/web/login"
    assert web.client.get("/web/jobs", follow_redirects=False).status_code == 303

    sign_in(web.client, alice.key)
    with web.session_factory() as session:
        assert revoke_key(session=session, key_id=alice.key)
    assert web.client.get("/web/jobs", follow_redirects=False).status_code == 303


def test_jobs_list_is_newest_first_paginated_and_filtered(web: WebApp) -> None:
    alice = make_person(web, "alice")
    with web.session_factory() as session:
        made = [factories.make_job(session, web.storage, alice.user,
                                   job_state=JobState.CANCELLED if i % 5 == 0 else JobState.QUEUED).id
                for i in range(23)]
    sign_in(web.client, alice.key)
    first = web.client.get("/web/jobs").text
    ids = re.findall(r'data-job-id="([^"]+)"', first)
    assert ids == sorted(made, reverse=True)[:20]
    assert 'hx-trigger="every 3s"' in first  # queued jobs: the table refreshes itself
    older = re.search(r'href="(/web/jobs\?cursor=[^"]+)"', first)
    assert older
    second = web.client.get(older.group(1).replace("&amp;", "&")).text
    assert re.findall(r'data-job-id="([^"]+)"', second) == sorted(made, reverse=True)[20:]

    cancelled = web.client.get("/web/jobs?state=cancelled").text
    assert re.findall(r'data-job-id="([^"]+)"', cancelled) == sorted(made[::5], reverse=True)
    assert "every 3s" not in cancelled
    fragment = web.client.get("/web/jobs", headers={"HX-Request": "true", "HX-Target": "jobs-table"}).text
    assert fragment.lstrip().startswith('<div id="jobs-table"')


def test_another_users_job_is_not_found(web: WebApp) -> None:
    make_person(web, "alice")
    mallory = make_person(web, "mallory")
    job, _ = _succeeded_job(web, "alice")
    sign_in(web.client, mallory.key)
    for path in (f"/web/jobs/{job.id}", f"/web/jobs/{job.id}/results",
                 f"/web/jobs/{job.id}/artifacts/student.safetensors", f"/web/jobs/new?from={job.id}"):
        response = web.client.get(path)
        assert response.status_code == 404, path
        assert "There is no job" in response.text


def test_form_submits_a_job_with_the_api_services(web: WebApp) -> None:
    alice = make_person(web, "alice")
    token = sign_in(web.client, alice.key)
    teacher_id, train_id = _files(web, "alice")
    response = web.client.post("/web/jobs", data=_form(token, teacher_id, train_id, **{"stages.baseline": "true"}),
                               follow_redirects=False)
    assert response.status_code == 303, response.text
    job_id = response.headers["location"].rsplit("/", 1)[-1]
    with web.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.QUEUED
        assert job.spec["stages"]["baseline"] is True and job.spec["teacher"]["arch_args"]["hidden"] == [32]
        assert job.spec["export"] == ["onnx"]
    again = web.client.post("/web/jobs", data=_form(token, teacher_id, train_id, **{"stages.baseline": "true"}),
                            follow_redirects=False)
    assert again.headers["location"].endswith(job_id)  # the same idempotency key: the same job


def test_bad_values_come_back_by_their_fields_as_typed(web: WebApp) -> None:
    alice = make_person(web, "alice")
    token = sign_in(web.client, alice.key)
    teacher_id, train_id = _files(web, "alice")
    response = web.client.post("/web/jobs", data=_form(token, teacher_id, train_id, **{
        "method.temperature": "-1", "student.args.mlp.hidden": "16, x", "batch_size": "0"}))
    assert response.status_code == 200 and "The job was not submitted" in response.text
    page = response.text
    assert re.search(r'id="f-method-temperature-error">[^<]*greater than 0', page)
    assert re.search(r'id="f-batch_size-error">[^<]*greater than or equal to 1', page)
    assert re.search(r'id="f-student-args-mlp-hidden-error">item 2:', page)
    assert 'value="-1"' in page and 'value="16, x"' in page
    assert f'<option value="{teacher_id}" selected' in page


def test_api_errors_land_on_their_field(web: WebApp) -> None:
    alice = make_person(web, "alice")
    token = sign_in(web.client, alice.key)
    _, train_id = _files(web, "alice")
    response = web.client.post("/web/jobs", data=_form(token, train_id, train_id))  # a dataset as the teacher
    assert response.status_code == 200 and "The job was not submitted" in response.text
    assert re.search(r'id="f-teacher-file-error">[^<]*uploaded as a dataset', response.text)


def test_upload_through_the_session_is_the_apis_upload(web: WebApp) -> None:
    alice = make_person(web, "alice")
    token = sign_in(web.client, alice.key)
    content = factories.npz_bytes()
    response = web.client.post("/web/files", files={"file": ("digits.npz", io.BytesIO(content))},
                               data={"purpose": "dataset"}, headers={"X-CSRF-Token": token})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["sha256"] == hashlib.sha256(content).hexdigest() and body["info"]["num_classes"] == 10
    listed = web.client.get("/v1/files", headers={"Authorization": f"Bearer {alice.key}"}).json()
    assert [f["id"] for f in listed["items"]] == [body["id"]]
    bad = web.client.post("/web/files", files={"file": ("bad.npz", b"not a zip")}, data={"purpose": "dataset"},
                          headers={"X-CSRF-Token": token})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_file"


def test_finished_job_page_shows_comparison_charts_curves_and_artifacts(web: WebApp) -> None:
    alice = make_person(web, "alice")
    job, content = _succeeded_job(web)
    sign_in(web.client, alice.key)
    page = web.client.get(f"/web/jobs/{job.id}").text
    assert 'id="comparison"' in page
    for text in ("93.0%", "90.0%", "97.0%", "10.00×", "3.00×", "Distillation helped", "Accuracy per class",
                 "Download student.safetensors", "Distillation epoch 2/2"):
        assert text in page, text
    embedded = re.search(r'<script type="application/json" id="job-data">(.*?)</script>', page, re.S)
    assert embedded
    data = json.loads(embedded[1])
    assert [point["epoch"] for point in data["curves"]] == [1, 2] and data["finished"] is True

    download = web.client.get(f"/web/jobs/{job.id}/artifacts/student.safetensors")
    assert download.status_code == 200 and download.content == content
    assert download.headers["x-checksum-sha256"] == hashlib.sha256(content).hexdigest()

    fragment = web.client.get(f"/web/jobs/{job.id}/results").text
    assert 'hx-swap-oob="true"' in fragment and 'id="comparison"' in fragment


def test_event_stream_sends_log_lines_and_curve_points(web: WebApp) -> None:
    alice = make_person(web, "alice")
    job, _ = _succeeded_job(web)
    sign_in(web.client, alice.key)
    with web.client.stream("GET", f"/web/jobs/{job.id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = "".join(response.iter_text())
    events = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert events[0]["kind"] == "state" and events[0]["line"]["text"] == "Queued"
    points = [event["point"] for event in events if event["point"]]
    assert [point["epoch"] for point in points] == [1, 2] and points[1]["val_accuracy"] == 0.9
    assert events[-1]["data"]["state"] == "succeeded" and events[-1]["line"]["level"] == "success"

    after = events[-2]
    with web.client.stream("GET", f"/web/jobs/{job.id}/events?after=1", headers={"Last-Event-ID": "2"}) as response:
        resumed = [json.loads(line[6:]) for line in "".join(response.iter_text()).splitlines()
                   if line.startswith("data: ")]
    assert len(resumed) == len(events) - 2 and resumed[-1] == events[-1] and after in resumed


def test_preview_shows_the_spec_as_yaml_and_curl(web: WebApp) -> None:
    alice = make_person(web, "alice")
    token = sign_in(web.client, alice.key)
    teacher_id, train_id = _files(web, "alice")
    page = web.client.post("/web/jobs/preview", data=_form(token, teacher_id, train_id)).text
    assert f"file: {teacher_id}" in page and "distill_epochs: 2" in page
    assert "curl -X POST http://testserver/v1/jobs" in page and "Authorization: Bearer $DISTILLERY_API_KEY" in page
    assert "temperature" not in page  # left at its default: omitted


def test_resubmit_prefills_the_form_from_the_job(web: WebApp) -> None:
    alice = make_person(web, "alice")
    job, _ = _succeeded_job(web)
    sign_in(web.client, alice.key)
    page = web.client.get(f"/web/jobs/new?from={job.id}").text
    assert "Resubmit with changes" in page
    teacher_id = job.spec["teacher"]["file"]
    assert f'<option value="{teacher_id}" selected' in page
    assert re.search(r'id="f-teacher-args-mlp-hidden" name="teacher.args.mlp.hidden" value="32"', page)
    assert re.search(r'id="f-stages-distill_epochs" name="stages.distill_epochs" value="2"', page)


def test_cancel_from_the_page(web: WebApp) -> None:
    alice = make_person(web, "alice")
    with web.session_factory() as session:
        job = factories.make_job(session, web.storage, alice.user)
    token = sign_in(web.client, alice.key)
    response = web.client.post(f"/web/jobs/{job.id}/cancel", data={"csrf_token": token},
                               headers={"HX-Request": "true"})
    assert response.status_code == 200 and 'id="job-actions"' in response.text
    with web.session_factory() as session:
        row = session.get(Job, job.id)
        assert row is not None and row.state == JobState.CANCELLED
    again = web.client.post(f"/web/jobs/{job.id}/cancel", data={"csrf_token": token}, headers={"HX-Request": "true"})
    assert "can no longer be cancelled" in again.text


def test_delete_a_finished_job(web: WebApp) -> None:
    alice = make_person(web, "alice")
    job, _ = _succeeded_job(web)
    token = sign_in(web.client, alice.key)
    response = web.client.post(f"/web/jobs/{job.id}/delete", data={"csrf_token": token}, follow_redirects=False)
    assert response.status_code == 303
    assert web.client.get(f"/web/jobs/{job.id}").status_code == 404


def test_static_assets_are_vendored_and_cacheable(web: WebApp) -> None:
    page = web.client.get("/web/login").text
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        response = web.client.get(asset)
        assert response.status_code == 200, asset
        assert "immutable" in response.headers["cache-control"]
    assert "https://" not in page.split("</head>")[0]  # no CDN


def test_api_docs_load_only_bundled_assets(web: WebApp) -> None:
    for page in ("/docs", "/redoc"):
        response = web.client.get(page)
        assert response.status_code == 200, page
        assert "connect-src 'self'" in response.headers["content-security-policy"]
        assert "https://" not in response.text, f"{page} still names a CDN"
        for asset in re.findall(r'(?:src|href)="([^"]+)"', response.text):
            assert asset.startswith("/docs-assets/"), asset
            fetched = web.client.get(asset)
            assert fetched.status_code == 200 and len(fetched.content) > 1000, asset
    redoc = web.client.get("/docs-assets/redoc.standalone.js").text
    assert "cdn.redoc.ly" not in redoc and "/static/favicon.svg" in redoc


def test_identical_reuploads_are_one_choice_in_the_pickers(web: WebApp) -> None:
    alice = make_person(web, "alice")
    sign_in(web.client, alice.key)
    with web.session_factory() as session:
        owner = get_user_by_name(session=session, name="alice")
        assert owner is not None
        same = [factories.make_file(session, web.storage, owner, FilePurpose.DATASET, name="blobs.npz",
                                    content=b"the same bytes") for _ in range(3)]
        other = factories.make_file(session, web.storage, owner, FilePurpose.DATASET, name="other.npz",
                                    content=b"other bytes")
    page = web.client.get("/web/jobs/new").text
    train_picker = page.split('id="f-data-train"', 1)[1].split("</select>", 1)[0]
    assert train_picker.count("blobs.npz") == 1 and train_picker.count("other.npz") == 1
    assert f'value="{same[-1].id}"' in train_picker  # the newest of the three
    assert f'value="{other.id}"' in train_picker
    # A form that refers to an older copy (a resubmitted job) keeps that one, still once.
    values_page = web.client.get(f"/web/jobs/new?from={_job_using(web, same[0].id)}").text
    picker = values_page.split('id="f-data-train"', 1)[1].split("</select>", 1)[0]
    assert picker.count("blobs.npz") == 1
    assert re.search(rf'value="{same[0].id}"[^>]* selected', picker)


def _job_using(web: WebApp, train_id: str) -> str:
    with web.session_factory() as session:
        owner = get_user_by_name(session=session, name="alice")
        assert owner is not None
        train = session.get_one(File, train_id)
        return factories.make_job(session, web.storage, owner, job_state=JobState.SUCCEEDED, train=train).id


def test_running_job_handed_back_by_a_restart_shows_its_first_attempt(web: WebApp) -> None:
    alice = make_person(web, "alice")
    sign_in(web.client, alice.key)
    with web.session_factory() as session:
        owner = get_user_by_name(session=session, name="alice")
        assert owner is not None
        job = factories.make_job(session, web.storage, owner, job_state=JobState.RUNNING)
        assert state.hand_back(session, job.id, "worker-1", refund_attempt=True)
        session.commit()
        assert session.get_one(Job, job.id).attempts == 0
    page = web.client.get(f"/web/jobs/{job.id}").text
    assert re.search(r'id="job-attempt">1 of \d+<', page)


def _finished_with(web: WebApp, metrics: dict[str, Any], *, owner_name: str = "alice",
                   name: str | None = None, **spec_changes: Any) -> Job:
    with web.session_factory() as session:
        owner = get_user_by_name(session=session, name=owner_name)
        assert owner is not None
        job = factories.make_job(session, web.storage, owner, job_state=JobState.RUNNING)
        spec = json.loads(json.dumps(job.spec))
        for path, value in spec_changes.items():
            *parents, leaf = path.split("__")
            target = spec
            for part in parents:
                target = target.setdefault(part, {})
            target[leaf] = value
        session.get_one(Job, job.id).spec = spec
        session.get_one(Job, job.id).name = name
        session.commit()
        training = {"stage": "distill", "epoch": 1, "epochs": 1, "val_loss": 0.5, "val_accuracy": 0.8}
        state.record_progress(session, job.id, "worker-1", stage="distill",
                              progress={"fraction": 1.0, "epoch": 1, "epochs": 1}, metrics={"training": training})
        state.record_progress(session, job.id, "worker-1", metrics=metrics)
        state.finish(session, job.id, "worker-1", state=JobState.SUCCEEDED)
        session.commit()
        return session.get_one(Job, job.id)


def test_jobs_list_shows_each_result_and_its_gain(web: WebApp) -> None:
    alice = make_person(web, "alice")
    sign_in(web.client, alice.key)
    helped = _finished_with(web, {**METRICS, "distillation_gain_ci": [0.01, 0.05]}, name="helped")
    noisy = _finished_with(web, {**METRICS, "distillation_gain": -0.004, "distillation_gain_ci": [-0.02, 0.01],
                                 "distillation_gain_within_noise": True}, name="noisy")
    lm = _finished_with(web, {"task": "causal_lm", "student": {"perplexity": 12.345, "loss": 2.5},
                              "distillation_gain": 0.0412}, name="lm")
    page = web.client.get("/web/jobs").text
    assert '<th scope="col">Result</th>' in page

    def cell(job: Job) -> str:
        row = page.split(f'data-job-id="{job.id}"', 1)[1].split("</tr>", 1)[0]
        return row.split('class="result-cell">', 1)[1].split("</td>", 1)[0]

    assert "93.0%" in cell(helped) and 'gain-success">+3.0 pts' in cell(helped)
    assert "93.0%" in cell(noisy) and 'gain-muted">−0.4 pts' in cell(noisy) and "within noise" in cell(noisy)
    assert "ppl 12.3" in cell(lm) and "+0.041 nats/token" in cell(lm)
    assert page.count('form="compare-form" name="ids"') == 3


def test_compare_two_jobs_shows_the_differing_fields_and_both_results(web: WebApp) -> None:
    alice = make_person(web, "alice")
    sign_in(web.client, alice.key)
    first = _finished_with(web, METRICS, name="t2", method__temperature=2.0)
    worse = {**METRICS, "student": {**METRICS["student"], "accuracy": 0.81}, "distillation_gain": -0.09,
             "warnings": ["the student is not faster than its teacher"]}
    second = _finished_with(web, worse, name="t8", method__temperature=8.0)
    response = web.client.get(f"/web/compare?ids={first.id},{second.id}")
    assert response.status_code == 200, response.text
    page = response.text
    differences = page.split('id="spec-differences"', 1)[1].split("</table>", 1)[0]
    assert 'data-path="method.temperature"' in differences
    assert "2.0" in differences and "8.0" in differences
    assert 'data-path="method.alpha"' not in differences  # the same in both: not listed
    assert "teacher.bin (file_" in differences  # each job's own upload, by name
    figures = page.split('id="figures"', 1)[1].split("</table>", 1)[0]
    assert "93.0%" in figures and "81.0%" in figures and "Student accuracy" in figures
    assert "The student is not faster than its teacher" in page
    charts = json.loads(page.split('id="compare-data">', 1)[1].split("</script>", 1)[0])["charts"]
    accuracy = next(c for c in charts if c["key"] == "val_accuracy")
    assert accuracy["labels"] == ["t2", "t8"] and accuracy["series"] == [[80.0], [80.0]]
    # The checkboxes' form sends ids=a&ids=b: the same page.
    assert web.client.get(f"/web/compare?ids={first.id}&ids={second.id}").status_code == 200


def test_compare_needs_two_of_your_own_jobs(web: WebApp) -> None:
    alice = make_person(web, "alice")
    make_person(web, "bob")
    mine = _finished_with(web, METRICS)
    theirs = _finished_with(web, METRICS, owner_name="bob")
    sign_in(web.client, alice.key)
    one = web.client.get(f"/web/compare?ids={mine.id}")
    assert one.status_code == 400 and "Choose between 2 and 8 jobs" in one.text
    other = web.client.get(f"/web/compare?ids={mine.id},{theirs.id}")
    assert other.status_code == 404 and theirs.id in other.text


def test_job_page_shows_its_warnings_prominently(web: WebApp) -> None:
    alice = make_person(web, "alice")
    sign_in(web.client, alice.key)
    warned = _finished_with(web, {**METRICS, "warnings": ["the student (12 k parameters) is not smaller than its "
                                                          "teacher (11 k)"]})
    page = web.client.get(f"/web/jobs/{warned.id}").text
    block = page.split('id="job-warnings"', 1)[1].split("</div>", 1)[0]
    assert "alert-warning" in block and "The student (12 k parameters) is not smaller than its teacher" in block
    assert page.index('id="job-warnings"') < page.index('id="job-results"')  # above the figures
    results = web.client.get(f"/web/jobs/{warned.id}/results").text  # what a live page fetches at the end
    assert 'id="job-warnings" hx-swap-oob="true"' in results and "not smaller" in results
    clean = _finished_with(web, METRICS)
    assert "alert-warning" not in web.client.get(f"/web/jobs/{clean.id}").text.split('id="job-warnings"', 1)[1][:80]


def test_verdict_says_within_noise_when_the_interval_holds_zero() -> None:
    from api.web.report import comparison

    noisy = comparison({**METRICS, "distillation_gain": 0.004, "distillation_gain_ci": [-0.01, 0.02],
                        "distillation_gain_within_noise": True})
    assert noisy is not None and noisy.verdict is not None
    assert noisy.verdict.startswith("Within noise") and "-1.0 to +2.0 points" in noisy.verdict
    assert noisy.verdict_level == "info"
    helped = comparison({**METRICS, "distillation_gain_ci": [0.01, 0.05], "distillation_gain_within_noise": False})
    assert helped is not None and helped.verdict is not None
    assert helped.verdict.startswith("Distillation helped") and "(95% interval +1.0 to +5.0 points)" in helped.verdict
