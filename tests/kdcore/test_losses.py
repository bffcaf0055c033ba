import math

import pytest
import torch

from kdcore.losses import build_distill_loss, cross_entropy_loss, kd_loss
from kdcore.spec import MethodSpec


def _hand_kd(student: list[float], teacher: list[float], label: int, temperature: float, alpha: float) -> float:
    """One sample, written out from the formula with plain floats."""
    def softmax(logits: list[float], t: float) -> list[float]:
        exps = [math.exp(v / t) for v in logits]
        total = sum(exps)
        return [e / total for e in exps]

    p_teacher = softmax(teacher, temperature)
    p_student = softmax(student, temperature)
    kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_teacher, p_student, strict=True))
    ce = -math.log(softmax(student, 1.0)[label])
    return alpha * temperature**2 * kl + (1 - alpha) * ce


@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 0.5), (4.0, 0.9), (20.0, 0.3), (2.5, 1.0), (3.0, 0.0)])
def test_kd_loss_matches_hand_computation(temperature: float, alpha: float) -> None:
    student = [[1.0, -0.5, 2.0], [0.3, 0.2, -1.0]]
    teacher = [[2.0, 0.0, 1.0], [-1.0, 3.0, 0.5]]
    labels = [2, 1]
    expected = sum(_hand_kd(s, t, y, temperature, alpha) for s, t, y in zip(student, teacher, labels, strict=True)) / 2

    got = kd_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels),
                  temperature=temperature, alpha=alpha)

    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_alpha_one_ignores_labels() -> None:
    student, teacher = torch.randn(8, 5), torch.randn(8, 5)
    with_labels = kd_loss(student, teacher, torch.zeros(8, dtype=torch.long), temperature=3.0, alpha=1.0)
    without_labels = kd_loss(student, teacher, None, temperature=3.0, alpha=1.0)
    assert with_labels.item() == pytest.approx(without_labels.item())


def test_kd_loss_is_zero_when_student_equals_teacher_and_alpha_one() -> None:
    logits = torch.randn(4, 10)
    assert kd_loss(logits, logits.clone(), None, temperature=4.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_term_gradient_scale_is_independent_of_temperature() -> None:
    """Without T^2 the gradient would shrink as 1/T^2; with it, it tends to (s - t) / (N * K) for large T."""
    torch.manual_seed(0)
    teacher = torch.randn(16, 10)
    base = torch.randn(16, 10)
    norms = []
    for temperature in (5.0, 10.0, 20.0, 40.0):
        student = base.clone().requires_grad_(True)
        kd_loss(student, teacher, None, temperature=temperature, alpha=1.0).backward()
        assert student.grad is not None
        norms.append(student.grad.norm().item())
    # For large T the gradient of T^2*KL w.r.t. s approaches (s - t - mean shift) / (K * N): a constant.
    assert max(norms) / min(norms) < 1.05
    # And the unscaled KL's gradient really does fall as 1/T^2, so the test can fail.
    student = base.clone().requires_grad_(True)
    (kd_loss(student, teacher, None, temperature=40.0, alpha=1.0) / 1600).backward()
    assert student.grad is not None
    assert student.grad.norm().item() < norms[-1] / 1000


def test_registry_builds_kd_from_method_spec() -> None:
    loss = build_distill_loss(MethodSpec(temperature=2.0, alpha=0.7))
    student, teacher, labels = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
    expected = kd_loss(student, teacher, labels, temperature=2.0, alpha=0.7)
    assert loss(student, teacher, labels).item() == pytest.approx(expected.item())


def test_cross_entropy_requires_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        cross_entropy_loss(torch.randn(2, 3), None, None)
