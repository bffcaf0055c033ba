"""Written artifacts of a run: history.csv, curves.png, TensorBoard events and report.md (the model card)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdcore.spec import JobSpec

STAGE_TITLES = {
    "teacher_finetune": "teacher fine-tune",
    "distill": "distillation",
    "finetune": "student fine-tune",
    "baseline": "baseline (no teacher)",
}


def write_history_csv(history: Sequence[dict[str, Any]], path: Path) -> Path:
    columns: list[str] = []
    for row in history:
        columns += [key for key in row if key not in columns]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns or ["stage", "epoch"])
        writer.writeheader()
        writer.writerows(history)
    return path


def write_curves_png(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Per epoch and stage: cross-entropy (train solid, validation dashed), the distillation objective, accuracy.

    The distillation loss is T^2-scaled KL plus weighted CE: on the validation cross-entropy's axis it
    would dwarf it, so it has its own panel, and the first panel compares like with like.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ce_axis, kd_axis, accuracy_axis) = plt.subplots(1, 3, figsize=(15, 4))
    for stage in dict.fromkeys(row["stage"] for row in history):
        rows = [row for row in history if row["stage"] == stage]
        epochs = [row["epoch"] for row in rows]
        label = STAGE_TITLES.get(stage, stage)
        line, = ce_axis.plot(epochs, [_train_ce(row) for row in rows], label=f"{label} train")
        color = line.get_color()
        if stage == "distill":
            kd_axis.plot(epochs, [row["train_loss"] for row in rows], color=color, label=f"{label} objective")
        if "val_loss" in rows[0]:
            ce_axis.plot(epochs, [row["val_loss"] for row in rows], "--", color=color, label=f"{label} val")
            accuracy_axis.plot(epochs, [row["val_accuracy"] for row in rows], "--", color=color,
                               label=f"{label} val")
        accuracy_axis.plot(epochs, [row["train_accuracy"] for row in rows], color=color, label=f"{label} train")
    ce_axis.set(title="cross-entropy with the labels", xlabel="epoch")
    kd_axis.set(title="distillation objective (alpha T\u00b2 KL + (1 - alpha) CE)", xlabel="epoch")
    accuracy_axis.set(title="accuracy", xlabel="epoch", ylim=(None, 1.0))
    for axis in (ce_axis, kd_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        if axis.get_lines():
            axis.legend(fontsize=7)
    if not kd_axis.get_lines():
        kd_axis.text(0.5, 0.5, "no distillation stage", ha="center", va="center", transform=kd_axis.transAxes)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def _train_ce(row: dict[str, Any]) -> float:
    # Histories from before train_ce was recorded: hard-label stages' own loss is the cross-entropy.
    return float(row.get("train_ce", row["train_loss"]))


def write_tensorboard(history: Sequence[dict[str, Any]], directory: Path) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    try:
        for row in history:
            for key, value in row.items():
                if key not in ("stage", "epoch") and isinstance(value, int | float):
                    writer.add_scalar(f"{row['stage']}/{key}", value, row["epoch"])
    finally:
        writer.close()
    return directory


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}%"


def _row(name: str, metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return f"| {name} | – | – | – | – | – | – |"
    return (f"| {name} | {_pct(metrics['accuracy'])} | {_pct(metrics['top5'])} | {metrics['loss']:.4f} | "
            f"{metrics['params']:,} | {metrics['size_mb']:.3f} | {metrics['latency_ms']:.3f} |")


def verdict(metrics: dict[str, Any]) -> str:
    """One plain sentence on whether distillation paid off against the same student trained alone."""
    baseline = metrics.get("baseline")
    student = metrics["student"]
    if not baseline:
        return "No baseline was trained (set `stages.baseline: true` to see what distillation bought)."
    gain = student["accuracy"] - baseline["accuracy"]
    interval = metrics.get("distillation_gain_ci")
    ci = ""
    if interval:
        ci = (f"; 95% interval {100 * interval[0]:+.2f} to {100 * interval[1]:+.2f} points over "
              f"{metrics.get('eval_samples', 0):,} test samples, paired bootstrap; McNemar p = "
              f"{metrics.get('distillation_gain_p_value', 1.0):.3g}")
        if interval[0] <= 0 <= interval[1]:
            return (f"The distilled student and its baseline are **within noise** of each other: "
                    f"{_pct(student['accuracy'])} vs {_pct(baseline['accuracy'])} without a teacher "
                    f"({100 * gain:+.2f} points{ci}). More test samples, or a clearer gain, would tell them apart.")
    if gain > 0:
        return (f"The distilled student beat the same student trained without a teacher by "
                f"{100 * gain:.2f} points ({_pct(student['accuracy'])} vs {_pct(baseline['accuracy'])}{ci}).")
    return (f"**The distilled student did not beat its baseline**: {_pct(student['accuracy'])} vs "
            f"{_pct(baseline['accuracy'])} without a teacher ({100 * gain:+.2f} points{ci}). A weaker teacher than "
            "the student trained alone, or a tiny student at a high temperature, makes distillation hurt: "
            "try a lower `method.temperature`, a larger student or a better teacher.")


def _ratio(value: float, more: str, less: str) -> str:
    """3.0 -> '3.0x smaller'; 0.6 -> '1.7x larger': a ratio under 1 read as its inverse, never '0.6x smaller'."""
    return f"{value:.1f}x {more}" if value >= 1 else f"{1 / max(value, 1e-9):.1f}x {less}"


def _facts(metrics: dict[str, Any]) -> list[str]:
    """Lines on how the figures were made: the runtime timed in, the teacher check, the epochs that ship."""
    lines = []
    runtime = metrics.get("latency_runtime", "pytorch")
    lines.append(f"- Latency: CPU, batch 1, every model in {runtime}"
                 + (" (the teacher is an ONNX graph, so the students were timed from ONNX exports too)."
                    if runtime == "onnxruntime" else "."))
    check = metrics.get("teacher_check")
    if check:
        lines.append(f"- Teacher check: {_pct(check['accuracy'])} on {check['samples']:,} samples of the "
                     f"{check['split']} before training (chance {_pct(check['chance'])})"
                     + ("." if check["passed"] else ": near chance, see the warnings."))
    for key, chosen in (metrics.get("selected_epochs") or {}).items():
        lines.append(f"- Shipped {key} weights: {STAGE_TITLES.get(chosen['stage'], chosen['stage'])} epoch "
                     f"{chosen['epoch']}, the best validation accuracy ({_pct(chosen['val_accuracy'])}).")
    return lines


def write_report_md(spec: JobSpec, metrics: dict[str, Any], data_summary: str, path: Path,
                    *, curves: str | None = "curves.png") -> Path:
    lines = [
        f"# Distillation report{': ' + spec.name if spec.name else ''}",
        "",
        "## Summary",
        "",
        verdict(metrics),
        "",
        f"- Teacher kept: the student reaches {_pct(metrics['student']['accuracy'])} against the teacher's "
        f"{_pct(metrics['teacher']['accuracy'])}, {_ratio(metrics['compression'], 'smaller', 'larger')} and "
        f"{_ratio(metrics['speedup'], 'faster', 'slower')} (CPU, batch 1).",
        f"- Agreement: the student predicts the teacher's class on {_pct(metrics['agreement'])} of samples.",
        f"- Evaluated on: {metrics['eval_split']} ({metrics['eval_samples']:,} samples).",
        *_facts(metrics),
        "",
    ]
    if metrics.get("warnings"):
        lines += ["## Warnings", "", *(f"- **{warning[:1].upper()}{warning[1:]}**" for warning in metrics["warnings"]),
                  ""]
    lines += [
        "## Teacher vs student vs baseline",
        "",
        "| model | accuracy | top-5 | loss | params | size (MB) | latency (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        _row("teacher", metrics["teacher"]),
        _row("distilled student", metrics["student"]),
    ]
    if metrics.get("baseline"):
        lines.append(_row("baseline student (no teacher)", metrics["baseline"]))
    if metrics.get("student_int8"):
        lines.append(_row("distilled student, int8", metrics["student_int8"]))
    lines += ["", "## Per-class accuracy", "", "| class | teacher | student | baseline |", "| --- | --- | --- | --- |"]
    baseline_classes = (metrics.get("baseline") or {}).get("per_class_accuracy") or []
    for index, name in enumerate(metrics["class_names"]):
        base = baseline_classes[index] if index < len(baseline_classes) else None
        lines.append(f"| {name} | {_pct(metrics['teacher']['per_class_accuracy'][index])} | "
                     f"{_pct(metrics['student']['per_class_accuracy'][index])} | {_pct(base)} |")
    lines += ["", "## Student confusion matrix", "", "Rows: true class; columns: predicted class.", ""]
    names = metrics["class_names"]
    lines.append("| | " + " | ".join(names) + " |")
    lines.append("| --- " * (len(names) + 1) + "|")
    for name, counts in zip(names, metrics["student_confusion"], strict=True):
        lines.append(f"| **{name}** | " + " | ".join(str(count) for count in counts) + " |")
    if curves:
        lines += ["", "## Training curves", "", f"![loss and accuracy per epoch]({curves})"]
    lines += [
        "", "## Data", "", data_summary,
        "", "## Method", "",
        f"Hinton knowledge distillation, T = {spec.method.temperature}, alpha = {spec.method.alpha} "
        "(alpha weights the soft term: `alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE`).",
        f"Stages: teacher fine-tune {spec.stages.teacher_finetune_epochs} epochs, distillation "
        f"{spec.stages.distill_epochs}, student fine-tune {spec.stages.finetune_epochs}, baseline "
        f"{'yes' if spec.stages.baseline else 'no'}. Parameters shared from the teacher: "
        f"{metrics.get('shared_parameters', 0)} tensors.",
        "", "## Spec", "", "```yaml", _spec_yaml(spec), "```", "",
    ]
    path.write_text("\n".join(lines))
    return path


def _spec_yaml(spec: JobSpec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False).rstrip()
