"""report.md for a causal_lm job: teacher / student / baseline in nats per token, samples side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcore.report import _spec_yaml
from kdcore.spec import JobSpec


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _row(name: str, metrics: dict[str, Any]) -> str:
    return (f"| {name} | {metrics['loss']:.4f} | {metrics['perplexity']:.2f} | {_pct(metrics['accuracy'])} | "
            f"{metrics['params']:,} | {metrics['size_mb']:.3f} | {metrics['tokens_per_s']:.1f} |")


def lm_verdict(metrics: dict[str, Any]) -> str:
    """One plain sentence on whether distillation beat the same student trained on the labels alone."""
    baseline, student = metrics.get("baseline"), metrics["student"]
    if not baseline:
        return "No baseline was trained (set `stages.baseline: true` to see what distillation bought)."
    gain = baseline["loss"] - student["loss"]
    if gain > 0:
        return (f"The distilled student's test loss is {gain:.4f} nats per token below the same student trained "
                f"without a teacher ({student['loss']:.4f} vs {baseline['loss']:.4f}).")
    return (f"**The distilled student did not beat its baseline**: {student['loss']:.4f} vs {baseline['loss']:.4f} "
            "nats per token without a teacher. A teacher little better than the student alone, or too few "
            "tokens, makes distillation pay nothing: try a stronger teacher, more data or another divergence.")


def write_lm_report_md(spec: JobSpec, metrics: dict[str, Any], data_summary: str, path: Path,
                       *, curves: str | None = "curves.png") -> Path:
    method = metrics["method"]
    cache = metrics.get("teacher_cache") or {}
    lines = [
        f"# Distillation report{': ' + spec.name if spec.name else ''}", "",
        "## Summary", "", lm_verdict(metrics), "",
        f"- Student: {metrics['student_description']}; {metrics['compression']:.1f}x smaller than the teacher, "
        f"{metrics['speedup']:.1f}x its generation speed (CPU, batch 1).",
        f"- Agreement: the student's top-1 next token is the teacher's on {_pct(metrics['agreement'])} of tokens.",
        f"- Evaluated on: {metrics['eval_split']} ({metrics['eval_tokens']:,} scored tokens).",
    ]
    if cache.get("used"):
        how = "reused, the teacher was not run" if cache["reused"] else "computed in one pass"
        lines.append(f"- Teacher top-{cache['top_k']} cache: {how}; {cache['teacher_forward_tokens_saved']:,} "
                     "teacher forward tokens saved.")
    lines += [
        "", "## Teacher vs student vs baseline", "",
        "| model | loss (nats/token) | perplexity | next-token accuracy | params | size (MB) | tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        _row("teacher", metrics["teacher"]), _row("distilled student", metrics["student"]),
    ]
    if metrics.get("baseline"):
        lines.append(_row("baseline student (no teacher)", metrics["baseline"]))
    lines += ["", "## Samples", "", "Greedy continuations of the first evaluation prompts.", ""]
    for sample in metrics["samples"]:
        lines.append(f"**Prompt:** `{sample['prompt'][:300]}`")
        lines.append("")
        for key in ("teacher", "student", "baseline"):
            if key in sample:
                lines.append(f"- {key}: `{sample[key][:300]}`")
        lines.append("")
    if curves:
        lines += ["## Training curves", "", f"![loss and accuracy per epoch]({curves})", ""]
    soft = (f"{method['divergence']}" + (f" (beta {spec.method.beta})" if method["divergence"] == "jsd" else "")
            + (f" over the teacher's top-{method['top_k']} and a tail bucket" if method["top_k"] else ""))
    described = (f"sequence-level KD: the student learns the teacher's answers (max {spec.method.max_new_tokens} "
                 f"tokens, {spec.method.sampling})" if method["name"] == "seq_kd" else
                 f"token-level KD, {soft}, T = {method['temperature']}, alpha = {method['alpha']}")
    lines += ["## Data", "", data_summary, "", "## Method", "", described + ".",
              f"Stages: teacher fine-tune {spec.stages.teacher_finetune_epochs} epochs, distillation "
              f"{spec.stages.distill_epochs}, student fine-tune {spec.stages.finetune_epochs}, baseline "
              f"{'yes' if spec.stages.baseline else 'no'}. Parameters copied from the teacher: "
              f"{metrics.get('shared_parameters', 0):,}.",
              "", "## Spec", "", "```yaml", _spec_yaml(spec), "```", ""]
    path.write_text("\n".join(lines))
    return path
