"""Tests for kdray.transferability: LogME against a brute-force evidence maximisation, LEEP against a
hand computation, rankings and Kendall's tau.

    .venv/bin/python -m pytest tests/transfer/test_transferability.py -q -p no:cacheprovider
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdray.core.errors import KdrayError
from kdray.transfer.transferability import kendall_tau, leep, log_evidence, logme, rank_sources


def direct_evidence(f: np.ndarray, t: np.ndarray, alpha: float, beta: float) -> float:
    """log p(t | F, α, β) from the definition, with explicit D x D matrices (no SVD)."""
    n, d = f.shape
    a = alpha * np.eye(d) + beta * f.T @ f
    m = beta * np.linalg.solve(a, f.T @ t)
    return (
        d / 2 * math.log(alpha)
        + n / 2 * math.log(beta)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * float(np.sum((f @ m - t) ** 2))
        - alpha / 2 * float(m @ m)
        - 0.5 * np.linalg.slogdet(a)[1]
    )


def brute_force_logme(f: np.ndarray, y: np.ndarray) -> float:
    """Maximise the direct evidence over a log10 grid of (α, β) in [1e-5, 1e5]², refined around the best point."""
    total = 0.0
    for k in np.unique(y):
        t = (y == k).astype(float)
        centre, half = (0.0, 0.0), 5.0
        for _ in range(5):
            grid_a = np.linspace(centre[0] - half, centre[0] + half, 41)
            grid_b = np.linspace(centre[1] - half, centre[1] + half, 41)
            best = max((direct_evidence(f, t, 10**la, 10**lb), la, lb) for la in grid_a for lb in grid_b)
            centre, half = (best[1], best[2]), half / 10
        total += best[0]
    return total / len(np.unique(y)) / f.shape[0]


def toy(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    f = rng.normal(size=(n, d)) + 3.0 * (2 * y[:, None] - 1) * (np.arange(d) == 0)
    return f, y


# ---------------------------------------------------------------- LogME


@pytest.mark.parametrize("n, d", [(30, 3), (6, 10)])  # more samples than features, and fewer
def test_log_evidence_matches_the_definition(n, d):
    f, y = toy(n, d, 0)
    t = (y == 1).astype(float)
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    z2 = (u.T @ t) ** 2
    for alpha, beta in [(0.3, 2.0), (5.0, 0.1), (1.0, 1.0)]:
        got = log_evidence(alpha, beta, s**2, z2, float(t @ t - z2.sum()), n, d)[0]
        assert got == pytest.approx(direct_evidence(f, t, alpha, beta), abs=1e-9)


@pytest.mark.parametrize("n, d", [(30, 3), (6, 10)])
def test_logme_equals_brute_force_evidence_maximum(n, d):
    f, y = toy(n, d, 1)  # both classes have their evidence maximum inside the grid
    expected = brute_force_logme(f, y)
    got = logme(f, y)
    assert got == pytest.approx(expected, abs=1e-8)
    assert got >= expected - 1e-9  # the fixed point is the maximum, not just near the grid's best


def test_logme_prefers_features_that_separate_labels_and_is_deterministic():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=200)
    separable = np.eye(4)[y] @ rng.normal(size=(4, 16)) + 0.1 * rng.normal(size=(200, 16))
    random = rng.normal(size=(200, 16))
    assert logme(separable, y) > logme(random, y) + 0.5
    assert logme(separable, y) == logme(separable.copy(), y.copy())  # bit-identical on a rerun
    ranking = rank_sources({"random": logme(random, y), "separable": logme(separable, y)})
    assert [name for name, _ in ranking] == ["separable", "random"]


def test_logme_input_errors():
    with pytest.raises(KdrayError, match="2-D"):
        logme(np.zeros(5), np.zeros(5, dtype=int))
    with pytest.raises(KdrayError, match="one label per row"):
        logme(np.zeros((5, 2)), np.zeros(4, dtype=int))
    with pytest.raises(KdrayError, match="NaN"):
        logme(np.full((3, 2), np.nan), np.array([0, 1, 0]))


# ---------------------------------------------------------------- LEEP


def test_leep_hand_computed():
    theta = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    y = np.array([0, 0, 1, 1])
    # Joint P(y, z) = (1/4)·Σ θ over rows of class y: y=0 -> (1.7, 0.3)/4, y=1 -> (0.4, 1.6)/4.
    # P(z) = (2.1, 1.9)/4, so P(y=0|z) = (17/21, 3/19) and P(y=1|z) = (4/21, 16/19).
    p0, p1 = (17 / 21, 3 / 19), (4 / 21, 16 / 19)
    eep = [0.9 * p0[0] + 0.1 * p0[1], 0.8 * p0[0] + 0.2 * p0[1], 0.3 * p1[0] + 0.7 * p1[1], 0.1 * p1[0] + 0.9 * p1[1]]
    expected = sum(math.log(v) for v in eep) / 4
    assert expected == pytest.approx(-0.3426, abs=1e-4)
    assert leep(theta, y, 2) == pytest.approx(expected, abs=1e-12)
    # A source that already predicts the target classes exactly scores the maximum, 0.
    assert leep(np.eye(3)[[0, 1, 2, 1]], np.array([0, 1, 2, 1]), 3) == pytest.approx(0.0, abs=1e-12)
    # An unused target class (3 of 4) does not change the score; a source class never predicted is skipped.
    assert leep(np.c_[theta, np.zeros(4)], y, 4) == pytest.approx(expected, abs=1e-12)


def test_leep_input_errors():
    with pytest.raises(KdrayError, match="softmax"):
        leep(np.array([[0.5, 0.6], [0.5, 0.5]]), np.array([0, 1]), 2)
    with pytest.raises(KdrayError, match="num_target_classes is 2"):
        leep(np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([0, 2]), 2)


# ---------------------------------------------------------------- rankings


def test_rank_sources_orders_best_first_and_breaks_ties_by_name():
    assert rank_sources({"b": 1.0, "a": 1.0, "c": 3.0, "d": -2.0}) == [("c", 3.0), ("a", 1.0), ("b", 1.0), ("d", -2.0)]
    with pytest.raises(KdrayError, match="'x'"):
        rank_sources({"x": float("nan"), "y": 1.0})


def test_kendall_tau_hand_cases():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    # Pairs of [1,2,3] vs [1,3,2]: (1,2) C, (1,3) C, (2,3) D -> (2 - 1) / 3.
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    # With a tie in a: a = [1,1,2], b = [1,2,3]: (1,2) tied in a, (1,3) C, (2,3) C -> 2 / sqrt(2 * 3).
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    assert kendall_tau({"x": 1, "y": 2, "z": 3}, {"z": 0.9, "y": 0.5, "x": 0.1}) == 1.0
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    with pytest.raises(KdrayError, match="only on one side"):
        kendall_tau({"x": 1, "y": 2}, {"x": 1, "z": 2})
    with pytest.raises(KdrayError, match="equal length"):
        kendall_tau([1, 2], [1, 2, 3])


def test_kendall_tau_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, size=25), rng.integers(0, 5, size=25)
    assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
