"""A newcomer's first jobs through the browser: what the issue's first-use report tripped on, end to end.

Real headless Chromium against a real service with a real worker:

* docs/teachers.md's ONNX export, run as written on the pinned torch (which writes `teacher.onnx`
  plus `teacher.onnx.data`), zipped as the page says, uploaded through the form and distilled to
  success;
* a wrong normalisation typed into the form (`mean 0.5, std 0.05` for a teacher trained on raw
  [0, 1] pixels) fails at the teacher check, before any training, and the job page shows the
  hint: normalisation, what the data's own mean and std would give, and what to set.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect

from tests.docs.test_teachers_doc import _onnx_snippets
from tests.web.conftest import Service
from tests.web.test_browser import (
    Console,
    check_accessible,
    job_id_of,
    shoot,
    sign_in,
    upload,
    watch_until_finished,
)

pytestmark = pytest.mark.slow

MNIST_SMALL = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist_small.npz"


@pytest.fixture
def desktop(browser: Browser) -> Iterator[tuple[BrowserContext, Console]]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    console = Console(context)
    yield context, console
    context.close()


@pytest.fixture(scope="module")
def onnx_job_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """28x28 blob images, and an MLP teacher exported and zipped by the docs' own snippets."""
    import torch

    from tests.kdcore.helpers import make_blob_images, train_teacher

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("onnx-first-use")
    data = make_blob_images(folder / "blobs28.npz", num_train=1500, num_test=200, size=28)
    model = train_teacher("mlp", {"hidden": [64]}, data, epochs=3)
    export, zipping = _onnx_snippets()
    with contextlib.chdir(folder):
        exec(export, {"model": model})  # the page's code, as a reader pastes it (its input is 1x28x28)
        exec(zipping, {})
    # The pinned torch keeps the weights apart: the very case that was refused before.
    assert (folder / "teacher.onnx.data").exists()
    return folder / "teacher.zip", data, sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def mnist_job_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Real MNIST (the 6,000-image subset) and an MLP teacher trained on raw [0, 1] pixels."""
    import torch

    from tests.kdcore.helpers import save_safetensors_teacher, train_teacher

    if not MNIST_SMALL.exists():
        pytest.fail(f"{MNIST_SMALL} is missing: the shared data sets are part of the test setup")
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("mnist-first-use")
    teacher = save_safetensors_teacher(train_teacher("mlp", {"hidden": [64]}, MNIST_SMALL, epochs=2),
                                       folder / "mnist-teacher.safetensors")
    return teacher, MNIST_SMALL


def _common_settings(page: Page, name: str) -> None:
    page.get_by_label("Job name", exact=True).fill(name)
    page.locator("#f-student-args-mlp-hidden").fill("16")
    page.get_by_label("Distillation epochs", exact=True).fill("2")
    page.get_by_label("Train a baseline", exact=True).set_checked(False)  # a quicker job; not what is tested
    page.get_by_label("Batch size", exact=True).fill("64")
    page.get_by_label("Learning rate", exact=True).fill("0.005")
    page.get_by_label("torchscript", exact=True).uncheck()


def test_the_documented_onnx_zip_uploads_through_the_form_and_distils(
        desktop: tuple[BrowserContext, Console], service: Service, onnx_job_files: tuple[Path, Path, int],
        screenshots: Path) -> None:
    teacher_zip, data, teacher_params = onnx_job_files
    context, console = desktop
    page = context.new_page()
    sign_in(page, service)
    page.goto(f"{service.base_url}/web/jobs/new")
    upload(page, "f-teacher-file", teacher_zip)
    expect(page.locator("#f-teacher-file-status")).to_contain_text("onnx", ignore_case=True)
    upload(page, "f-data-train", data)
    _common_settings(page, "onnx-zip")
    check_accessible(page)
    shoot(page, screenshots, "first-use-onnx-zip-form-desktop")

    page.get_by_role("button", name="Start distillation").click()
    page.wait_for_url("**/web/jobs/job_*")
    job_id = job_id_of(page)
    state, _ = watch_until_finished(page, timeout_s=240)
    assert state == "succeeded", service.logs()
    expect(page.locator("#comparison")).to_be_visible(timeout=20_000)
    expect(page.locator("#event-log")).to_contain_text("Distillation epoch 2/2")
    shoot(page, screenshots, "first-use-onnx-zip-succeeded-desktop")

    with service.api() as api:
        job = api.get(f"/v1/jobs/{job_id}").json()
        teacher_file = api.get(f"/v1/files/{job['spec']['teacher']['file']}").json()
        artifacts = {item["name"] for item in api.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
        metrics = api.get(f"/v1/jobs/{job_id}/artifacts/metrics.json").json()
    assert teacher_file["name"] == "teacher.zip" and teacher_file["info"]["format"] == "onnx"
    assert metrics["teacher"]["params"] == teacher_params  # counted from the ONNX initializers, not 0
    assert metrics["teacher_check"]["passed"] and metrics["teacher"]["accuracy"] > 0.9
    assert metrics["student"]["accuracy"] > 0.5  # 4 classes: the student learnt from the ONNX teacher
    assert {"student.safetensors", "student.onnx", "report.md"} <= artifacts
    console.assert_clean()


def test_a_wrong_normalisation_fails_fast_with_the_hint_on_the_job_page(
        desktop: tuple[BrowserContext, Console], service: Service, mnist_job_files: tuple[Path, Path],
        screenshots: Path) -> None:
    teacher, data = mnist_job_files
    context, console = desktop
    page = context.new_page()
    sign_in(page, service)
    page.goto(f"{service.base_url}/web/jobs/new")
    upload(page, "f-teacher-file", teacher)
    upload(page, "f-data-train", data)
    page.get_by_label("Teacher architecture", exact=True).select_option("mlp")
    page.locator("#f-teacher-args-mlp-hidden").fill("64")
    _common_settings(page, "wrong-normalisation")
    page.locator("summary", has_text="More data settings").click()
    page.get_by_label("Normalise: mean", exact=True).fill("0.5")
    page.get_by_label("Normalise: std", exact=True).fill("0.05")

    page.get_by_role("button", name="Start distillation").click()
    page.wait_for_url("**/web/jobs/job_*")
    submitted = time.monotonic()
    job_id = job_id_of(page)
    state, _ = watch_until_finished(page, timeout_s=120)
    assert state == "failed", service.logs()
    assert time.monotonic() - submitted < 90  # the check, not a training run

    error = page.locator("#job-error")
    expect(error).to_contain_text("teacher_check_failed")
    expect(error).to_contain_text("before any training, near chance")
    # The hint: normalisation named, with what the data's own mean and std (MNIST's ~0.13 / ~0.31) give.
    expect(error).to_contain_text(re.compile(r"with the data's own normalisation \(mean \[0\.1\d+\], "
                                             r"std \[0\.3\d+\]\) it scores \d+\.\d%"))
    expect(error).to_contain_text("Set data.normalize to mean [0.0], std [1.0]")
    expect(error).to_contain_text("stages.teacher_check: warn")
    expect(page.locator("#event-log")).not_to_contain_text("Distillation epoch")
    check_accessible(page)
    shoot(page, screenshots, "first-use-wrong-normalisation-desktop")

    with service.api() as api:
        job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["error"]["code"] == "teacher_check_failed"
    assert job["spec"]["data"]["normalize"] == {"mean": [0.5], "std": [0.05]}
    console.assert_clean()
