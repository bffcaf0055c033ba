"""The numbers of a causal-LM report: loss in nats per token, perplexity, next-token accuracy,
top-1 agreement with the teacher, size, generation speed, and a few samples side by side."""

from __future__ import annotations

import math
from typing import Any

import torch

from kdcore.evaluate import size_mb
from kdcore.hf_models import deployable
from kdcore.lm_data import LMBatches, LMSplit
from kdcore.lm_models import CausalLM, generate, generation_tokens_per_s
from kdcore.lm_trainer import evaluate_tokens
from kdcore.runtime import Runtime

SAMPLES = 3
SAMPLE_TOKENS = 32
SPEED_TOKENS = 32


def model_metrics(model: CausalLM, split: LMSplit, tokenizer: Any, *, runtime: Runtime, batch_size: int,
                  speed_tokens: int = SPEED_TOKENS) -> tuple[dict[str, Any], torch.Tensor]:
    """Metrics of one model on the evaluation split, and its top-1 prediction at every scored token."""
    batches = LMBatches(split, pad_id=int(tokenizer.pad_token_id), device=runtime.device)
    total, correct, tokens, predictions = evaluate_tokens(model, batches, runtime, batch_size, model.vocab)
    loss = total / max(1, tokens)
    shipped = deployable(model)
    prompt = split.sequence(0)[:max(1, int(split.prompt_lengths[0]))] if len(split) else [0]
    speed = generation_tokens_per_s(model, prompt, tokenizer, tokens=speed_tokens)
    metrics = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": correct / max(1, tokens),
        "params": sum(p.numel() for p in shipped.parameters()),
        "size_mb": size_mb(shipped),
        "tokens_per_s": speed,
        "latency_ms": 1000.0 / max(speed, 1e-9),  # per generated token, CPU, batch 1
    }
    return metrics, predictions


def sample_prompts(split: LMSplit, count: int = SAMPLES) -> list[list[int]]:
    """The first rows' prompts (for text, their first tokens): fixed, so every model answers the same."""
    return [split.sequence(i)[:max(1, int(split.prompt_lengths[i]))] for i in range(min(count, len(split)))]


def sample_texts(model: CausalLM, prompts: list[list[int]], tokenizer: Any, *,
                 max_new_tokens: int = SAMPLE_TOKENS) -> list[str]:
    answers = generate(model, prompts, max_new_tokens=max_new_tokens, sample=False, tokenizer=tokenizer)
    return [tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]


def agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    """Share of scored tokens where two models' top-1 next token is the same."""
    if len(first) == 0 or len(first) != len(second):
        return 0.0
    return (first.long() == second.long()).float().mean().item()
