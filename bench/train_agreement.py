"""Teacher vs distilled student on the *training* images of a finished job (the engine reports test only).

    .venv/bin/python bench/train_agreement.py bench/specs/hinton/student-800-T20.yaml runs/hinton/student-800-T20
    .venv/bin/python bench/train_agreement.py bench/specs/hinton-mixup/screen/mix1-a0.9.yaml runs/screen/mix1-a0.9 \\
        --split val

Prints each model's accuracy, how often they agree, and how many of the student's errors the
teacher makes too: the figures docs/reproduction.md quotes for the T = 20 job. `--split val` does
the same on the job's validation split (`data.val_fraction`: training images the student never
saw), and adds the scratch student's errors there from the job's history.csv (its last epoch):
the screening figures of the mixup section.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
from safetensors.torch import load_file

from kdcore.data import load_data
from kdcore.models import build_model
from kdcore.spec import load_spec, resolve_local_paths
from kdcore.teacher import load_teacher


def baseline_errors(history: Path, samples: int) -> int | None:
    """Errors of the baseline stage's last epoch on the validation split, as the job logged them."""
    rows = [row for row in csv.DictReader(history.open(encoding="utf-8")) if row["stage"] == "baseline"]
    if not rows or not rows[-1].get("val_accuracy"):
        return None
    return round((1.0 - float(rows[-1]["val_accuracy"])) * samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="the job's spec")
    parser.add_argument("out", type=Path, help="the job's --out folder (holds student.safetensors)")
    parser.add_argument("--split", choices=("train", "val"), default="train", help="which images (default: train)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = resolve_local_paths(load_spec(args.spec), args.spec.parent)
    data = load_data(spec.data, train_path=Path(spec.data.train), seed=spec.seed)
    split = data.train if args.split == "train" else data.val
    if split is None or len(split) == 0:
        parser.error("the job has no validation split (data.val_fraction is 0)")
    teacher = load_teacher(spec.teacher, spec.teacher.file, input_shape=data.input_shape,
                           num_classes=data.num_classes).module.eval()
    student = build_model(spec.student.arch, spec.student.arch_args, data.input_shape, data.num_classes)
    student.load_state_dict(load_file(str(args.out / "student.safetensors")))
    x, y = data.preprocess(split.x), split.y
    with torch.inference_mode():
        t_pred, s_pred = teacher(x).argmax(1), student.eval()(x).argmax(1)
    print(f"{args.split} images: {len(y)}")
    print(f"teacher accuracy {(t_pred == y).float().mean():.4%}  errors {int((t_pred != y).sum())}")
    print(f"student accuracy {(s_pred == y).float().mean():.4%}  errors {int((s_pred != y).sum())}")
    print(f"agreement {(t_pred == s_pred).float().mean():.4%}; student errors the teacher makes too: "
          f"{int(((s_pred != y) & (t_pred != y)).sum())}")
    if args.split == "val" and (scratch := baseline_errors(args.out / "history.csv", len(y))) is not None:
        print(f"scratch student (baseline stage, last epoch) errors {scratch}")


if __name__ == "__main__":
    main()
