"""Samples/s of one job on 1 process against the same job on N processes (DDP, gloo on this CPU).

    .venv/bin/python bench/ddp_scaling.py                  # nproc 1 and 2, two rounds each, alternating
    .venv/bin/python bench/ddp_scaling.py --nproc 1 2 4 --rounds 3

Each run is `distillery distill SPEC --out DIR` on ../shared/data/mnist_small.npz (6,000 training
images) with a 1200-1200 MLP teacher (random weights: its speed, not its accuracy, matters here),
cached teacher logits and `distill_epochs: 3`; the figure is the median over the runs of the
training samples per second of epochs 2 and 3 (`history.csv`'s `train_time_s`: the step loop alone,
no data loading, validation or checkpoint). With `threads` unset, one process uses every core and N
processes take cores / N each, so on a 2-core machine the question is what DDP's all-reduce costs,
not whether two processes find more cores. On a GPU node the same spec scales over GPUs (NCCL).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "mnist_small.npz"
sys.path.insert(0, str(REPO))

CASES = {
    "mlp 800-800": {"arch": "mlp", "arch_args": {"hidden": [800, 800]}},
    "cnn": {"arch": "cnn", "arch_args": {}},
}


def make_teacher(folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from kdcore.models import build_model

    torch.manual_seed(0)
    teacher = build_model("mlp", {"hidden": [1200, 1200]}, (1, 28, 28), 10)
    path = folder / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    return path


def run(folder: Path, teacher: Path, student: dict[str, object], nproc: int, index: int) -> float:
    spec = {
        "teacher": {"file": str(teacher), "arch": "mlp", "arch_args": {"hidden": [1200, 1200]}},
        "student": student,
        "data": {"train": str(DATA), "val_fraction": 0.1},
        "stages": {"distill_epochs": 3, "baseline": False, "teacher_check": "off"},
        "batch_size": 128,
        "export": [],
        "distributed": {"nproc": nproc},
    }
    spec_path = folder / f"spec-{index}.json"
    spec_path.write_text(json.dumps(spec))
    out = folder / f"out-{index}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "kdcore.cli", "distill", str(spec_path), "--out", str(out),
                    "--no-progress"], check=True, env=env, capture_output=True)
    rows = (out / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    epochs = [dict(zip(header, row.split(","), strict=True)) for row in rows[1:]]
    train_samples = round(6000 * 0.9)
    return statistics.median(train_samples / float(e["train_time_s"]) for e in epochs[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="distillery-ddp-bench-") as scratch:
        folder = Path(scratch)
        teacher = make_teacher(folder)
        index = 0
        for _ in range(args.rounds):
            for name, student in CASES.items():
                for nproc in args.nproc:
                    index += 1
                    results.setdefault((name, nproc), []).append(run(folder, teacher, student, nproc, index))
                    print(f"{name} nproc {nproc}: {results[(name, nproc)][-1]:.0f} samples/s", flush=True)
    print()
    print(f"cores: {len(os.sched_getaffinity(0))}; no GPU here (CUDA available: ", end="")
    import torch

    print(f"{torch.cuda.is_available()})")
    print()
    print("| student | processes | samples/s (median) | vs 1 process |")
    print("| --- | ---: | ---: | ---: |")
    for name in CASES:
        one = statistics.median(results[(name, args.nproc[0])])
        for nproc in args.nproc:
            value = statistics.median(results[(name, nproc)])
            print(f"| {name} | {nproc} | {value:.0f} | {value / one:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
