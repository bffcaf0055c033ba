"""Teacher vs distilled student on the *training* images of a finished job (the engine reports test only).

    .venv/bin/python bench/train_agreement.py bench/specs/hinton/student-800-T20.yaml runs/hinton/student-800-T20

Prints each model's training accuracy, how often they agree, and how many of the student's training
errors the teacher makes too: the figures docs/reproduction.md quotes for the T = 20 job.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from kdcore.data import load_data
from kdcore.models import build_model
from kdcore.spec import load_spec, resolve_local_paths
from kdcore.teacher import load_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="the job's spec")
    parser.add_argument("out", type=Path, help="the job's --out folder (holds student.safetensors)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = resolve_local_paths(load_spec(args.spec), args.spec.parent)
    data = load_data(spec.data, train_path=Path(spec.data.train), seed=spec.seed)
    teacher = load_teacher(spec.teacher, spec.teacher.file, input_shape=data.input_shape,
                           num_classes=data.num_classes).module.eval()
    student = build_model(spec.student.arch, spec.student.arch_args, data.input_shape, data.num_classes)
    student.load_state_dict(load_file(str(args.out / "student.safetensors")))
    x, y = data.preprocess(data.train.x), data.train.y
    with torch.inference_mode():
        t_pred, s_pred = teacher(x).argmax(1), student.eval()(x).argmax(1)
    print(f"training images: {len(y)}")
    print(f"teacher accuracy {(t_pred == y).float().mean():.4%}  errors {int((t_pred != y).sum())}")
    print(f"student accuracy {(s_pred == y).float().mean():.4%}  errors {int((s_pred != y).sum())}")
    print(f"agreement {(t_pred == s_pred).float().mean():.4%}; student errors the teacher makes too: "
          f"{int(((s_pred != y) & (t_pred != y)).sum())}")


if __name__ == "__main__":
    main()
