"""Token-level divergences against hand computations, the top-K loss against the full one, chunking."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcore.lm_losses import LossSettings, divergence, lm_loss, top_k_of

torch.set_num_threads(1)

P = [0.7, 0.2, 0.1]  # teacher
Q = [0.5, 0.3, 0.2]  # student


def _log(values: list[float]) -> torch.Tensor:
    return torch.tensor([values]).log()


def test_forward_kl_matches_hand_computation() -> None:
    expected = sum(p * math.log(p / q) for p, q in zip(P, Q, strict=True))
    assert divergence(_log(P), _log(Q), "forward_kl").item() == pytest.approx(expected, rel=1e-5)


def test_reverse_kl_matches_hand_computation() -> None:
    expected = sum(q * math.log(q / p) for p, q in zip(P, Q, strict=True))
    assert divergence(_log(P), _log(Q), "reverse_kl").item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("beta", [0.5, 0.2, 0.9])
def test_jsd_matches_hand_computation(beta: float) -> None:
    mixture = [beta * p + (1 - beta) * q for p, q in zip(P, Q, strict=True)]
    expected = (beta * sum(p * math.log(p / m) for p, m in zip(P, mixture, strict=True))
                + (1 - beta) * sum(q * math.log(q / m) for q, m in zip(Q, mixture, strict=True)))
    assert divergence(_log(P), _log(Q), "jsd", beta).item() == pytest.approx(expected, rel=1e-5)
    assert divergence(_log(P), _log(P), "jsd", beta).item() == pytest.approx(0.0, abs=1e-7)


def test_divergences_differ_from_each_other() -> None:
    values = {kind: divergence(_log(P), _log(Q), kind).item() for kind in ("forward_kl", "reverse_kl", "jsd")}
    assert len({round(v, 6) for v in values.values()}) == 3


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden  # "hidden states" that are already logits: the head is the identity


def _case(tokens: int = 12, vocab: int = 10, seed: int = 0, peak: float = 0.0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(tokens, vocab, generator=generator)
    teacher = torch.randn(tokens, vocab, generator=generator)
    if peak:
        teacher[torch.arange(tokens), torch.randint(0, vocab, (tokens,), generator=generator)] += peak
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    return student, teacher, labels


def test_lm_loss_is_alpha_mix_of_tempered_kl_and_cross_entropy() -> None:
    student, teacher, labels = _case()
    temperature, alpha = 2.0, 0.3
    settings = LossSettings(temperature=temperature, alpha=alpha, vocab=10)
    result = lm_loss(student, labels, _identity, settings, teacher=lambda a, b: teacher[a:b], chunk_tokens=5)
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  reduction="batchmean", log_target=True)
    expected = alpha * temperature ** 2 * kl + (1 - alpha) * F.cross_entropy(student, labels)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert result.tokens == 12
    assert result.correct.item() == int((student.argmax(-1) == labels).sum())


def test_chunked_loss_and_gradient_equal_unchunked() -> None:
    student, teacher, labels = _case(tokens=13)
    grads = []
    for chunk in (1, 4, 100):
        leaf = student.clone().requires_grad_(True)
        settings = LossSettings(divergence="reverse_kl", alpha=0.5, vocab=10)
        result = lm_loss(leaf, labels, _identity, settings, teacher=lambda a, b: teacher[a:b], chunk_tokens=chunk)
        result.loss.backward()
        assert leaf.grad is not None
        grads.append(leaf.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


def test_padded_vocabulary_rows_are_sliced_off_both_sides() -> None:
    student, teacher, labels = _case(vocab=10)
    # Padded rows with huge logits on both sides: if they took part, the loss would change completely.
    padded_student = torch.cat([student, torch.full((12, 6), 50.0)], dim=1)
    padded_teacher = torch.cat([teacher, torch.full((12, 3), -50.0)], dim=1)
    settings = LossSettings(alpha=0.5, vocab=10)
    plain = lm_loss(student, labels, _identity, settings, teacher=lambda a, b: teacher[a:b]).loss
    padded = lm_loss(padded_student, labels, _identity, settings, teacher=lambda a, b: padded_teacher[a:b]).loss
    assert padded.item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_top_k_loss_equals_full_loss_when_k_is_the_vocabulary(kind: str) -> None:
    student, teacher, labels = _case(vocab=10)
    settings = LossSettings(divergence=kind, alpha=0.7, temperature=1.0, vocab=10)  # type: ignore[arg-type]
    full = lm_loss(student, labels, _identity, settings, teacher=lambda a, b: teacher[a:b]).loss
    top = top_k_of(teacher, 10)
    cached = lm_loss(student, labels, _identity, settings, chunk_tokens=5,
                     teacher=lambda a, b: type(top)(top.log_probs[a:b], top.ids[a:b], top.tail[a:b])).loss
    # fp16 log-probabilities: equal to their rounding.
    assert cached.item() == pytest.approx(full.item(), rel=2e-3)


def test_top_k_loss_is_close_to_full_loss_for_a_peaked_teacher_and_not_for_a_flat_one() -> None:
    vocab = 200
    settings = LossSettings(vocab=vocab)

    def gap(peak: float) -> float:
        student, teacher, labels = _case(tokens=40, vocab=vocab, peak=peak)
        full = lm_loss(student, labels, _identity, settings, teacher=lambda a, b: teacher[a:b]).loss.item()
        top = top_k_of(teacher, 8)
        cached = lm_loss(student, labels, _identity, settings,
                         teacher=lambda a, b: type(top)(top.log_probs[a:b], top.ids[a:b], top.tail[a:b])).loss.item()
        return abs(cached - full) / full

    assert gap(peak=12.0) < 0.01
    assert gap(peak=0.0) > 0.05  # the tail bucket loses the flat teacher's spread: the test can fail


def test_top_k_tail_is_the_remaining_mass() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    top = top_k_of(logits, 2)
    probs = logits.softmax(-1)[0]
    assert top.ids[0].tolist() == [0, 1]
    assert top.tail.exp().item() == pytest.approx(float(probs[2] + probs[3]), rel=1e-5)
    assert top.log_probs.dtype == torch.float16 and top.ids.dtype == torch.int32


def test_labels_alone_is_cross_entropy() -> None:
    student, _, labels = _case()
    result = lm_loss(student, labels, _identity, LossSettings(vocab=10))
    assert result.loss.item() == pytest.approx(F.cross_entropy(student, labels).item(), rel=1e-6)
