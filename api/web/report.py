"""A finished job's numbers as the job page shows them: teacher vs student vs baseline, and bar charts.

Reads the job's `metrics` (the `metrics.json` layout of ARCHITECTURE.md, written by
`kdcore.pipeline._evaluate`): per model `accuracy`, `top5`, `loss`, `params`, `size_mb`,
`latency_ms`, `per_class_accuracy`; and `agreement`, `compression`, `speedup`,
`distillation_gain`, `eval_split`, `eval_samples`, `class_names`. The charts are plain SVG
geometry computed here and drawn by the template: no script needed to read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MODELS = (
    ("teacher", "Teacher"),
    ("student", "Student"),
    ("baseline", "Baseline"),
    ("student_int8", "Student int8"),
)
MODEL_NOTES = {
    "student": "distilled",
    "baseline": "same student, no teacher",
    "student_int8": "dynamic int8",
}
MAX_CLASSES_CHARTED = 20


@dataclass
class Row:
    label: str
    cells: list[str]
    help: str = ""
    best: set[int] = field(default_factory=set)  # the best cells (ties included), highlighted


@dataclass
class Bar:
    label: str
    value: float
    text: str
    series: str  # css class: teacher | student | baseline | student_int8
    y: float = 0.0
    width: float = 0.0


@dataclass
class BarChart:
    title: str
    bars: list[Bar]
    description: str
    groups: list[tuple[str, float]] = field(default_factory=list)  # per-class charts: (class label, y)
    height: float = 0.0
    bar_height: float = 18.0


@dataclass
class Comparison:
    models: list[tuple[str, str, str]]  # (key, label, note)
    rows: list[Row]
    notes: list[str]
    verdict: str | None
    verdict_level: str
    charts: list[BarChart]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def percent(value: Any, digits: int = 1) -> str:
    number = _number(value)
    return "—" if number is None else f"{number * 100:.{digits}f}%"


def count(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "—"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= limit:
            return f"{number / limit:.2f}{suffix}"
    return f"{number:.0f}"


def fixed(value: Any, digits: int = 2, unit: str = "") -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.{digits}f}{unit}"


def size_mb(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "—"
    return f"{number * 1000:.1f} kB" if number < 1 else f"{number:.2f} MB"


def ratio(value: Any) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.2f}×"


def _best(values: list[float | None], cells: list[str], *, higher: bool) -> set[int]:
    """The cells showing the best value (ties as displayed included); none when all look the same."""
    known = [(v, i) for i, v in enumerate(values) if v is not None]
    if len(known) < 2 or len({cells[i] for _, i in known}) == 1:
        return set()
    winner = cells[(max(known) if higher else min(known))[1]]
    return {i for _, i in known if cells[i] == winner}


def comparison(metrics: dict[str, Any]) -> Comparison | None:
    present = [(key, label, MODEL_NOTES.get(key, "")) for key, label in MODELS if isinstance(metrics.get(key), dict)]
    if not any(key == "teacher" for key, _, _ in present) or not any(key == "student" for key, _, _ in present):
        return None
    data = {key: metrics[key] for key, _, _ in present}
    teacher = data["teacher"]

    def row(label: str, getter: Callable[[dict[str, Any]], Any], render: Callable[[Any], str], *,
            help_text: str = "", higher: bool | None = None) -> Row:
        raw = [getter(data[key]) for key, _, _ in present]
        cells = [render(v) for v in raw]
        best = _best([_number(v) for v in raw], cells, higher=higher) if higher is not None else set()
        return Row(label, cells, help_text, best)

    def relative(numerator_key: str) -> Callable[[dict[str, Any]], Any]:
        def compute(model: dict[str, Any]) -> Any:
            teacher_value, value = _number(teacher.get(numerator_key)), _number(model.get(numerator_key))
            return teacher_value / value if teacher_value and value else None

        return compute

    rows = [
        row("Accuracy", lambda m: m.get("accuracy"), percent, higher=True,
            help_text="Share of the evaluation samples classified correctly."),
    ]
    if any(_number(m.get("top5")) is not None for m in data.values()):
        rows.append(row("Top-5 accuracy", lambda m: m.get("top5"), percent, higher=True))
    rows += [
        row("Loss", lambda m: m.get("loss"), lambda v: fixed(v, 4), higher=False, help_text="Mean cross-entropy."),
        row("Parameters", lambda m: m.get("params"), count, higher=False),
        row("Size", lambda m: m.get("size_mb"), size_mb, higher=False, help_text="Serialized weights."),
        row("Latency", lambda m: m.get("latency_ms"), lambda v: fixed(v, 3, " ms"), higher=False,
            help_text="Median CPU time of one batch-1 forward pass."),
        row("Compression", relative("size_mb"), ratio, higher=True, help_text="Teacher size ÷ model size."),
        row("Speedup", relative("latency_ms"), ratio, higher=True, help_text="Teacher latency ÷ model latency."),
    ]
    agreement = [None if key != "student" else metrics.get("agreement") for key, _, _ in present]
    rows.append(Row("Agreement with teacher", [percent(v) if v is not None else "—" for v in agreement],
                    "Share of samples where the student predicts what the teacher predicts."))

    notes = []
    if metrics.get("eval_split"):
        samples = metrics.get("eval_samples")
        notes.append(f"Evaluated on the {metrics['eval_split']}" + (f", {samples} samples." if samples else "."))
    if metrics.get("shared_parameters"):
        notes.append(f"{count(metrics['shared_parameters'])} parameters were copied from the teacher.")
    verdict, level = None, "info"
    gain = _number(metrics.get("distillation_gain"))
    if gain is not None:
        points = gain * 100
        student_accuracy = percent(data["student"].get("accuracy"))
        interval = _interval_text(metrics)
        if metrics.get("distillation_gain_within_noise"):
            verdict, level = (
                f"Within noise: the distilled student is {points:+.1f} points from its baseline, and the 95% interval "
                f"of that gain ({interval}) holds zero. More test samples (or more epochs) would tell them apart.",
                "info",
            )
        elif gain > 0:
            verdict, level = (f"Distillation helped: the student is {points:.1f} points above its baseline"
                              + (f" (95% interval {interval})." if interval else "."), "success")
        elif abs(points) < 0.05:
            verdict, level = (
                f"The distilled student did not beat its baseline: both reach {student_accuracy}. On this data the "
                "teacher added nothing the labels did not already teach.",
                "warning",
            )
        else:
            verdict, level = (
                f"The distilled student did not beat its baseline ({points:+.1f} points): training the same student "
                "without the teacher did as well. Try a higher temperature, more epochs or a different alpha.",
                "warning",
            )
    return Comparison(present, rows, notes, verdict, level, _charts(present, data, metrics))


def _interval_text(metrics: dict[str, Any]) -> str | None:
    interval = metrics.get("distillation_gain_ci")
    if not isinstance(interval, list) or len(interval) != 2:
        return None
    low, high = _number(interval[0]), _number(interval[1])
    return None if low is None or high is None else f"{low * 100:+.1f} to {high * 100:+.1f} points"


def _charts(present: list[tuple[str, str, str]], data: dict[str, dict[str, Any]],
            metrics: dict[str, Any]) -> list[BarChart]:
    charts = [
        _bar_chart("Accuracy", present, data, "accuracy", percent, "Accuracy of each model (higher is better)."),
        _bar_chart("Size", present, data, "size_mb", size_mb, "Serialized size of each model (smaller is better)."),
        _bar_chart("CPU latency", present, data, "latency_ms", lambda v: fixed(v, 3, " ms"),
                   "Batch-1 CPU latency of each model (lower is better)."),
    ]
    per_class = _per_class_chart(present, data, metrics.get("class_names"))
    if per_class is not None:
        charts.append(per_class)
    return [chart for chart in charts if chart.bars]


LABEL_WIDTH = 96.0
BAR_SPACE = 150.0
ROW_HEIGHT = 26.0


def _bar_chart(title: str, present: list[tuple[str, str, str]], data: dict[str, dict[str, Any]], key: str,
               render: Callable[[Any], str], description: str) -> BarChart:
    values = [(model, label, _number(data[model].get(key))) for model, label, _ in present]
    known = [(model, label, value) for model, label, value in values if value is not None]
    top = max((value for _, _, value in known), default=0.0) or 1.0
    bars = [
        Bar(label, value, render(value), model, y=index * ROW_HEIGHT, width=max(1.0, BAR_SPACE * value / top))
        for index, (model, label, value) in enumerate(known)
    ]
    return BarChart(title, bars, description, height=len(bars) * ROW_HEIGHT)


def _per_class_chart(present: list[tuple[str, str, str]], data: dict[str, dict[str, Any]],
                     class_names: Any) -> BarChart | None:
    series = [(model, label) for model, label, _ in present if isinstance(data[model].get("per_class_accuracy"), list)]
    if not series:
        return None
    classes = len(data[series[0][0]]["per_class_accuracy"])
    if classes == 0 or classes > MAX_CLASSES_CHARTED:
        return None
    names = class_names if isinstance(class_names, list) and len(class_names) >= classes else list(range(classes))
    bar_height = 10.0
    group_height = bar_height * len(series) + 10
    bars, groups = [], []
    for index in range(classes):
        top = index * group_height
        groups.append((str(names[index]), top))
        for offset, (model, label) in enumerate(series):
            values = data[model]["per_class_accuracy"]
            value = _number(values[index]) if index < len(values) else None
            if value is None:
                continue
            bars.append(Bar(label, value, percent(value, 0), model, y=top + offset * bar_height,
                            width=max(1.0, BAR_SPACE * value)))
    return BarChart("Accuracy per class", bars, "Accuracy of each model on each class.", groups=groups,
                    height=classes * group_height, bar_height=bar_height - 2)
