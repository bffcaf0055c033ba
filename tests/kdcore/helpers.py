"""Data and teachers that the kdcore tests make for themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from kdcore.models import build_model


def make_blob_images(path: Path, *, num_train: int = 600, num_test: int = 200, size: int = 8,
                     num_classes: int = 4, seed: int = 0) -> Path:
    """uint8 images where each class lights a different patch, plus noise: learnable in a few epochs."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, num_classes, size=n)
        images = rng.integers(0, 90, size=(n, size, size)).astype(np.int64)
        for index, label in enumerate(labels):
            row, col = divmod(int(label), 2)
            half = size // 2
            images[index, row * half:(row + 1) * half, col * half:(col + 1) * half] += 140
        return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)

    x_train, y_train = split(num_train)
    x_test, y_test = split(num_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def train_teacher(arch: str, arch_args: dict, data_path: Path, *, epochs: int = 8, seed: int = 0) -> torch.nn.Module:
    """A quickly trained registry teacher on the npz at `data_path` (pixels scaled to [0, 1])."""
    with np.load(data_path) as data:
        x = torch.from_numpy(data["x_train"]).float().div(255).unsqueeze(1)
        y = torch.from_numpy(data["y_train"])
    torch.manual_seed(seed)
    num_classes = int(y.max()) + 1
    model = build_model(arch, arch_args, tuple(x.shape[1:]), num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for start in range(0, len(x), 64):
            loss = torch.nn.functional.cross_entropy(model(x[start:start + 64]), y[start:start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def save_safetensors_teacher(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
