"""Measure the distillation defaults (T, alpha, epochs) on the real image data sets of ../shared/data.

    .venv/bin/python bench/defaults_sweep.py                 # the grid below, printed as a markdown table
    .venv/bin/python bench/defaults_sweep.py --json bench/results/defaults_sweep.json

For each data set (MNIST's 6,000-image subset, USPS) the example's teacher (`cnn` 32/64, trained by
examples/mnist/train_teacher.py's own `train`) is distilled into the example's student (`mlp`, 256
units) for every T, alpha and epoch count of the grid, and the same student is trained without a
teacher for each epoch count: the baseline every cell is compared with. One CPU thread, seed 0,
the example job's optimiser: the figures are exact on a machine. The test split is reported; the
choice of defaults should still be made on figures that hold across data sets, not on one cell.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mnist"
DATA = ROOT.parent / "shared" / "data"
DATASETS = {"mnist_small": EXAMPLE / "mnist_small.npz", "usps": DATA / "usps.npz"}
TEMPERATURES = (2.0, 4.0)
ALPHAS = (0.5, 0.9)
EPOCHS = (3, 10)


def _spec(teacher: Path, data: Path, *, temperature: float, alpha: float, epochs: int, baseline: bool) -> Any:
    from kdcore.spec import parse_spec

    return parse_spec({
        "teacher": {"file": str(teacher), "arch": "cnn", "arch_args": {"widths": [32, 64], "hidden": 256,
                                                                        "dropout": 0.3}},
        "student": {"arch": "mlp", "arch_args": {"hidden": [256]}},
        "data": {"train": str(data), "val_fraction": 0.1},
        "method": {"temperature": temperature, "alpha": alpha},
        # The pipeline's own baseline (same student, seed and epochs, no teacher), once per epoch count.
        "stages": {"distill_epochs": epochs, "baseline": baseline},
        "optim": {"name": "adamw", "lr": 0.003, "schedule": "cosine"},
        "batch_size": 128, "seed": 0, "threads": 1, "export": [],
    })


def sweep(workdir: Path, datasets: dict[str, Path]) -> list[dict[str, Any]]:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(EXAMPLE))
    import train_teacher

    from kdcore.pipeline import JobInputs, RunOptions, run_job

    torch.set_num_threads(1)
    rows = []
    for name, data in datasets.items():
        model, teacher_accuracy = train_teacher.train(data, epochs=train_teacher.EPOCHS, seed=train_teacher.SEED)
        teacher = workdir / f"{name}-teacher.safetensors"
        save_file({key: tensor.contiguous() for key, tensor in model.state_dict().items()}, str(teacher))
        inputs = JobInputs(teacher=teacher, train=data)

        baselines: dict[int, float] = {}
        for temperature, alpha, epochs in itertools.product(TEMPERATURES, ALPHAS, EPOCHS):
            started = time.monotonic()
            spec = _spec(teacher, data, temperature=temperature, alpha=alpha, epochs=epochs,
                         baseline=epochs not in baselines)
            metrics = run_job(spec, inputs, RunOptions(out_dir=workdir / f"{name}-{temperature}-{alpha}-{epochs}",
                                                       latency_runs=2)).metrics
            if "baseline" in metrics:
                baselines[epochs] = float(metrics["baseline"]["accuracy"])
            student = float(metrics["student"]["accuracy"])
            rows.append({"data": name, "teacher": teacher_accuracy, "temperature": temperature, "alpha": alpha,
                         "epochs": epochs, "student": student, "baseline": baselines[epochs],
                         "gain": student - baselines[epochs], "seconds": round(time.monotonic() - started, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| data | teacher | T | alpha | epochs | student | baseline | gain |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['data']} | {row['teacher']:.3f} | {row['temperature']:g} | {row['alpha']:g} | "
                     f"{row['epochs']} | {row['student']:.3f} | {row['baseline']:.3f} | {100 * row['gain']:+.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    missing = [str(path) for path in DATASETS.values() if not path.exists()]
    if missing:
        print(f"missing data sets: {', '.join(missing)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        rows = sweep(Path(scratch), DATASETS)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
