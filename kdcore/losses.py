"""Distillation losses, chosen by name from `LOSSES` (the spec's `method.name`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdcore.spec import MethodSpec

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

        loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

    The KL term takes the student's log-probabilities and the teacher's probabilities and is
    averaged over the batch (`batchmean`, the true KL per sample; `mean` would also divide by
    the number of classes). Its gradient with respect to the logits scales as 1/T^2, so the
    T^2 factor keeps the soft term's weight independent of the temperature.
    With alpha = 1 the labels are not used at all, so unlabeled data can be distilled.
    `labels` are class indices, or class probabilities where mixup blended them.
    """
    temperature_sq = temperature * temperature
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    soft = F.kl_div(student_log_probs, teacher_probs, reduction="batchmean") * temperature_sq
    if alpha >= 1.0 or labels is None:
        return soft
    hard = F.cross_entropy(student_logits.float(), labels)
    return alpha * soft + (1.0 - alpha) * hard


def cross_entropy_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor | None
) -> torch.Tensor:
    """Plain hard-label training (fine-tune and baseline stages)."""
    if labels is None:
        raise ValueError("hard-label training needs labels")
    return F.cross_entropy(student_logits.float(), labels)


def _build_kd(method: MethodSpec) -> LossFn:
    def loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        if teacher is None:
            raise ValueError("kd needs teacher logits")
        return kd_loss(student, teacher, labels, temperature=method.temperature, alpha=method.alpha)

    return loss


def hidden_cosine_loss(student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor],
                       mask: torch.Tensor) -> torch.Tensor:
    """DistilBERT's cosine embedding loss, per token and layer pair:

        L_hidden = mean over pairs (s, t) and unpadded tokens of  1 - cos(h_s, h_t)

    `student_hidden[i]` is already projected to the teacher's width; `mask` is 1 on real tokens.
    """
    weights = mask.float()
    total = weights.sum().clamp(min=1.0)
    losses = []
    for student, teacher in zip(student_hidden, teacher_hidden, strict=True):
        cosine = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
        losses.append(((1.0 - cosine) * weights).sum() / total)
    return torch.stack(losses).mean()


def kd_hidden_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None, *,
                   student_hidden: list[torch.Tensor], teacher_hidden: list[torch.Tensor], mask: torch.Tensor,
                   temperature: float, alpha: float, hidden_weight: float) -> torch.Tensor:
    """`kd_loss` on the logits plus `hidden_weight * L_hidden` (see `hidden_cosine_loss`)."""
    logits_term = kd_loss(student_logits, teacher_logits, labels, temperature=temperature, alpha=alpha)
    return logits_term + hidden_weight * hidden_cosine_loss(student_hidden, teacher_hidden, mask)


# Each entry builds a loss function from the spec's `method`; the key is `method.name`.
LOSSES: dict[str, Callable[[MethodSpec], LossFn]] = {
    "kd": _build_kd,
}


def build_distill_loss(method: MethodSpec) -> LossFn:
    return LOSSES[method.name](method)
