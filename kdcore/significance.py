"""How sure a gain over the baseline is: a paired bootstrap interval and McNemar's exact test. Torch-free.

Student and baseline are scored on the same test samples, so the comparison is paired: only the
samples where exactly one of them is right carry information. Resampling the samples with replacement
is resampling the per-sample differences d in {-1, 0, +1}; the counts of each value in a resample are
multinomial, so each bootstrap draw costs three numbers rather than n indices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

#: Per test sample, whether a model got it right.
Correctness: TypeAlias = Sequence[bool] | npt.NDArray[np.bool_]

RESAMPLES = 10_000
LEVEL = 0.95


def paired_bootstrap_interval(student_correct: Correctness, baseline_correct: Correctness, *, seed: int,
                              resamples: int = RESAMPLES, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of accuracy(student) - accuracy(baseline) over resampled test samples."""
    student, baseline = np.asarray(student_correct, bool), np.asarray(baseline_correct, bool)
    n = len(student)
    if n == 0:
        return (0.0, 0.0)
    wins = int(np.sum(student & ~baseline))
    losses = int(np.sum(~student & baseline))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [wins / n, losses / n, (n - wins - losses) / n], size=resamples)
    gains = (counts[:, 0] - counts[:, 1]) / n
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(gains, [tail, 100 - tail])
    return (float(low), float(high))


def mcnemar_exact_p(student_correct: Correctness, baseline_correct: Correctness) -> float:
    """Two-sided exact McNemar test: under no difference, each discordant sample is a fair coin."""
    student, baseline = np.asarray(student_correct, bool), np.asarray(baseline_correct, bool)
    wins = int(np.sum(student & ~baseline))
    losses = int(np.sum(~student & baseline))
    discordant = wins + losses
    if discordant == 0:
        return 1.0
    # P(X <= min(wins, losses)) for X ~ Binomial(discordant, 1/2), summed in log space (discordant may be large).
    logs = [math.lgamma(discordant + 1) - math.lgamma(k + 1) - math.lgamma(discordant - k + 1)
            - discordant * math.log(2) for k in range(min(wins, losses) + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(value - top) for value in logs)
    return min(1.0, 2.0 * tail)


def gain_over_baseline(student_correct: Correctness, baseline_correct: Correctness, *,
                       seed: int) -> dict[str, Any]:
    """The metrics entries: the gain, its 95% interval, McNemar's p and whether zero lies inside the interval."""
    student, baseline = np.asarray(student_correct, bool), np.asarray(baseline_correct, bool)
    low, high = paired_bootstrap_interval(student, baseline, seed=seed)
    return {
        "distillation_gain": float(student.mean() - baseline.mean()) if len(student) else 0.0,
        "distillation_gain_ci": [low, high],
        "distillation_gain_p_value": mcnemar_exact_p(student, baseline),
        "distillation_gain_within_noise": bool(low <= 0.0 <= high),
    }
