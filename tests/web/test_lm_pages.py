"""Causal-LM jobs on the web pages: the form's language-model fields, and the job page's LM results."""

from __future__ import annotations

from service import state
from service.models import FilePurpose, JobState
from service.users import get_user_by_name
from tests.api import factories
from tests.web.conftest import WebApp, make_person, sign_in

LM_METRICS = {
    "task": "causal_lm",
    "teacher": {"loss": 1.2345, "perplexity": 3.4367, "accuracy": 0.61, "params": 120_000, "size_mb": 0.48,
                "tokens_per_s": 900.0},
    "student": {"loss": 1.5, "perplexity": 4.4817, "accuracy": 0.55, "params": 60_000, "size_mb": 0.24,
                "tokens_per_s": 1800.0},
    "baseline": {"loss": 1.75, "perplexity": 5.7546, "accuracy": 0.5, "params": 60_000, "size_mb": 0.24,
                 "tokens_per_s": 1800.0},
    "agreement": 0.8, "baseline_agreement": 0.7, "compression": 2.0, "speedup": 2.0, "distillation_gain": 0.25,
    "eval_split": "test split", "eval_tokens": 1234,
    "samples": [{"prompt": "the cat", "teacher": " sees the fish today.", "student": " sees a ball.",
                 "baseline": " the the the"}],
    "teacher_cache": {"used": True, "reused": True, "top_k": 8, "teacher_forward_tokens": 0,
                      "teacher_forward_tokens_saved": 4024, "teacher_loaded": False},
}
LM_TEACHER_INFO = {"format": "hf", "details": "Hugging Face gpt2 (causal_lm)",
                   "hf": {"root": "", "model_type": "gpt2", "task": "causal_lm", "num_layers": 2, "hidden_size": 32,
                          "vocab_size": 325, "has_classifier": False, "params": 100_000, "weight_files": [],
                          "tokenizer_files": ["tokenizer.json"]}}


def test_lm_job_page_shows_loss_perplexity_and_generations_side_by_side(web: WebApp) -> None:
    alice = make_person(web, "alice")
    with web.session_factory() as session:
        owner = get_user_by_name(session=session, name="alice")
        assert owner is not None
        job = factories.make_job(session, web.storage, owner, job_state=JobState.RUNNING)
        state.record_progress(session, job.id, "worker-1", metrics=LM_METRICS)
        state.finish(session, job.id, "worker-1", state=JobState.SUCCEEDED)
        session.commit()
        job_id = job.id
    sign_in(web.client, alice.key)
    page = web.client.get(f"/web/jobs/{job_id}").text
    assert 'id="lm-comparison"' in page and 'id="lm-samples"' in page
    assert 'id="comparison"' not in page  # the classifiers' table would call nats "accuracy points"
    for text in ("Loss (nats/token)", "1.2345", "1.5000", "1.7500", "Perplexity", "4.48", "Next-token accuracy",
                 "55.0%", "80.0%", "70.0%", "0.2500 nats per token below its baseline", "sees the fish today.",
                 "sees a ball.", "the the the", "reused from an earlier job: the teacher was not run", "4.02k"):
        assert text in page, text
    fragment = web.client.get(f"/web/jobs/{job_id}/results").text
    assert 'id="lm-comparison"' in fragment


def test_new_job_form_offers_the_lm_fields_for_a_causal_lm_teacher(web: WebApp) -> None:
    alice = make_person(web, "alice")
    with web.session_factory() as session:
        owner = get_user_by_name(session=session, name="alice")
        assert owner is not None
        factories.make_file(session, web.storage, owner, FilePurpose.TEACHER, name="gpt2.zip", info=LM_TEACHER_INFO)
    sign_in(web.client, alice.key)
    page = web.client.get("/web/jobs/new").text
    assert 'data-format="hf" data-task="causal_lm"' in page and "gpt2.zip" in page and "causal LM" in page
    for control in ("method-divergence", "method-top_k", "data-max_length"):
        block = page[page.index(f'id="f-{control}-field"'):][:400]
        assert 'data-only="' in block and "causal_lm" in block.split('data-only="')[1].split('"')[0], control
    label_block = page[page.index('id="f-data-label_field-field"'):][:200]
    assert 'data-only="text_classification"' in label_block
    # max_length's default follows the task: 256 tokens for a language model.
    max_length = page[page.index('id="f-data-max_length-field"'):][:400]
    assert "&#34;causal_lm&#34;: &#34;256&#34;" in max_length or '"causal_lm": "256"' in max_length


def test_lm_form_values_make_a_causal_lm_spec() -> None:
    from api.web.forms import spec_form

    form = spec_form()
    values = form.defaults()
    values.update({"teacher.file": "file_x", "data.train": "file_y", "task": "causal_lm", "student.arch": "hf",
                   "method.divergence": "jsd", "method.top_k": "16", "data.max_length": "64"})
    validation = form.validate(values)
    assert validation.ok, (validation.errors, validation.general)
    assert validation.spec is not None
    spec = validation.spec
    assert (spec.method.divergence, spec.method.top_k, spec.data.max_length) == ("jsd", 16, 64)
    bad = form.validate({**values, "method.top_k": "-1"})
    assert "method.top_k" in bad.errors
