"""Train a teacher for the MNIST example and save it as `teacher.safetensors`.

    python examples/mnist/train_teacher.py        # about 20 s on one CPU core

The teacher is the registry's small convnet (`cnn`, widths 32/64), trained for a few epochs on the
6,000 images of `mnist_small.npz` with ±2 px random shifts, which makes it clearly better than an
MLP trained on the same images: a student then has something to learn from it. Pixels are scaled
to [0, 1] and not normalised further, which is what `data.normalize` (mean 0, std 1) in `job.yaml`
says; a teacher must be fed exactly what it was trained on.

The weights go to safetensors (a plain tensor file: loading it runs no code), so the job spec has
to name the architecture that holds them: `teacher.arch: cnn` with the `arch_args` printed below.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kdcore.augment import shift
from kdcore.models import build_model

HERE = Path(__file__).resolve().parent
TEACHER_ARCH = "cnn"
TEACHER_ARGS = {"widths": [32, 64], "hidden": 256, "dropout": 0.3}
EPOCHS, SEED = 6, 0  # the defaults; bench/first_distillation.py runs them for the docs' figures


def train(data_path: Path, *, epochs: int, seed: int) -> tuple[torch.nn.Module, float]:
    with np.load(data_path) as data:
        x = torch.from_numpy(data["x_train"]).float().div(255).unsqueeze(1)  # N×1×28×28 in [0, 1]
        y = torch.from_numpy(data["y_train"]).long()
        x_test = torch.from_numpy(data["x_test"]).float().div(255).unsqueeze(1)
        y_test = torch.from_numpy(data["y_test"]).long()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(TEACHER_ARCH, TEACHER_ARGS, tuple(x.shape[1:]), 10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch_size = 64
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(model(shift(x[batch], generator)), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}", flush=True)
    model.eval()
    with torch.inference_mode():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return model, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=HERE / "mnist_small.npz", help="npz with x_train, y_train, ...")
    parser.add_argument("--out", type=Path, default=HERE / "teacher.safetensors", help="where the weights go")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; more than the idle cores only slows it down"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    model, accuracy = train(args.data, epochs=args.epochs, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, str(args.out))
    print(f"test accuracy {accuracy:.4f} after {time.monotonic() - started:.0f} s; saved {args.out}")
    print("in the job spec: teacher: " + json.dumps({"arch": TEACHER_ARCH, "arch_args": TEACHER_ARGS}))


if __name__ == "__main__":
    main()
