"""The teacher's knowledge as data: its top-K next-token distribution for every training token, once.

With `method.top_k: K` the teacher runs one pass over the training split and its top-K
log-probabilities (fp16), their token ids (int32) and the log of the remaining mass (fp32) for
every scored token are kept, with the teacher's own evaluation (test loss, accuracy, its top-1
predictions for the agreement, its sample generations). That is everything a job needs of the
teacher, so a later job with the same key trains and reports without loading the teacher at all
(DistillKit's offline mode, as an artifact rather than a side effect).

The file is content-addressed: `<key>.safetensors` in `RunOptions.lm_cache_dir`, where the key is
the sha256 of the teacher file's sha256, the data files' sha256, every setting that changes which
tokens are scored (fields, max_length, val_fraction, seed) and K. A teacher fine-tuned inside the
job is another teacher: its cache is made in memory and never shared.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kdcore.errors import BadInputError
from kdcore.lm_data import LMBatches, LMSplit
from kdcore.lm_losses import TopK, top_k_of
from kdcore.lm_memory import chunk_tokens_for
from kdcore.lm_models import CausalLM
from kdcore.runtime import Runtime
from kdcore.spec import JobSpec

CACHE_VERSION = 1
_READ_CHUNK = 1024 * 1024


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(spec: JobSpec, *, teacher_sha256: str, train_sha256: str, test_sha256: str | None) -> str:
    """What decides the cached numbers, hashed: the teacher, the data, how it is tokenised and split, and K."""
    data = spec.data
    settings = {
        "version": CACHE_VERSION, "teacher": teacher_sha256, "train": train_sha256, "test": test_sha256,
        "fields": [data.text_field, data.prompt_field, data.completion_field, data.messages_field],
        "max_length": data.max_length, "val_fraction": data.val_fraction, "seed": spec.seed,
        "top_k": spec.method.top_k, "precision": spec.precision,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class TeacherTopKCache:
    """Rows of the top-K, one per scored training token, in the split's stored order."""

    top: TopK
    offsets: torch.Tensor  # int64, examples + 1: example i's rows are offsets[i]:offsets[i + 1]
    teacher_eval: dict[str, Any] = field(default_factory=dict)  # metrics and samples, JSON
    test_predictions: torch.Tensor | None = None  # int32, the teacher's top-1 on every scored eval token
    forward_tokens: int = 0  # tokens the teacher's pass over the training split ran

    @property
    def k(self) -> int:
        return int(self.top.ids.shape[1])

    def fits(self, split: LMSplit) -> bool:
        """The same examples with the same scored tokens (a key guards this; a tokenizer update might not)."""
        return len(self.offsets) == len(split) + 1 and torch.equal(self.offsets[1:] - self.offsets[:-1],
                                                                   split.label_counts())

    def rows_for(self, indices: torch.Tensor) -> torch.Tensor:
        """Row numbers of the examples `indices`, concatenated in that order (a batch's scored tokens)."""
        starts = self.offsets[indices]
        counts = self.offsets[indices + 1] - starts
        total = int(counts.sum())
        first_of_each = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return torch.repeat_interleave(starts, counts) + torch.arange(total) - first_of_each

    def targets_for(self, indices: torch.Tensor, device: torch.device) -> TopK:
        rows = self.rows_for(indices.cpu())
        return TopK(self.top.log_probs[rows].to(device), self.top.ids[rows].to(device),
                    self.top.tail[rows].to(device))

    def save(self, path: Path) -> Path:
        tensors = {"log_probs": self.top.log_probs.contiguous(), "ids": self.top.ids.contiguous(),
                   "tail": self.top.tail.contiguous(), "offsets": self.offsets.contiguous()}
        if self.test_predictions is not None:
            tensors["test_predictions"] = self.test_predictions.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(temporary), metadata={
            "version": str(CACHE_VERSION), "teacher_eval": json.dumps(self.teacher_eval),
            "forward_tokens": str(self.forward_tokens)})
        os.replace(temporary, path)  # a second job never reads half a cache
        return path

    @classmethod
    def load(cls, path: Path) -> TeacherTopKCache:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except Exception as exc:  # a corrupt file is the cache's problem, not the user's job
            raise BadInputError(f"the teacher cache {path.name} is unreadable: {exc}", code="bad_cache") from exc
        if metadata.get("version") != str(CACHE_VERSION):
            raise BadInputError(f"the teacher cache {path.name} is of another version", code="bad_cache")
        try:
            teacher_eval = json.loads(metadata.get("teacher_eval", "{}"))
            if teacher_eval and not (isinstance(teacher_eval, dict) and {"metrics", "samples"} <= teacher_eval.keys()):
                raise ValueError("its teacher evaluation lacks metrics or samples")
            return cls(TopK(tensors["log_probs"], tensors["ids"], tensors["tail"]), tensors["offsets"],
                       teacher_eval, tensors.get("test_predictions"), int(metadata.get("forward_tokens", "0")))
        except (KeyError, ValueError, TypeError, RecursionError) as exc:
            raise BadInputError(f"the teacher cache {path.name} is malformed: {exc}", code="bad_cache") from exc


@torch.no_grad()
def compute_top_k(teacher: CausalLM, split: LMSplit, *, k: int, pad_id: int, runtime: Runtime,
                  batch_size: int) -> TeacherTopKCache:
    """One pass of the frozen teacher over the split, in stored order, keeping the top-K per scored token."""
    teacher.eval()
    batches = LMBatches(split, pad_id=pad_id, device=runtime.device)
    chunk = chunk_tokens_for(teacher.vocab)
    parts: list[TopK] = []
    forward_tokens = 0
    for batch, _ in batches.eval_batches(batch_size):
        with runtime.autocast():
            hidden, _labels = teacher.scored(batch)
            for start in range(0, hidden.shape[0], chunk):
                logits = teacher.head(hidden[start:start + chunk]).float()[:, :teacher.vocab]
                top = top_k_of(logits, min(k, teacher.vocab))
                parts.append(TopK(top.log_probs.cpu(), top.ids.cpu(), top.tail.cpu()))
        forward_tokens += int(batch.attention_mask.sum())
    offsets = torch.zeros(len(split) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(split.label_counts(), 0)
    width = min(k, teacher.vocab)
    top = TopK(torch.cat([p.log_probs for p in parts]) if parts else torch.empty(0, width, dtype=torch.float16),
               torch.cat([p.ids for p in parts]) if parts else torch.empty(0, width, dtype=torch.int32),
               torch.cat([p.tail for p in parts]) if parts else torch.empty(0))
    return TeacherTopKCache(top, offsets, forward_tokens=forward_tokens)
