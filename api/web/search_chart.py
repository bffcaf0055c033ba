"""The web page's chart of a tuned job's search: each trial's validation metric over T (coloured by alpha),
drawn as plain SVG on the server, so the page needs no chart library for it and updates by a swap."""

from __future__ import annotations

from typing import Any

WIDTH, HEIGHT, PAD = 560, 240, 40
T_PATH, ALPHA_PATH = "method.temperature", "method.alpha"


def _scale(value: float, low: float, high: float, start: float, end: float) -> float:
    return start + (end - start) * ((value - low) / (high - low) if high > low else 0.5)


def search_points(summary: dict[str, Any]) -> dict[str, Any]:
    """Point positions, labels and axis ranges for `_job_search.html`'s SVG."""
    trials = [t for t in summary["trials"] if t.get("value") is not None]
    by_t = any(T_PATH in t["params"] for t in trials)
    xs = [float(t["params"].get(T_PATH, 0)) if by_t else float(t["number"]) for t in trials]
    ys = [float(t["value"]) for t in trials]
    x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y_low, y_high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    points = []
    for trial, x, y in zip(trials, xs, ys, strict=True):
        alpha = trial["params"].get(ALPHA_PATH)
        points.append({
            "x": round(_scale(x, x_low, x_high, PAD, WIDTH - PAD), 1),
            "y": round(_scale(y, y_low, y_high, HEIGHT - PAD, PAD), 1),
            "hue": round(240 - 240 * float(alpha)) if isinstance(alpha, int | float) else 200,
            "pruned": trial.get("pruned"), "best": trial["number"] == summary.get("best_trial"),
            "label": f"trial {trial['number']}: {summary['metric']} {y:.4f}"
                     + "".join(f", {k} = {v}" for k, v in trial["params"].items()),
            "number": trial["number"],
        })
    return {"width": WIDTH, "height": HEIGHT, "pad": PAD, "points": points,
            "x_title": "temperature T" if by_t else "trial", "y_title": f"{summary['metric']} (validation)",
            "x_range": [x_low, x_high], "y_range": [y_low, y_high]}
