"""One training step of the Hinton teacher (784-1200-1200-10, batch 128, AdamW) in fp32 and in bf16.

    .venv/bin/python bench/precision_step.py [--threads 1] [--steps 20]

Prints ms per step and bf16/fp32: above 1 means bf16 autocast is slower here (no AVX512-BF16/AMX,
so it is emulated), which is when `distillery distill` warns (kdcore.runtime.cpu_has_native_bf16).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from kdcore.runtime import cpu_has_native_bf16


def ms_per_step(precision: str, steps: int) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 1200), nn.ReLU(), nn.Linear(1200, 1200), nn.ReLU(), nn.Linear(1200, 10))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    warmup = 5
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fp32, bf16 = ms_per_step("fp32", args.steps), ms_per_step("bf16", args.steps)
    print(f"native bf16: {cpu_has_native_bf16()}")
    print("| precision | ms/step |\n| --- | --- |")
    print(f"| fp32 | {fp32:.1f} |\n| bf16 | {bf16:.1f} |")
    print(f"bf16 / fp32 time: {bf16 / fp32:.2f}x")


if __name__ == "__main__":
    main()
