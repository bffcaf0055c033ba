"""A finished causal_lm job's numbers as the job page shows them: loss and perplexity, then samples.

Reads the job's `metrics` as `kdcore.lm_pipeline` writes them: per model (teacher, student,
baseline) `loss` in nats per token on the evaluation split, `perplexity`, `accuracy` (top-1
next-token), `params`, `size_mb`, `tokens_per_s` (CPU generation, batch 1); and `agreement`,
`distillation_gain` (nats per token, positive when distillation helped), `samples` (the same
prompts continued by each model), `teacher_cache` (top-K reuse and the teacher compute saved).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api.web.report import MODEL_NOTES, Row, _best, _number, count, fixed, percent, ratio, size_mb

LM_MODELS = (("teacher", "Teacher"), ("student", "Student"), ("baseline", "Baseline"))


@dataclass
class LMResults:
    models: list[tuple[str, str, str]]  # (key, label, note)
    rows: list[Row]
    notes: list[str]
    verdict: str | None
    verdict_level: str
    samples: list[dict[str, str]]  # prompt, then one continuation per model key


def lm_results(metrics: dict[str, Any] | None) -> LMResults | None:
    if not metrics or metrics.get("task") != "causal_lm":
        return None
    present = [(key, label, MODEL_NOTES.get(key, "")) for key, label in LM_MODELS if isinstance(metrics.get(key), dict)]
    if [key for key, _, _ in present][:2] != ["teacher", "student"]:
        return None
    data = {key: metrics[key] for key, _, _ in present}

    def row(label: str, key: str, render: Callable[[Any], str], *, higher: bool | None, help_text: str) -> Row:
        raw = [data[name].get(key) for name, _, _ in present]
        cells = [render(value) for value in raw]
        best = _best([_number(value) for value in raw], cells, higher=higher) if higher is not None else set()
        return Row(label, cells, help_text, best)

    agreement = [metrics.get("agreement") if key == "student" else metrics.get("baseline_agreement")
                 if key == "baseline" else None for key, _, _ in present]
    rows = [
        row("Loss (nats/token)", "loss", lambda v: fixed(v, 4), higher=False,
            help_text="Mean next-token cross-entropy on the evaluation split, in nats per token."),
        row("Perplexity", "perplexity", lambda v: fixed(v, 2), higher=False, help_text="exp(loss)."),
        row("Next-token accuracy", "accuracy", percent, higher=True,
            help_text="Share of the scored tokens whose most likely next token is the right one."),
        Row("Agreement with teacher", [percent(v) if v is not None else "—" for v in agreement],
            "Share of tokens where the model's top-1 next token is the teacher's."),
        row("Parameters", "params", count, higher=False, help_text=""),
        row("Size", "size_mb", size_mb, higher=False, help_text="Serialized weights."),
        row("Generation speed", "tokens_per_s", lambda v: fixed(v, 1, " tokens/s"), higher=True,
            help_text="Tokens generated per second on CPU at batch 1."),
    ]
    return LMResults(present, rows, _notes(metrics), *_verdict(metrics), samples=list(metrics.get("samples") or []))


def _notes(metrics: dict[str, Any]) -> list[str]:
    notes = []
    if metrics.get("eval_split"):
        tokens = metrics.get("eval_tokens")
        notes.append(f"Evaluated on the {metrics['eval_split']}" + (f", {count(tokens)} scored tokens." if tokens
                                                                      else "."))
    if _number(metrics.get("compression")):
        notes.append(f"The student is {ratio(metrics['compression'])} smaller than the teacher.")
    cache = metrics.get("teacher_cache") or {}
    if cache.get("used"):
        how = "reused from an earlier job: the teacher was not run" if cache.get("reused") else "computed in one pass"
        notes.append(f"Teacher top-{cache.get('top_k')} cache {how}; {count(cache.get('teacher_forward_tokens_saved'))}"
                     " teacher forward tokens saved.")
    if metrics.get("shared_parameters"):
        notes.append(f"{count(metrics['shared_parameters'])} parameters were copied from the teacher.")
    return notes


def _verdict(metrics: dict[str, Any]) -> tuple[str | None, str]:
    gain = _number(metrics.get("distillation_gain"))
    if gain is None:
        return None, "info"
    if gain > 0:
        return f"Distillation helped: the student's loss is {gain:.4f} nats per token below its baseline's.", "success"
    return (f"The distilled student did not beat its baseline ({gain:+.4f} nats per token): the same student "
            "trained without the teacher did as well. Try a stronger teacher, more data or another divergence.",
            "warning")
