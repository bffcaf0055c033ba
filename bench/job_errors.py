"""Test errors of finished `distillery distill` jobs, and the share of the gap each distilled student recovered.

    .venv/bin/python bench/job_errors.py runs/hinton-mixup/student-800-T20-mixup1-seed*
    .venv/bin/python bench/job_errors.py runs/hinton-mixup/*seed* --scratch 127 138 142 132 139

Reads each job's metrics.json. A row per job: the teacher's, the distilled student's and (with
`stages.baseline: true`) the scratch student's test errors, and the gap recovered
(scratch - distilled) / (scratch - teacher). `--scratch` gives other scratch errors, one per job
in order (say, scratch students trained without the job's augmentation), for a second gap column.
The last row is the mean over the jobs; its gap recovered is that of the mean errors (pooled), not
the mean of the rows' ratios.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Any


@dataclass(frozen=True)
class Row:
    name: str
    teacher: float
    scratch: float | None  # the job's own baseline
    distilled: float
    agreement: float
    other_scratch: float | None


def errors(metrics: dict[str, Any], model: str) -> int:
    return round((1.0 - metrics[model]["accuracy"]) * metrics["eval_samples"])


def recovered(scratch: float | None, distilled: float, teacher: float) -> str:
    if scratch is None or scratch == teacher:
        return "-"
    return f"{(scratch - distilled) / (scratch - teacher):.0%}"


def text(value: float | None, fmt: str = "g") -> str:
    return "-" if value is None else format(value, fmt)


def mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return mean(present) if len(present) == len(values) else None


def read_row(job: Path, other_scratch: float | None) -> Row:
    metrics = json.loads((job / "metrics.json").read_text(encoding="utf-8"))
    scratch = errors(metrics, "baseline") if "baseline" in metrics else None
    return Row(job.name, errors(metrics, "teacher"), scratch, errors(metrics, "student"), metrics["agreement"],
               other_scratch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs", type=Path, nargs="+", help="job output folders (each holds metrics.json)")
    parser.add_argument("--scratch", type=float, nargs="*", default=None, help="other scratch errors, one per job")
    args = parser.parse_args()
    if args.scratch is not None and len(args.scratch) != len(args.jobs):
        parser.error(f"--scratch needs one value per job: {len(args.jobs)} jobs, {len(args.scratch)} values")
    others = args.scratch if args.scratch is not None else [None] * len(args.jobs)
    rows = [read_row(job, other) for job, other in zip(args.jobs, others, strict=True)]

    print("| job | teacher | scratch (job's own) | distilled | recovered | agreement | other scratch | recovered |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r.name} | {text(r.teacher)} | {text(r.scratch)} | {text(r.distilled)} | "
              f"{recovered(r.scratch, r.distilled, r.teacher)} | {r.agreement:.2%} | {text(r.other_scratch)} | "
              f"{recovered(r.other_scratch, r.distilled, r.teacher)} |")
    teacher = mean([r.teacher for r in rows])
    distilled = mean([r.distilled for r in rows])
    scratch = mean_or_none([r.scratch for r in rows])
    other = mean_or_none([r.other_scratch for r in rows])
    # "recovered" of the mean row is that of the mean errors (pooled), as docs/reproduction.md quotes it
    print(f"| **mean of {len(rows)}** | {teacher:.1f} | {text(scratch, '.1f')} | {distilled:.1f} | "
          f"{recovered(scratch, distilled, teacher)} | | {text(other, '.1f')} | "
          f"{recovered(other, distilled, teacher)} |")


if __name__ == "__main__":
    main()
