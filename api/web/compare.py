"""Two or more jobs side by side: the spec fields they differ in, their figures, their curves.

Pure functions over `JobOut`s (and each job's curve points from `timeline.load_timeline`), so
the page's view stays thin. Also the jobs list's one-line result (student accuracy and gain).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api.schemas import JobOut
from api.web.report import count, fixed, percent, ratio, size_mb

MIN_JOBS, MAX_JOBS = 2, 8
CURVE_METRICS = (("val_accuracy", "Validation accuracy", "%"), ("val_loss", "Validation loss", ""))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _model(metrics: dict[str, Any], key: str) -> dict[str, Any]:
    value = metrics.get(key)
    return value if isinstance(value, dict) else {}


# ------------------------------------------------------------------------------ the list's result


@dataclass(frozen=True)
class Result:
    text: str  # "93.1%" (accuracy) or "ppl 12.4" (a language model)
    gain: str | None  # "+2.9 pts", "−0.041 nats/token"
    level: str  # success | warning | muted: how the gain reads (muted: within noise)
    title: str  # the long form, for the cell's tooltip


def result_of(metrics: dict[str, Any]) -> Result | None:
    """The student's headline figure and its gain over the baseline; None before there is one."""
    student = _model(metrics, "student")
    gain = _number(metrics.get("distillation_gain"))
    if metrics.get("task") == "causal_lm":
        perplexity = _number(student.get("perplexity"))
        if perplexity is None:
            return None
        text, title = f"ppl {perplexity:.1f}", f"student perplexity {perplexity:.2f}"
        # The LM gain is the baseline's loss minus the student's (nats per token): positive is better.
        gain_text = None if gain is None else f"{gain:+.3f} nats/token".replace("-", "−")
    else:
        accuracy = _number(student.get("accuracy"))
        if accuracy is None:
            return None
        text, title = percent(accuracy), f"student accuracy {percent(accuracy, 2)}"
        gain_text = None if gain is None else f"{gain * 100:+.1f} pts".replace("-", "−")
    if gain is None or gain_text is None:
        return Result(text, None, "muted", title + "; no baseline trained")
    within_noise = bool(metrics.get("distillation_gain_within_noise"))
    level = "muted" if within_noise else ("success" if gain > 0 else "warning")
    title += f"; {gain_text} over the baseline" + (" (within noise)" if within_noise else "")
    return Result(text, gain_text, level, title)


# ---------------------------------------------------------------------------- spec differences


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """`{"method": {"alpha": 0.5}}` → `{"method.alpha": 0.5}`; lists stay whole (one field)."""
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value} if prefix else {}


_MISSING = object()


def _shown(value: Any) -> str:
    if value is _MISSING:
        return "—"
    if isinstance(value, str):
        return value
    return json.dumps(value)


@dataclass(frozen=True)
class Difference:
    path: str
    cells: list[str]


def spec_differences(specs: list[dict[str, Any]], names: dict[str, str] | None = None) -> list[Difference]:
    """The dotted fields whose values are not the same in every spec, in the first spec's order.

    `names` turns file ids into "blobs.npz (file_…)", so a reader sees which data each job read.
    """
    flats = [flatten(spec) for spec in specs]
    paths = list(dict.fromkeys(path for flat in flats for path in flat))
    differences = []
    for path in paths:
        values = [flat.get(path, _MISSING) for flat in flats]
        if all(json.dumps(v, sort_keys=True, default=str) == json.dumps(values[0], sort_keys=True, default=str)
               for v in values if v is not _MISSING) and _MISSING not in values:
            continue
        cells = [f"{names[v]} ({v})" if isinstance(v, str) and names and v in names else _shown(v) for v in values]
        differences.append(Difference(path, cells))
    return differences


def file_ids(specs: list[dict[str, Any]]) -> set[str]:
    return {value for spec in specs for path, value in flatten(spec).items()
            if isinstance(value, str) and value.startswith("file_") and path.endswith(("file", "train", "test"))}


# ------------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class FigureRow:
    label: str
    cells: list[str]
    best: set[int]


_FIGURES: list[tuple[str, Callable[[dict[str, Any]], Any], Callable[[Any], str], bool | None]] = [
    ("Student accuracy", lambda m: _model(m, "student").get("accuracy"), percent, True),
    ("Baseline accuracy", lambda m: _model(m, "baseline").get("accuracy"), percent, True),
    ("Gain over the baseline", lambda m: m.get("distillation_gain") if m.get("task") != "causal_lm" else None,
     lambda v: fixed(None if v is None else v * 100, 1, " pts"), True),
    ("Teacher accuracy", lambda m: _model(m, "teacher").get("accuracy"), percent, None),
    ("Student perplexity", lambda m: _model(m, "student").get("perplexity"), lambda v: fixed(v, 2), False),
    ("Student loss", lambda m: _model(m, "student").get("loss"), lambda v: fixed(v, 4), False),
    ("Agreement with teacher", lambda m: m.get("agreement"), percent, True),
    ("Student parameters", lambda m: _model(m, "student").get("params"), count, False),
    ("Student size", lambda m: _model(m, "student").get("size_mb"), size_mb, False),
    ("Student latency", lambda m: _model(m, "student").get("latency_ms"), lambda v: fixed(v, 3, " ms"), False),
    ("Compression", lambda m: m.get("compression"), ratio, True),
    ("Speedup", lambda m: m.get("speedup"), ratio, True),
]


def _interval(metrics: dict[str, Any]) -> str | None:
    interval = metrics.get("distillation_gain_ci")
    if metrics.get("task") == "causal_lm" or not isinstance(interval, list) or len(interval) != 2:
        return None
    low, high = (_number(v) for v in interval)
    if low is None or high is None:
        return None
    return f"{low * 100:+.1f} to {high * 100:+.1f} pts"


def figure_rows(metrics: list[dict[str, Any]]) -> list[FigureRow]:
    """The figures any of the jobs has, one row each; the best value (where better means something) marked."""
    rows = []
    for label, getter, render, higher in _FIGURES:
        raw = [_number(getter(m)) for m in metrics]
        if all(v is None for v in raw):
            continue
        cells = [render(v) for v in raw]
        known = [(v, i) for i, v in enumerate(raw) if v is not None]
        best: set[int] = set()
        if higher is not None and len(known) > 1 and len({cells[i] for _, i in known}) > 1:
            winner = cells[(max(known) if higher else min(known))[1]]
            best = {i for _, i in known if cells[i] == winner}
        rows.append(FigureRow(label, cells, best))
    intervals = [_interval(m) for m in metrics]
    if any(intervals):
        rows.append(FigureRow("Gain, 95% interval", [i or "—" for i in intervals], set()))
    return rows


def warnings_of(metrics: dict[str, Any]) -> list[str]:
    """The job's warnings (student not smaller or not faster, teacher check, ...), as sentences."""
    found = metrics.get("warnings")
    if not isinstance(found, list):
        return []
    return [f"{text[:1].upper()}{text[1:]}" for text in (str(w).strip() for w in found) if text]


# -------------------------------------------------------------------------------------- curves


def curve_data(jobs: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per stage and per metric, one overlay: x = the epochs any job reached, one series per job.

    `jobs` is (label, curve points) per job; the points are the job page's (`Timeline.points`).
    The answer is JSON for compare.js, which draws it with uPlot as the job page does.
    """
    stages = list(dict.fromkeys(p["stage"] for _, points in jobs for p in points))
    charts = []
    for stage in stages:
        for key, title, unit in CURVE_METRICS:
            per_job = [{p["epoch"]: p.get(key) for p in points if p["stage"] == stage} for _, points in jobs]
            epochs = sorted({epoch for values in per_job for epoch, v in values.items() if v is not None})
            if not epochs:
                continue
            scale = 100.0 if unit == "%" else 1.0
            series = [[_scaled(values.get(e), scale) for e in epochs] for values in per_job]
            charts.append({"stage": stage, "key": key, "title": title, "unit": unit, "epochs": epochs,
                           "labels": [label for label, _ in jobs], "series": series})
    return charts


def _scaled(value: Any, scale: float) -> float | None:
    number = _number(value)
    return None if number is None else number * scale


def labels_for(jobs: list[JobOut]) -> list[str]:
    """Column headings: the job's name, made unique with its id's tail where two share a name."""
    names = [job.name or job.id for job in jobs]
    return [f"{name} ({job.id[-6:]})" if names.count(name) > 1 else name for name, job in zip(names, jobs, strict=True)]
