"""The search section of a tuned job's report: the trials' table, the metric over T and alpha, and, under
a latency or size budget, the accuracy/latency Pareto front of the trials.

Takes the search as plain data (`service.tuning.search_summary`), so the engine knows nothing of jobs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

T_PATH, ALPHA_PATH = "method.temperature", "method.alpha"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def pareto_front(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials no other beats on both accuracy (higher) and latency (lower), fastest first."""
    measured = [t for t in trials if t.get("value") is not None and t.get("latency_ms") is not None]
    front = [t for t in measured if not any(
        o["value"] >= t["value"] and o["latency_ms"] <= t["latency_ms"]
        and (o["value"] > t["value"] or o["latency_ms"] < t["latency_ms"]) for o in measured)]
    return sorted(front, key=lambda t: t["latency_ms"])


def search_markdown(summary: dict[str, Any], *, plot: str | None = "search.png",
                    pareto_plot: str | None = None) -> str:
    metric = summary["metric"]
    trials = summary["trials"]
    paths = list(dict.fromkeys(path for t in trials for path in t["params"]))
    lines = ["## Search", ""]
    best = summary.get("best_trial")
    if summary.get("best") is not None:
        lines.append(f"{len(trials)} trials searched {', '.join(paths)} on the validation split ({metric}); "
                     f"trial {best} won with {_fmt(summary.get('best_value'))}, and the full run above used its "
                     f"settings: {', '.join(f'{k} = {_fmt(v)}' for k, v in summary['best'].items())}.")
    gain = summary.get("gain_over_defaults")
    if gain is not None:
        lines.append(f"Against the spec's own settings (trial 0, {_fmt(summary.get('defaults_value'))}) the chosen "
                     f"ones gained {gain:+.4f} {metric} on validation, at the trials' budget of epochs.")
    objective = summary.get("objective")
    if objective:
        budget = ", ".join(f"{k} ≤ {v}" for k, v in objective.items() if v is not None)
        lines.append(f"Only students within the budget ({budget}; latency measured on the CPU at batch 1) could win.")
    header = ["trial", *paths, metric, "pruned", "epochs", "state"]
    if objective:
        header += ["latency (ms)", "params", "within budget"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for t in trials:
        cells = [str(t["number"]) + (" (best)" if t["number"] == best else "") + (" (defaults)" if t["number"] == 0
                                                                                 else ""),
                 *(_fmt(t["params"].get(path)) for path in paths), _fmt(t.get("value")),
                 "yes" if t.get("pruned") else "no", str(t.get("epochs_run", "")), t["state"]]
        if objective:
            cells += [_fmt(t.get("latency_ms")), _fmt(t.get("params_count")), _fmt(t.get("feasible"))]
        lines.append("| " + " | ".join(cells) + " |")
    if plot:
        lines += ["", f"![{metric} over T and alpha]({plot})"]
    if pareto_plot:
        front = pareto_front(trials)
        lines += ["", "Accuracy/latency Pareto front of the trials: "
                  + ", ".join(f"trial {t['number']} ({_fmt(t['value'])} at {_fmt(t['latency_ms'])} ms)" for t in front),
                  "", f"![Pareto front]({pareto_plot})"]
    return "\n".join(lines) + "\n"


def write_search_plot(summary: dict[str, Any], path: Path) -> Path:
    """The metric of every trial over T (x) and alpha (colour); pruned trials hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["metric"]
    trials = [t for t in summary["trials"] if t.get("value") is not None]
    figure, axis = plt.subplots(figsize=(6, 4))
    xs = [float(t["params"].get(T_PATH, 0) or 0) for t in trials]
    alphas = [float(t["params"].get(ALPHA_PATH, 0) or 0) for t in trials]
    values = [float(t["value"]) for t in trials]
    scatter = axis.scatter(xs, values, c=alphas, cmap="viridis", vmin=0, vmax=1, s=60,
                           edgecolors=["red" if t.get("pruned") else "black" for t in trials])
    for t, x, y in zip(trials, xs, values, strict=True):
        axis.annotate(str(t["number"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xlabel("temperature T" if any(T_PATH in t["params"] for t in trials) else "(T not searched)")
    axis.set_ylabel(f"{metric} (validation)")
    figure.colorbar(scatter, ax=axis, label="alpha")
    axis.set_title("Search: one point per trial (red edge: pruned)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_pareto_plot(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in summary["trials"] if t.get("value") is not None and t.get("latency_ms") is not None]
    front = pareto_front(trials)
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.scatter([t["latency_ms"] for t in trials], [t["value"] for t in trials],
                 c=["tab:green" if t.get("feasible") else "tab:gray" for t in trials])
    axis.plot([t["latency_ms"] for t in front], [t["value"] for t in front], "k--", label="Pareto front")
    limit = (summary.get("objective") or {}).get("max_latency_ms")
    if limit:
        axis.axvline(limit, color="red", label="latency budget")
    axis.set_xlabel("latency (ms, CPU, batch 1)")
    axis.set_ylabel(f"{summary['metric']} (validation)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_search_report(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """search.json, search.png (and pareto.png under a budget), and the section appended to report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "search.json"]
    written[0].write_text(json.dumps(summary, indent=2))
    written.append(write_search_plot(summary, out_dir / "search.png"))
    pareto = None
    if summary.get("objective"):
        written.append(write_pareto_plot(summary, out_dir / "pareto.png"))
        pareto = "pareto.png"
    section = search_markdown(summary, pareto_plot=pareto)
    report = out_dir / "report.md"
    if report.exists():
        report.write_text(report.read_text() + "\n" + section)
    else:
        report.write_text(section)
        written.append(report)
    return written
