"""The gain over the baseline with its uncertainty: interval and McNemar's test."""

import numpy as np
import pytest

from kdcore.significance import gain_over_baseline, mcnemar_exact_p, paired_bootstrap_interval


def _paired(n: int, both: int, wins: int, losses: int) -> tuple[np.ndarray, np.ndarray]:
    """Who is right: `both` samples for both, `wins` for the student alone, `losses` for the baseline alone."""
    student, baseline = np.zeros(n, bool), np.zeros(n, bool)
    student[:both + wins] = True
    baseline[:both] = True
    baseline[both + wins:both + wins + losses] = True
    return student, baseline


def test_a_gain_of_0_6_points_on_1000_samples_is_within_noise() -> None:
    # The case: "beat by 0.60 points" on 1,000 test samples, 20 discordant samples 13 to 7.
    student, baseline = _paired(1000, 850, 13, 7)
    result = gain_over_baseline(student, baseline, seed=0)
    assert result["distillation_gain"] == pytest.approx(0.006)
    low, high = result["distillation_gain_ci"]
    assert low < 0 < high
    assert result["distillation_gain_within_noise"] is True
    assert result["distillation_gain_p_value"] > 0.05


def test_a_gain_of_7_points_on_1000_samples_is_not_noise() -> None:
    student, baseline = _paired(1000, 800, 80, 10)
    result = gain_over_baseline(student, baseline, seed=0)
    low, high = result["distillation_gain_ci"]
    assert 0 < low < 0.07 < high
    assert result["distillation_gain_within_noise"] is False
    assert result["distillation_gain_p_value"] < 1e-6


def test_a_clear_loss_has_an_interval_below_zero() -> None:
    student, baseline = _paired(2000, 1500, 20, 120)
    low, high = paired_bootstrap_interval(student, baseline, seed=3)
    assert low < high < 0


def test_the_interval_is_seeded() -> None:
    student, baseline = _paired(500, 300, 30, 20)
    assert paired_bootstrap_interval(student, baseline, seed=1) == paired_bootstrap_interval(student, baseline, seed=1)


def test_mcnemar_exact_matches_the_binomial_by_hand() -> None:
    student, baseline = _paired(100, 50, 10, 2)
    # 2 * P(X <= 2), X ~ Binomial(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact_p(student, baseline) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact_p(*_paired(100, 50, 0, 0)) == 1.0
    assert mcnemar_exact_p(*_paired(100, 50, 5, 5)) == 1.0
