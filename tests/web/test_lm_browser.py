"""A causal-LM job through the browser: a tiny GPT-2 teacher zip and a .txt uploaded on the form, which
turns into a language-model job (divergence, top-k); the job page shows loss/perplexity and the models'
generations side by side."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import BrowserContext, expect

from tests.lm_models import make_lm_zip, sentences
from tests.web.conftest import Service
from tests.web.test_browser import (
    Console,
    check_accessible,
    desktop,  # noqa: F401 (the fixture)
    job_id_of,
    shoot,
    sign_in,
    upload,
    watch_until_finished,
)


def test_causal_lm_job_through_the_form(desktop: tuple[BrowserContext, Console], service: Service,  # noqa: F811
                                        tmp_path: Path, screenshots: Path) -> None:
    teacher = make_lm_zip(tmp_path, "gpt2-tiny", layers=2, hidden=32)
    train = tmp_path / "story.txt"
    train.write_text("\n".join(sentences(120, seed=1)) + "\n")

    context, console = desktop
    page = context.new_page()
    sign_in(page, service)
    page.goto(f"{service.base_url}/web/jobs/new")
    expect(page.get_by_label("Divergence", exact=True)).to_be_hidden()  # an image job until the LM teacher comes
    upload(page, "f-teacher-file", teacher)
    expect(page.locator("#f-teacher-file-status")).to_contain_text("causal LM")
    expect(page.get_by_label("Divergence", exact=True)).to_be_visible()
    expect(page.get_by_label("Teacher top-k", exact=True)).to_be_visible()
    expect(page.get_by_label("Label column", exact=True)).to_be_hidden()  # a classifier's field
    expect(page.get_by_label("Max length (tokens)", exact=True)).to_have_value("256")  # the LM default
    expect(page.get_by_label("Temperature", exact=True)).to_have_value("1.0")
    upload(page, "f-data-train", train)
    expect(page.locator("#f-data-train-status")).to_contain_text("lines")

    page.get_by_label("Job name", exact=True).fill("tiny-gpt2")
    page.get_by_label("Max length (tokens)", exact=True).fill("32")
    page.get_by_label("Divergence", exact=True).select_option("reverse_kl")
    page.get_by_label("Teacher top-k", exact=True).fill("8")
    page.locator("#f-student-args-hf-num_hidden_layers").fill("1")
    page.get_by_label("Distillation epochs", exact=True).fill("1")
    page.locator("#spec-view summary").click()
    expect(page.locator("#spec-yaml")).to_contain_text("top_k: 8")
    shoot(page, screenshots, "new-lm-job-desktop")

    page.get_by_role("button", name="Start distillation").click()
    page.wait_for_url("**/web/jobs/job_*")
    job_id = job_id_of(page)
    state, _values = watch_until_finished(page, timeout_s=300)
    assert state == "succeeded", service.logs()
    expect(page.locator("#lm-comparison")).to_be_visible(timeout=20_000)
    expect(page.locator("#lm-comparison")).to_contain_text("Perplexity")
    expect(page.locator("#lm-samples tbody tr").first).to_be_visible()
    expect(page.locator("#comparison")).to_have_count(0)
    shoot(page, screenshots, "lm-job-succeeded-desktop")
    with service.api() as api:
        job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["spec"]["task"] == "causal_lm" and job["spec"]["method"]["divergence"] == "reverse_kl"
    assert job["spec"]["method"]["top_k"] == 8 and job["metrics"]["teacher_cache"]["used"]
    check_accessible(page)
    console.assert_clean()
