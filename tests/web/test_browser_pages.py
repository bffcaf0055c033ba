"""More pages in real Chromium against the real service: the API docs with the network cut off,
the jobs list's result column and live times, the comparison of two finished jobs, the job page's
warnings, stage and chart legends. Any console error or uncaught exception fails the test.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, Route, expect

from tests.web.conftest import JobFiles, Service
from tests.web.test_browser import Console, desktop, shoot, sign_in

__all__ = ["desktop"]  # the fixture, imported so that this module's tests can ask for it

pytestmark = pytest.mark.slow


def _block_the_internet(page: Page, service: Service) -> list[str]:
    """Abort every request that would leave the server; returns the URLs that tried."""
    ours = urlsplit(service.base_url).netloc
    tried: list[str] = []

    def handle(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).netloc == ours or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            tried.append(url)
            route.abort()

    page.route("**/*", handle)
    return tried


def test_api_docs_render_with_the_network_blocked(desktop: tuple[BrowserContext, Console], service: Service,
                                                  screenshots: Path) -> None:
    context, console = desktop
    page = context.new_page()
    tried = _block_the_internet(page, service)

    page.goto(f"{service.base_url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("Distillery", timeout=20_000)
    expect(page.locator(".opblock-summary-path", has_text="/v1/jobs").first).to_be_visible()
    assert page.locator(".opblock").count() >= 10  # the operations list, not only the title
    shoot(page, screenshots, "api-docs-offline")

    page.goto(f"{service.base_url}/redoc")
    expect(page.locator("h1", has_text="Distillery")).to_be_visible(timeout=20_000)
    expect(page.locator("[data-section-id='tag/jobs/operation/create_job']")).to_be_attached()
    assert page.locator("[data-section-id*='/operation/']").count() >= 10
    shoot(page, screenshots, "api-reference-offline")

    assert tried == [], f"the docs tried to reach: {tried}"
    console.assert_clean()


def _upload(api: httpx.Client, path: Path, purpose: str) -> str:
    with path.open("rb") as handle:
        response = api.post("/v1/files", files={"file": (path.name, handle)}, data={"purpose": purpose})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _submit(api: httpx.Client, teacher: str, data: str, *, name: str, temperature: float) -> str:
    spec = {
        "name": name,
        "teacher": {"file": teacher, "format": "safetensors", "arch": "mlp", "arch_args": {"hidden": [64, 64]}},
        "student": {"arch": "mlp", "arch_args": {"hidden": [16]}},
        "data": {"train": data},
        "method": {"temperature": temperature},
        "stages": {"distill_epochs": 3},
        "optim": {"lr": 0.005},
        "batch_size": 32,
        "export": ["safetensors"],
    }
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _sse(kind: str, payload: dict[str, Any], event_id: int) -> str:
    return f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(payload)}\n\n"


def test_compare_two_finished_jobs_from_the_list(desktop: tuple[BrowserContext, Console], service: Service,
                                                 job_files: JobFiles, screenshots: Path) -> None:
    context, console = desktop
    page = context.new_page()
    with service.api() as api:
        teacher, data = _upload(api, job_files.teacher, "teacher"), _upload(api, job_files.data, "dataset")
        first = _submit(api, teacher, data, name="compare-t2", temperature=2.0)
        second = _submit(api, teacher, data, name="compare-t8", temperature=8.0)
    sign_in(page, service)

    # Relative times count on while the page stays open.
    created = page.locator(f'tr[data-job-id="{second}"] time[data-ago]')
    before = created.inner_text()
    assert before.endswith(" s ago"), before
    expect(created).not_to_have_text(before, timeout=5_000)

    # The stage label follows a stage that starts without progress figures (the teacher's cache):
    # the page is fed that exact event, so the check does not hang on how fast the real stage goes.
    started = {"kind": "state", "at": "2026-01-01T00:00:00+00:00", "data": {"state": "running", "attempt": 1},
               "stage_label": "Waiting", "line": {"text": "Running", "level": "info"}, "point": None}
    cache = {"kind": "progress", "at": "2026-01-01T00:00:01+00:00", "data": {"stage": "teacher_cache"},
             "stage_label": "Caching the teacher's outputs",
             "line": {"text": "Stage: Caching the teacher's outputs", "level": "info"}, "point": None}
    stream = "retry: 600000\n\n" + _sse("state", started, 10**9) + _sse("progress", cache, 10**9 + 1)
    watched = context.new_page()
    watched.route("**/events?*", lambda route: route.fulfill(status=200, body=stream,
                                                             headers={"Content-Type": "text/event-stream"}))
    watched.goto(f"{service.base_url}/web/jobs/{second}")
    expect(watched.locator("#event-log")).to_contain_text("Stage: Caching the teacher's outputs")
    expect(watched.locator("#job-stage")).to_have_text("Caching the teacher's outputs")
    watched.close()

    with service.api() as api:
        for job_id in (first, second):
            deadline = time.monotonic() + 240
            while api.get(f"/v1/jobs/{job_id}").json()["state"] not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, service.logs()
                time.sleep(0.5)
        jobs = {job_id: api.get(f"/v1/jobs/{job_id}").json() for job_id in (first, second)}
    assert [job["state"] for job in jobs.values()] == ["succeeded", "succeeded"], service.logs()

    # A finished job's chart legends show the last epoch's figures, not "epoch: --, train: —".
    page.goto(f"{service.base_url}/web/jobs/{first}")
    expect(page.locator('.curve-stage[data-stage="distill"] .u-legend').first).to_be_visible()
    legend_values = page.locator(".curve-stage .u-legend .u-value").all_inner_texts()
    assert legend_values and not [v for v in legend_values if v.strip() in ("--", "—", "")], legend_values

    page.goto(f"{service.base_url}/web/jobs")
    for job_id, job in jobs.items():
        accuracy = f"{job['metrics']['student']['accuracy'] * 100:.1f}%"
        expect(page.locator(f'tr[data-job-id="{job_id}"] .result-cell')).to_contain_text(accuracy)
        expect(page.locator(f'tr[data-job-id="{job_id}"] .result-cell .gain')).to_contain_text("pts")
    compare = page.get_by_role("button", name="Compare")
    expect(compare).to_be_disabled()
    page.get_by_label("Compare compare-t2", exact=True).check()
    page.get_by_label("Compare compare-t8", exact=True).check()
    expect(compare).to_be_enabled()
    shoot(page, screenshots, "jobs-compare-ticked")
    compare.click()
    page.wait_for_url("**/web/compare?*")

    expect(page.get_by_role("heading", name="Compare 2 jobs")).to_be_visible()
    differences = page.locator("#spec-differences")
    row = differences.locator('tr[data-path="method.temperature"]')
    expect(row).to_contain_text("2.0")
    expect(row).to_contain_text("8.0")
    expect(differences.locator('tr[data-path="name"]')).to_be_visible()
    expect(differences.locator('tr[data-path="method.alpha"]')).to_have_count(0)
    figures = page.locator("#figures")
    for job in jobs.values():
        expect(figures).to_contain_text(f"{job['metrics']['student']['accuracy'] * 100:.1f}%")
    expect(page.locator('#curves .chart[data-series="2"]').first).to_be_visible()
    assert page.locator("#curves canvas").count() >= 2
    page.wait_for_timeout(300)
    shoot(page, screenshots, "compare-two-jobs")
    console.assert_clean()
