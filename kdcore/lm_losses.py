"""Token-level distillation losses for causal language models, computed in chunks over the tokens.

Per scored token (labels != -100), with teacher distribution p and student q over the vocabulary,
both at temperature T (p = softmax(z_t / T), q = softmax(z_s / T)):

    forward_kl  KL(p || q) = sum_v p_v (log p_v - log q_v)      covers every mode of the teacher
    reverse_kl  KL(q || p) = sum_v q_v (log q_v - log p_v)      mode-seeking (Gu et al. 2024, MiniLLM)
    jsd(beta)   beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
                (beta = 0.5 is the Jensen-Shannon divergence; TRL's generalized_jsd_loss, Agarwal et al. 2024)

    loss = alpha * T^2 * mean_tokens(divergence) + (1 - alpha) * mean_tokens(CE(z_s, label))

T^2 keeps the soft term's gradient independent of T, as in Hinton et al. (2015).

**Top-K** (`method.top_k: K`): the teacher's cache holds, per token, its K largest log-probabilities
log p_i at T = 1 (i in S, |S| = K), their token ids and the log of the remaining mass
p_tail = 1 - sum_{i in S} p_i. The divergence is then taken over K + 1 buckets, the K tokens and
one tail bucket:

    teacher  p'_i   = softmax_{K+1}([log p_i / T for i in S] + [log p_tail / T])
    student  q'_i   = q_i (i in S),   q'_tail = 1 - sum_{i in S} q_i   (exact: the student is run in full)

and forward_kl / reverse_kl / jsd are the formulas above with p', q' in place of p, q. At T = 1 the
teacher's buckets are exact and nothing is renormalised away: with K = V the loss equals the
full-vocabulary one. At T != 1 the K tokens keep their exact tempered ratios, but the tail is
tempered as if it were one token (its own spread is not stored); an approximation, small when the
teacher is peaked.

**Memory**: logits are never made for a whole batch. The scored positions' final hidden states
are cut into chunks of `chunk_tokens`; each chunk's logits (fp32, sliced to the real vocabulary)
are made, used and dropped, and recomputed in backward (activation checkpointing), so a 150k-token
vocabulary costs chunk_tokens x 150k x 4 bytes at a time instead of batch x length x 150k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kdcore.lm_memory import chunk_tokens_for

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]
Head = Callable[[torch.Tensor], torch.Tensor]  # final hidden states [n, H] -> logits [n, V_padded]

# exp(-1e4) is 0 in fp32: a floor that means "probability zero" without -inf's NaN gradients.
LOG_FLOOR = -1.0e4


def divergence(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, kind: Divergence,
               beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between two log-distributions over the last axis (see the module docstring)."""
    t = teacher_log_probs.float().clamp(min=LOG_FLOOR)
    s = student_log_probs.float().clamp(min=LOG_FLOOR)
    if kind == "forward_kl":
        return (t.exp() * (t - s)).sum(-1)
    if kind == "reverse_kl":
        return (s.exp() * (s - t)).sum(-1)
    weights = torch.tensor([beta, 1.0 - beta], device=t.device).clamp(min=1e-30).log()
    mixture = torch.logsumexp(torch.stack([t + weights[0], s + weights[1]]), dim=0)
    return beta * (t.exp() * (t - mixture)).sum(-1) + (1.0 - beta) * (s.exp() * (s - mixture)).sum(-1)


@dataclass
class TopK:
    """The teacher's top-K per scored token at T = 1: log-probs (fp16), ids (int32), log of the rest (fp32)."""

    log_probs: torch.Tensor
    ids: torch.Tensor
    tail: torch.Tensor


def top_k_of(logits: torch.Tensor, k: int) -> TopK:
    log_probs = F.log_softmax(logits.float(), dim=-1)
    values, ids = log_probs.topk(k, dim=-1)
    kept = torch.logsumexp(values, dim=-1)
    # log(1 - sum p_i), computed from the kept mass so that a tail of 1e-9 is not rounded to 0.
    tail = torch.log1p(-kept.exp().clamp(max=1.0)).clamp(min=LOG_FLOOR) if k < logits.shape[-1] \
        else torch.full_like(kept, LOG_FLOOR)
    return TopK(values.half(), ids.int(), tail.float())


def bucket_log_probs(student_log_probs: torch.Tensor, teacher: TopK,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probabilities over the K top-K tokens and the tail bucket."""
    ids = teacher.ids.long()
    student_top = student_log_probs.gather(-1, ids)
    rest = student_log_probs.scatter(-1, ids, LOG_FLOOR)
    student_tail = torch.logsumexp(rest, dim=-1, keepdim=True)
    teacher_scaled = torch.cat([teacher.log_probs.float(), teacher.tail.float()[:, None]], dim=-1) / temperature
    return F.log_softmax(teacher_scaled, dim=-1), torch.cat([student_top, student_tail], dim=-1)


@dataclass(frozen=True)
class LossSettings:
    divergence: Divergence = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 1.0
    vocab: int = 0  # the tokenizer's real vocabulary: padded rows beyond it are sliced off both sides


# Per chunk: the teacher's final hidden states (its head makes the logits), its logits, its top-K, or none.
Teacher = torch.Tensor | TopK | None


def _chunk_terms(hidden: torch.Tensor, labels: torch.Tensor, teacher_states: torch.Tensor | None,
                 top_log_probs: torch.Tensor | None, top_ids: torch.Tensor | None, top_tail: torch.Tensor | None,
                 head: Head, teacher_head: Head | None,
                 settings: LossSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()[:, :settings.vocab]
    correct = (logits.detach().argmax(-1) == labels).sum()
    if teacher_states is None and top_ids is None:
        hard = F.cross_entropy(logits, labels, reduction="sum")
        return hard.new_zeros(()), hard, correct
    if settings.temperature == 1:
        # The cross-entropy's own log-probabilities: one log-softmax over the vocabulary, not two.
        student = F.log_softmax(logits, dim=-1)
        hard = F.nll_loss(student, labels, reduction="sum")
    else:
        student = F.log_softmax(logits / settings.temperature, dim=-1)
        hard = F.cross_entropy(logits, labels, reduction="sum")
    if top_ids is not None:
        assert top_log_probs is not None and top_tail is not None
        teacher, student = bucket_log_probs(student, TopK(top_log_probs, top_ids, top_tail), settings.temperature)
    else:
        assert teacher_states is not None
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_states) if teacher_head is not None else teacher_states
            teacher = F.log_softmax(teacher_logits.float()[:, :settings.vocab] / settings.temperature, dim=-1)
    soft = divergence(teacher, student, settings.divergence, settings.beta).sum()
    return soft, hard, correct


@dataclass
class LossResult:
    loss: torch.Tensor
    tokens: int
    correct: torch.Tensor  # scored tokens whose argmax is the label (a device scalar: no sync per step)


def lm_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Head, settings: LossSettings, *,
            teacher: Callable[[int, int], Teacher] | None = None, teacher_head: Head | None = None,
            chunk_tokens: int | None = None) -> LossResult:
    """The loss over scored tokens: `hidden` [N, H] their final hidden states, `labels` [N] their next tokens.

    `teacher(start, end)` gives the teacher's targets for tokens start:end: its final hidden states
    (with `teacher_head`; the logits are then made inside the chunk and remade in backward, so a
    live teacher never holds a batch's logits either), its logits (no `teacher_head`) or its top-K;
    `teacher` None trains on the labels alone (teacher fine-tune, seq_kd, the baseline).
    """
    count = int(labels.shape[0])
    chunk = chunk_tokens or chunk_tokens_for(settings.vocab)
    soft_sum = hidden.new_zeros((), dtype=torch.float32)
    hard_sum = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, count, chunk):
        end = min(start + chunk, count)
        target = teacher(start, end) if teacher is not None else None
        full = target if isinstance(target, torch.Tensor) else None
        top = target if isinstance(target, TopK) else None
        args = (hidden[start:end], labels[start:end], full, top.log_probs if top else None, top.ids if top else None,
                top.tail if top else None, head, teacher_head, settings)
        if hidden.requires_grad and count > chunk:
            # Recomputed in backward: only the hidden chunk is kept, never its logits. With one chunk
            # there is nothing to gain (its logits live until its backward either way, which comes
            # right after), and the recomputation would cost a second pass of both heads.
            soft, hard, right = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            soft, hard, right = _chunk_terms(*args)
        soft_sum, hard_sum, correct = soft_sum + soft, hard_sum + hard, correct + right
    denominator = max(1, count)
    soft_mean, hard_mean = soft_sum / denominator, hard_sum / denominator
    if teacher is None or settings.alpha <= 0:
        loss = hard_mean
    elif settings.alpha >= 1:
        loss = settings.temperature ** 2 * soft_mean
    else:
        loss = settings.alpha * settings.temperature ** 2 * soft_mean + (1 - settings.alpha) * hard_mean
    return LossResult(loss, count, correct)


@torch.no_grad()
def token_predictions(hidden: torch.Tensor, labels: torch.Tensor, head: Head, vocab: int, *,
                      chunk_tokens: int | None = None) -> tuple[float, torch.Tensor]:
    """(summed cross-entropy in nats, top-1 predictions int32) over scored tokens, chunked: for evaluation."""
    chunk = chunk_tokens or chunk_tokens_for(vocab)
    total = 0.0
    predictions = []
    for start in range(0, int(labels.shape[0]), chunk):
        logits = head(hidden[start:start + chunk]).float()[:, :vocab]
        total += float(F.cross_entropy(logits, labels[start:start + chunk], reduction="sum"))
        predictions.append(logits.argmax(-1).int())
    return total, torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.int32)
