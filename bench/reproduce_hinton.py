"""Rerun Hinton, Vinyals & Dean (2015)'s MNIST experiment with `distillery distill`.

    .venv/bin/python bench/reproduce_hinton.py            # the full run (about an hour on 2 cores)
    .venv/bin/python bench/reproduce_hinton.py --quick    # a smoke run of every step (a few minutes)

Every step is a `distillery distill SPEC --out DIR` job. The script writes the specs to
`bench/specs/hinton/` (paths in them are relative to that folder, as the CLI resolves them), runs
the jobs one after another into `--out` (default `runs/hinton/`, skipping jobs whose metrics.json
is already there), then reads every metrics.json and prints the table of docs/reproduction.md.

1. teacher: a 784-1200-1200-10 MLP with dropout 0.5 after each hidden layer, trained on all 60,000
   images with +-2 px jitter (`data.augment: shift`), as the paper's. Distillery trains it as the
   "student" of a job with only a hard-label stage (`distill_epochs: 0, finetune_epochs: N`): the
   job's own teacher is a placeholder (a zero linear layer written here), so the teacher's training
   stays apart from any distillation. Its student.safetensors is the teacher.
2. 800-800 students (no dropout, no other regulariser, as the paper's), distilled at each T with the
   teacher's logits cached (`augment: none`); the T=20 job also trains the scratch student with the
   same budget and the same data (`stages.baseline: true`).
3. the same with the jittered transfer set (`augment: shift`: the engine runs the teacher live
   each step); its baseline is jittered too (same pipeline).
4. the tiny 784-30-30-10 student, scratch and distilled at a few T.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mnist.npz"
SPEC_DIR = ROOT / "bench" / "specs" / "hinton"
DEFAULT_OUT = ROOT / "runs" / "hinton"
DISTILLERY = ROOT / ".venv" / "bin" / "distillery"

STUDENT_ARGS = {"hidden": [800, 800]}
TINY_ARGS = {"hidden": [30, 30]}
PAPER = {"teacher": 67, "scratch": 146, "distilled T=20": 74}


@dataclass
class Job:
    name: str
    spec: dict[str, Any]
    group: str  # teacher | plain | jitter | tiny
    temperature: float | None = None
    has_baseline: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def build_jobs(args: argparse.Namespace, out: Path, spec_dir: Path) -> list[Job]:
    def rel(path: Path) -> str:
        """`path` relative to the spec folder: the CLI resolves a spec's paths against its own folder."""
        return os.path.relpath(path, spec_dir)

    data = rel(Path(args.data).resolve())
    teacher_args = {"hidden": [1200, 1200], "dropout": 0.5, "input_dropout": args.teacher_input_dropout}
    common = {"batch_size": 128, "seed": args.seed, "precision": args.precision, "threads": args.threads,
              "export": ["safetensors"]}
    optim = {"name": "adamw", "lr": args.lr, "weight_decay": 0.0, "schedule": "cosine"}
    placeholder = rel(out / "placeholder_teacher.safetensors")
    teacher_file = rel(out / "teacher" / "student.safetensors")
    teacher = {"file": teacher_file, "format": "safetensors", "arch": "mlp", "arch_args": teacher_args}
    teacher_optim = {"name": args.teacher_optim, "lr": args.teacher_lr, "weight_decay": args.teacher_weight_decay,
                     "schedule": "cosine"}
    if args.teacher_optim == "sgd":
        teacher_optim["momentum"] = args.teacher_momentum
    if args.teacher_max_norm is not None:
        teacher_optim["max_norm"] = args.teacher_max_norm

    jobs = [Job("teacher", {
        "name": "hinton-teacher-1200-1200-dropout-jitter",
        "teacher": {"file": placeholder, "format": "safetensors", "arch": "linear"},
        "student": {"arch": "mlp", "arch_args": teacher_args},
        "data": {"train": data, "val_fraction": 0.0, "augment": "shift"},
        "stages": {"distill_epochs": 0, "finetune_epochs": args.teacher_epochs},
        "optim": teacher_optim,
        **common,
    }, "teacher")]

    def distill(name: str, group: str, student_args: dict[str, Any], temperature: float, *, augment: str,
                baseline: bool, epochs: int, seed: int = args.seed) -> Job:
        return Job(name, {
            "name": f"hinton-{name}",
            "teacher": teacher,
            "student": {"arch": "mlp", "arch_args": student_args},
            "data": {"train": data, "val_fraction": 0.0, "augment": augment},
            "method": {"name": "kd", "temperature": temperature, "alpha": args.alpha},
            "stages": {"distill_epochs": epochs, "baseline": baseline},
            "optim": optim,
            **common,
            "seed": seed,
        }, group, temperature, baseline, extra={"seed": seed})

    for t in args.temperatures:
        jobs.append(distill(f"student-800-T{t:g}", "plain", STUDENT_ARGS, t, augment="none",
                            baseline=t == args.baseline_temperature, epochs=args.epochs))
    # The headline comparison (scratch vs distilled at the baseline temperature) again at other seeds:
    # single runs differ by a few errors, as much as the temperatures do.
    for seed in args.extra_seeds:
        jobs.append(distill(f"student-800-T{args.baseline_temperature:g}-seed{seed}", "seeds", STUDENT_ARGS,
                            args.baseline_temperature, augment="none", baseline=True, epochs=args.epochs, seed=seed))
    for t in args.jitter_temperatures:
        jobs.append(distill(f"student-800-jitter-T{t:g}", "jitter", STUDENT_ARGS, t, augment="shift",
                            baseline=t == args.jitter_temperatures[0], epochs=args.jitter_epochs))
    for t in args.tiny_temperatures:
        jobs.append(distill(f"student-30-T{t:g}", "tiny", TINY_ARGS, t, augment="none",
                            baseline=t == args.tiny_temperatures[0], epochs=args.epochs))
    return jobs


def write_placeholder_teacher(path: Path) -> None:
    """A zero 784->10 linear layer: the stand-in teacher of the job that trains the real teacher."""
    import numpy as np
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"1.weight": np.zeros((10, 784), np.float32), "1.bias": np.zeros(10, np.float32)}, str(path))


def run(job: Job, out: Path, spec_dir: Path) -> dict[str, Any]:
    spec_path = spec_dir / f"{job.name}.yaml"
    job_out = out / job.name
    metrics_path = job_out / "metrics.json"
    if metrics_path.exists():
        print(f"[{job.name}] done before, reusing {metrics_path.relative_to(ROOT)}", flush=True)
        return json.loads(metrics_path.read_text())
    command = [str(DISTILLERY), "distill", os.path.relpath(spec_path, ROOT), "--out", os.path.relpath(job_out, ROOT)]
    print(f"[{job.name}] {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, check=True)
    elapsed = time.monotonic() - started
    metrics = json.loads(metrics_path.read_text())
    (job_out / "wall_time_s.txt").write_text(f"{elapsed:.1f}\n")
    print(f"[{job.name}] {elapsed:.0f} s", flush=True)
    return metrics


def errors(accuracy: float, samples: int) -> int:
    return round((1.0 - accuracy) * samples)


def epoch_seconds(job_out: Path, stage: str) -> float | None:
    history = job_out / "history.csv"
    if not history.exists():
        return None
    import csv

    with history.open() as handle:
        times = [float(row["train_time_s"]) for row in csv.DictReader(handle) if row["stage"] == stage]
    return sum(times) / len(times) if times else None


def seed_rows(jobs: list[Job], results: dict[str, dict[str, Any]], n: int, teacher_errors: int,
              summary: dict[str, Any]) -> list[str]:
    """The headline job (scratch and distilled at the baseline temperature) at every seed, and their mean."""
    headline = [job for job in jobs if job.has_baseline and job.group in ("plain", "seeds") and job.name in results]
    if len(headline) < 2:
        return []
    rows, pairs = [], []
    for job in headline:
        scratch = errors(results[job.name]["baseline"]["accuracy"], n)
        student = errors(results[job.name]["student"]["accuracy"], n)
        pairs.append((scratch, student))
        recovered = (scratch - student) / (scratch - teacher_errors) if scratch != teacher_errors else float("nan")
        rows.append(f"| 800-800 scratch -> distilled, seed {job.extra['seed']} | original 60k (cached teacher) | "
                    f"{job.temperature:g} | {scratch} -> {student} | {recovered:.0%} | | |")
    mean_scratch = sum(pair[0] for pair in pairs) / len(pairs)
    mean_student = sum(pair[1] for pair in pairs) / len(pairs)
    recovered = (mean_scratch - mean_student) / (mean_scratch - teacher_errors)
    rows.append(f"| **800-800 scratch -> distilled, mean of {len(pairs)} seeds** | original 60k (cached teacher) "
                f"| {headline[0].temperature:g} | **{mean_scratch:.1f} -> {mean_student:.1f}** | **{recovered:.0%}** "
                "| | |")
    summary["headline seeds"] = {"scratch": [p[0] for p in pairs], "distilled": [p[1] for p in pairs],
                                 "recovered_of_means": recovered}
    return rows


def table(jobs: list[Job], results: dict[str, dict[str, Any]], out: Path) -> str:
    teacher_metrics = results["teacher"]["student"]
    n = results["teacher"]["eval_samples"]
    teacher_errors = errors(teacher_metrics["accuracy"], n)
    lines = ["| model | transfer set | T | test errors | gap recovered | s/epoch | job wall time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]

    def wall(name: str) -> str:
        path = out / name / "wall_time_s.txt"
        if path.exists():
            return f"{float(path.read_text()):.0f} s"
        history = out / name / "history.csv"
        if not history.exists():
            return "?"
        import csv

        with history.open() as handle:
            total = sum(float(row["train_time_s"]) for row in csv.DictReader(handle))
        return f"{total:.0f} s (training epochs)"

    def per_epoch(name: str, stage: str) -> str:
        value = epoch_seconds(out / name, stage)
        return f"{value:.1f}" if value is not None else "?"

    lines.append(f"| teacher 1200-1200 (dropout) | 60k, +-2 px jitter | - | {teacher_errors} | - | "
                 f"{per_epoch('teacher', 'finetune')} | {wall('teacher')} |")
    summary: dict[str, Any] = {"teacher_errors": teacher_errors}
    for group, label, size in (("plain", "original 60k (cached teacher)", "800-800"),
                               ("jitter", "60k, +-2 px jitter (live teacher)", "800-800"),
                               ("tiny", "original 60k (cached teacher)", "30-30")):
        members = [job for job in jobs if job.group == group and job.name in results]
        if not members:
            continue
        base_job = next((job for job in members if job.has_baseline), None)
        scratch = errors(results[base_job.name]["baseline"]["accuracy"], n) if base_job else None
        if base_job:
            lines.append(f"| {size} scratch (same budget and data: `baseline: true`) | {label} | - | {scratch} | "
                         f"0% | {per_epoch(base_job.name, 'baseline')} | (in {base_job.name}) |")
        for job in members:
            student = errors(results[job.name]["student"]["accuracy"], n)
            gap = "-"
            if scratch is not None and scratch != teacher_errors:
                recovered = (scratch - student) / (scratch - teacher_errors)
                gap = f"{recovered:.0%}"
                summary[f"{group} T={job.temperature:g} recovered"] = recovered
            lines.append(f"| {size} distilled | {label} | {job.temperature:g} | {student} | {gap} | "
                         f"{per_epoch(job.name, 'distill')} | {wall(job.name)} |")
            summary[f"{group} T={job.temperature:g}"] = student
        summary[f"{group} scratch"] = scratch
    lines.extend(seed_rows(jobs, results, n, teacher_errors, summary))
    lines.append("")
    paper_gap = (PAPER["scratch"] - PAPER["distilled T=20"]) / (PAPER["scratch"] - PAPER["teacher"])
    lines.append(f"Paper (Hinton et al. 2015, section 3): teacher {PAPER['teacher']}, 800-800 scratch "
                 f"{PAPER['scratch']}, 800-800 distilled at T=20 {PAPER['distilled T=20']} test errors "
                 f"(gap recovered {paper_gap:.0%}).")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA), help="mnist.npz (x_train, y_train, x_test, y_test)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the jobs write (inside the repo)")
    parser.add_argument("--teacher-epochs", type=int, default=100)
    parser.add_argument("--teacher-optim", default="adamw", choices=["adamw", "sgd"])
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument("--teacher-momentum", type=float, default=0.9, help="with --teacher-optim sgd")
    parser.add_argument("--teacher-weight-decay", type=float, default=0.0)
    parser.add_argument("--teacher-max-norm", type=float, default=None, help="max-norm constraint (optim.max_norm)")
    parser.add_argument("--teacher-input-dropout", type=float, default=0.2, help="dropout on the teacher's pixels")
    parser.add_argument("--epochs", type=int, default=60, help="epochs of every cached-teacher student job")
    parser.add_argument("--jitter-epochs", type=int, default=30)
    parser.add_argument("--temperatures", type=float, nargs="*", default=[1.0, 4.0, 8.0, 20.0])
    parser.add_argument("--baseline-temperature", type=float, default=20.0, help="the job that also trains scratch")
    parser.add_argument("--jitter-temperatures", type=float, nargs="*", default=[20.0])
    parser.add_argument("--tiny-temperatures", type=float, nargs="*", default=[2.5, 4.0, 8.0])
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft term")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16 only where the CPU has AVX512-BF16/AMX (or on a GPU): emulated, it is 5-8x slower")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job (1 suits a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-seeds", type=int, nargs="*", default=[1, 2],
                        help="seeds at which the headline scratch-vs-distilled job runs again")
    parser.add_argument("--parallel", type=int, default=1, help="student jobs run at once (each with --threads)")
    parser.add_argument("--quick", action="store_true", help="2 teacher epochs, 1 student epoch: a smoke run")
    parser.add_argument("--table-only", action="store_true", help="only collect the metrics already there")
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher_epochs, args.epochs, args.jitter_epochs = 2, 1, 1
        args.out = str(ROOT / "runs" / "hinton-quick")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.data).exists():
        print(f"skipped: {args.data} is not here (the real MNIST of ../shared/data; see its README)")
        return 0
    out = Path(args.out).resolve()
    # The default run's specs live in the repository; any other run's (--quick, another --out) stay
    # next to its outputs, so trying other flags never rewrites the committed ones.
    spec_dir = SPEC_DIR if out == DEFAULT_OUT and not args.quick else out / "specs"
    jobs = build_jobs(args, out, spec_dir)
    results: dict[str, dict[str, Any]] = {}
    if not args.table_only:
        spec_dir.mkdir(parents=True, exist_ok=True)
        for job in jobs:
            (spec_dir / f"{job.name}.yaml").write_text(yaml.safe_dump(job.spec, sort_keys=False))
        write_placeholder_teacher(out / "placeholder_teacher.safetensors")
    if args.table_only:
        for job in jobs:
            path = out / job.name / "metrics.json"
            if path.exists():
                results[job.name] = json.loads(path.read_text())
    else:
        results["teacher"] = run(jobs[0], out, spec_dir)  # every other job needs the teacher
        # The headline jobs (those that also train the scratch student) first.
        students = sorted(jobs[1:], key=lambda job: not job.has_baseline)
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            for job, metrics in zip(students, pool.map(lambda job: run(job, out, spec_dir), students), strict=True):
                results[job.name] = metrics
    if "teacher" not in results:
        print("no teacher metrics yet")
        return 1
    print(table(jobs, results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
