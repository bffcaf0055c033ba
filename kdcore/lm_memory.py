"""The memory a causal_lm training step holds, estimated before anything loads; torch-free.

The worker's check stage estimates from the unpacked configs (`kdcore.lm_pipeline.check_memory`);
the API estimates the same from what the upload's sniffing recorded (parameters, layers, width,
vocabulary), so a job that cannot fit is refused at submission with the estimate in the error,
not after it waited in the queue.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdcore.architectures import HFArgs
from kdcore.limits import GiB, ResourceLimits, over_limit

# fp32 logits of one chunk: chunk_tokens x vocab x 4 bytes, at most this (a few copies live in backward).
CHUNK_LOGIT_BYTES = 64 * 1024 * 1024


def chunk_tokens_for(vocab: int, budget_bytes: int = CHUNK_LOGIT_BYTES) -> int:
    return max(8, budget_bytes // (4 * vocab))


def estimate_memory(*, teacher_params: int, teacher_bytes: int, student_params: int, hidden: int, layers: int,
                    tokens_per_batch: int, vocab: int, gradient_checkpointing: bool) -> dict[str, int]:
    """Bytes a training step holds, roughly: enough to refuse what cannot fit before anything loads.

    teacher weights (bf16 or fp32) + student fp32 weights, gradients and AdamW's two moments (16 bytes
    a parameter) + activations kept for backward (about 16 fp32 values of width hidden per token and
    layer; one per layer with gradient checkpointing) + one chunk of fp32 logits (4 copies in backward).
    """
    per_layer = 1 if gradient_checkpointing else 16
    parts = {
        "teacher_bytes": teacher_params * teacher_bytes,
        "student_bytes": student_params * 16,
        "activation_bytes": tokens_per_batch * hidden * layers * per_layer * 4,
        "logits_chunk_bytes": chunk_tokens_for(vocab) * vocab * 4 * 4,
    }
    return {**parts, "total_bytes": sum(parts.values())}


def teacher_bytes_per_parameter(*, precision: str, teacher_finetune_epochs: int) -> int:
    """A frozen teacher in bf16 takes 2 bytes a parameter; a fine-tuned one is trained like a student (16)."""
    if teacher_finetune_epochs:
        return 16
    return 2 if precision == "bf16" else 4


def check_memory_estimate(memory: Mapping[str, int], limits: ResourceLimits) -> None:
    """A ResourceLimitError naming batch_size, with every part of the estimate, when it is over the limit."""
    if memory["total_bytes"] <= limits.max_train_memory_bytes:
        return
    parts = ", ".join(f"{name.removesuffix('_bytes')} {value / GiB:.2f} GiB" for name, value in memory.items()
                      if name != "total_bytes")
    raise over_limit("the estimated training memory in bytes", memory["total_bytes"], "max_train_memory_bytes",
                     limits.max_train_memory_bytes, field="batch_size",
                     advice=f"estimate: {parts}; lower batch_size or data.max_length, set method.top_k (the "
                     "teacher then runs once, before the student), gradient_checkpointing or precision bf16")


def sniffed_student(teacher: Mapping[str, Any], arch_args: Mapping[str, Any],
                    teacher_layers: list[int] | None) -> tuple[int, int, int]:
    """(parameters, hidden, layers) of an `arch: hf` student from the teacher's sniffed config: the
    embeddings kept, each layer's share of the rest scaled by the width squared. An estimate (the worker
    counts the built model exactly); 0 parameters where the config does not tell."""
    args = HFArgs.model_validate(arch_args)
    teacher_hidden, teacher_depth = int(teacher.get("hidden_size") or 0), int(teacher.get("num_layers") or 0)
    hidden = int(args.hidden_size or teacher_hidden)
    layers = int(args.num_hidden_layers or (len(teacher_layers) if teacher_layers else 0) or teacher_depth)
    vocab = int(teacher.get("vocab_size") or 0)
    if not teacher_hidden or not teacher_depth or not hidden:
        return 0, hidden, layers
    embeddings = vocab * teacher_hidden
    per_layer = max(0, int(teacher.get("params") or 0) - embeddings) / teacher_depth
    scale = (hidden / teacher_hidden) ** 2
    return int(vocab * hidden + layers * per_layer * scale), hidden, layers
