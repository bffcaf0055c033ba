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
    """Loss and accuracy per epoch, one line per stage (train solid, validation dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in dict.fromkeys(row["stage"] for row in history):
        rows = [row for row in history if row["stage"] == stage]
        epochs = [row["epoch"] for row in rows]
        label = STAGE_TITLES.get(stage, stage)
        line, = loss_axis.plot(epochs, [row["train_loss"] for row in rows], label=f"{label} train")
        if "val_loss" in rows[0]:
            loss_axis.plot(epochs, [row["val_loss"] for row in rows], "--", color=line.get_color(),
                           label=f"{label} val")
            accuracy_axis.plot(epochs, [row["val_accuracy"] for row in rows], "--", color=line.get_color(),
                               label=f"{label} val")
        accuracy_axis.plot(epochs, [row["train_accuracy"] for row in rows], color=line.get_color(),
                           label=f"{label} train")
    loss_axis.set(title="loss", xlabel="epoch")
    accuracy_axis.set(title="accuracy", xlabel="epoch", ylim=(None, 1.0))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, path)
    return path


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
    if gain > 0:
        return (f"The distilled student beat the same student trained without a teacher by "
                f"{100 * gain:.2f} points ({_pct(student['accuracy'])} vs {_pct(baseline['accuracy'])}).")
    return (f"**The distilled student did not beat its baseline**: {_pct(student['accuracy'])} vs "
            f"{_pct(baseline['accuracy'])} without a teacher ({100 * gain:+.2f} points). A weaker teacher than "
            "the student trained alone, or a tiny student at a high temperature, makes distillation hurt: "
            "try a lower `method.temperature`, a larger student or a better teacher.")


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
        f"{_pct(metrics['teacher']['accuracy'])}, at {metrics['compression']:.1f}x smaller size and "
        f"{metrics['speedup']:.1f}x the speed (CPU, batch 1).",
        f"- Agreement: the student predicts the teacher's class on {_pct(metrics['agreement'])} of samples.",
        f"- Evaluated on: {metrics['eval_split']} ({metrics['eval_samples']:,} samples).",
        "",
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
