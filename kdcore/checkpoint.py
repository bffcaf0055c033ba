"""Run checkpoints: everything needed to continue a run exactly where an epoch ended.

One file, replaced atomically at every epoch end, loaded only with `weights_only=True`
(a checkpoint travels through storage, so it is treated like any other untrusted file).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcore.errors import BadInputError

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


@dataclass
class RunState:
    """Where a run is. `stage`/`epoch`: the last finished epoch; `models`: every model's weights so far."""

    stage: str | None = None
    epoch: int = 0
    models: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] | None = None
    shuffle_rng: torch.Tensor | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class Checkpointer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / CHECKPOINT_NAME

    def save(self, state: RunState) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        torch.save({"format_version": FORMAT_VERSION, **asdict(state)}, temporary)
        os.replace(temporary, self.path)  # a reader never sees half a checkpoint
        return self.path

    def load(self) -> RunState | None:
        if not self.path.exists():
            return None
        try:
            raw = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BadInputError(f"checkpoint {self.path.name} is unreadable: {exc}", code="bad_checkpoint") from exc
        version = raw.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise BadInputError(f"checkpoint format {version} is not {FORMAT_VERSION}", code="bad_checkpoint")
        expected = set(RunState.__dataclass_fields__)
        if set(raw) != expected:
            # Strict resume: a key nobody consumes (or one missing) means the run would not continue exactly.
            raise BadInputError(f"checkpoint keys {sorted(set(raw) ^ expected)} do not match this engine",
                                code="bad_checkpoint")
        return RunState(**raw)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
