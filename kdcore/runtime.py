"""Where and how a run executes: device, autocast precision, threads and seeding."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from kdcore.errors import KDError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        dtype = self.autocast_dtype
        if dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            yield

    @property
    def needs_grad_scaler(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none.
        return self.precision == "fp16" and self.device.type == "cuda"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KDError("device is cuda but no CUDA GPU is available here; use auto or cpu",
                          field="device", code="bad_input")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KDError(f"device {name} does not exist: {torch.cuda.device_count()} GPU(s) visible",
                          field="device", code="bad_input")
    return device


def make_runtime(device: str, precision: str) -> Runtime:
    resolved = resolve_device(device)
    if precision == "fp16" and resolved.type == "cpu":
        # CPU fp16 autocast is slow and unscaled; bf16 is what the CPU's AMX units accelerate.
        raise KDError("fp16 needs a CUDA device; use bf16 on CPU", field="precision", code="bad_input")
    return Runtime(device=resolved, precision=precision)


_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX); `cpuinfo` is /proc/cpuinfo's text.

    Without either, bf16 autocast converts every operand in software: 5-8x slower than fp32.
    Where the flags cannot be read (not Linux), assume it does, so no warning is shown wrongly.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                cpuinfo = handle.read()
        except OSError:
            return True
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    return flags is None or any(flag in flags for flag in _NATIVE_BF16_FLAGS)


def precision_warning(runtime: Runtime) -> str | None:
    if runtime.device.type == "cpu" and runtime.precision == "bf16" and not cpu_has_native_bf16():
        return ("precision bf16 on a CPU without AVX512-BF16 or AMX is emulated in software and several times "
                "slower than fp32 here; use precision: fp32 on this machine")
    return None


def default_threads() -> int:
    """The cores this process may use (cgroup/affinity aware), not the machine's total."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads. Two processes each spinning on all cores slow down 5-20x."""
    count = threads or default_threads()
    torch.set_num_threads(count)
    return count


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
