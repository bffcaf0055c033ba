"""What the worker and end-to-end tests share: real databases, a Redis database of their own,
a small real job (8x8 blob images and a trained MLP teacher) and scoring of exported students."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REDIS_URL = os.environ.get("DISTILLERY_TEST_REDIS_SERVER", "redis://127.0.0.1:6379")
# Database 15 belongs to the API's enqueue test and 14 to its load benchmark; these tests lock one
# of 1-13 for the session.
REDIS_DATABASES = range(1, 14)
TEACHER_ARGS = {"hidden": [64, 64]}

# Short leases and reaper passes so faults resolve in seconds; one torch thread per job so the
# test processes share two cores without OpenMP spinning.
FAST_SERVICE_ENV = {
    "DISTILLERY_ENVIRONMENT": "test",
    "DISTILLERY_LEASE_SECONDS": "6",
    "DISTILLERY_HEARTBEAT_SECONDS": "1",
    "DISTILLERY_CANCEL_POLL_SECONDS": "0.3",
    "DISTILLERY_PROGRESS_WRITE_SECONDS": "0.5",
    "DISTILLERY_REAPER_INTERVAL_SECONDS": "1",
    "DISTILLERY_REQUEUE_AFTER_SECONDS": "3",
    "DISTILLERY_BROKER_POLLING_SECONDS": "0.1",
    "DISTILLERY_WORKER_THREADS": "1",
    "DISTILLERY_LATENCY_RUNS": "3",
    "DISTILLERY_MAX_CONCURRENT_JOBS": "100",
    "DISTILLERY_SHUTDOWN_TIMEOUT_SECONDS": "20",
    "DISTILLERY_LOG_JSON": "false",
    "OMP_NUM_THREADS": "1",
}


@contextlib.contextmanager
def redis_database() -> Iterator[str]:
    """A Redis database number nobody else uses now (a lock key claims it), emptied before and after."""
    import redis

    lock_key = "distillery-tests:lock"
    for number in REDIS_DATABASES:
        client = redis.Redis.from_url(f"{REDIS_URL}/{number}", socket_connect_timeout=2)
        try:
            claimed = client.set(lock_key, str(os.getpid()), nx=True, ex=3600)
        except redis.ConnectionError as exc:
            pytest.skip(f"Redis is not reachable at {REDIS_URL}: {exc}")
        if not claimed:
            client.close()
            continue
        for key in client.scan_iter():
            if key != lock_key.encode():
                client.delete(key)
        try:
            yield f"{REDIS_URL}/{number}"
        finally:
            client.flushdb()
            client.close()
        return
    pytest.skip("every Redis test database is locked by other test sessions")


@dataclass(frozen=True)
class JobFiles:
    """A small real job's inputs: blob images (npz with a test split) and an MLP teacher."""

    data: Path
    teacher: Path

    def spec(self, teacher_id: str, data_id: str, *, epochs: int = 3, **overrides: Any) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "teacher": {"file": teacher_id, "arch": "mlp", "arch_args": TEACHER_ARGS},
            "student": {"arch": "mlp", "arch_args": {"hidden": [16]}},
            "data": {"train": data_id, "val_fraction": 0.2},
            # No baseline (on by default): these tests count the distillation's epochs and time the job.
            "stages": {"distill_epochs": epochs, "baseline": False},
            "batch_size": 32,
            "optim": {"lr": 0.005},
            "export": ["safetensors", "torchscript", "onnx"],
        }
        spec.update(overrides)
        return spec


def make_job_files(folder: Path, *, num_train: int = 600) -> JobFiles:
    import torch

    from tests.kdcore.helpers import make_blob_images, save_safetensors_teacher, train_teacher

    torch.set_num_threads(1)
    folder.mkdir(parents=True, exist_ok=True)
    data = make_blob_images(folder / "blobs.npz", num_train=num_train, num_test=200)
    teacher_model = train_teacher("mlp", TEACHER_ARGS, data, epochs=4)
    teacher = save_safetensors_teacher(teacher_model, folder / "teacher.safetensors")
    return JobFiles(data=data, teacher=teacher)


def held_out_split(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The npz test split as the exported student takes it: N x 1 x 8 x 8 float32 in [0, 1]."""
    with np.load(data) as arrays:
        x = arrays["x_test"].astype(np.float32)[:, None] / 255.0
        return x, arrays["y_test"]


def onnx_accuracy(model_path: Path, data: Path) -> float:
    import onnxruntime

    x, y = held_out_split(data)
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(axis=1) == y).mean())


def torchscript_accuracy(model_path: Path, data: Path) -> float:
    import warnings

    import torch

    x, y = held_out_split(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is what the service exports
        model = torch.jit.load(str(model_path)).eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(x)).numpy()
    return float((logits.argmax(axis=1) == y).mean())


def claimed_accuracy(metrics_json: bytes) -> float:
    return float(json.loads(metrics_json)["student"]["accuracy"])
