"""Transferability scores: which source network (or layer) to transfer, judged before training.

Both scores look at the target data through a frozen source model, with no fine-tuning:

* :func:`logme` (You et al., ICML 2021, "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning") takes the source's features ``[N, D]`` on the target inputs and asks how well
  a Bayesian linear model explains the target labels: the maximised log evidence per sample.
* :func:`leep` (Nguyen et al., ICML 2020, "LEEP: A New Measure to Evaluate Transferability of
  Learned Representations") takes the source's class probabilities ``[N, K_s]`` on the target inputs
  and scores the "expected empirical predictor" that maps source classes to target classes.

Higher is better for both; :func:`rank_sources` orders candidates and :func:`kendall_tau`
checks a ranking against the accuracies reached after fine-tuning. Plain numpy, deterministic.

    feats = {name: model.embed(x).numpy() for name, model in candidates.items()}
    ranking = rank_sources({name: logme(f, y) for name, f in feats.items()})
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from kdray.core.errors import KdrayError


def _check_features_labels(features: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2:
        raise KdrayError(f"{what} expects a 2-D array [N, D], got shape {f.shape}.")
    if y.ndim != 1 or y.shape[0] != f.shape[0]:
        raise KdrayError(
            f"{what}: labels have shape {y.shape} but the array has {f.shape[0]} rows; give one label per row."
        )
    if f.shape[0] < 2:
        raise KdrayError(f"{what} needs at least 2 samples, got {f.shape[0]}.")
    if not np.all(np.isfinite(f)):
        raise KdrayError(f"{what}: the array holds NaN or inf values; check the model's outputs.")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise KdrayError(f"{what}: labels must be integer class ids, got dtype {y.dtype}.")
        y = y.astype(np.int64)
    return f, y


def log_evidence(
    alpha: float, beta: float, sigma: np.ndarray, z2: np.ndarray, residual_out: float, n: int, d: int
) -> tuple[float, float, float, float]:
    """Log evidence of ``t ~ N(F m, 1/β)``, ``m ~ N(0, 1/α I)`` written with the SVD ``F = U S Vᵀ``.

    ``log p(t | F, α, β) = d/2 log α + n/2 log β − n/2 log 2π − β/2 ‖F m̂ − t‖² − α/2 ‖m̂‖² − 1/2 log|A|``
    with ``A = α I + β FᵀF`` and ``m̂ = β A⁻¹ Fᵀ t``. In the SVD basis, with ``λ = α/β``,
    ``σ_i = s_i²`` and ``z = Uᵀ t``: ``‖m̂‖² = Σ σ_i z_i² / (σ_i + λ)²``,
    ``‖F m̂ − t‖² = Σ z_i² λ² / (σ_i + λ)² + ‖t − U z‖²``, ``log|A| = Σ log(α + β σ_i) + (d − r) log α``.

    Returns ``(evidence, γ, ‖m̂‖², ‖F m̂ − t‖²)`` where ``γ = Σ β σ_i / (α + β σ_i)``.
    """
    lam = alpha / beta
    gamma = float(np.sum(sigma / (sigma + lam)))
    m2 = float(np.sum(sigma * z2 / (sigma + lam) ** 2))
    res2 = float(np.sum(z2 * (lam / (sigma + lam)) ** 2) + residual_out)
    logdet = float(np.sum(np.log(alpha + beta * sigma)) + (d - sigma.shape[0]) * math.log(alpha))
    ev = (
        0.5 * d * math.log(alpha)
        + 0.5 * n * math.log(beta)
        - 0.5 * n * math.log(2 * math.pi)
        - 0.5 * beta * res2
        - 0.5 * alpha * m2
        - 0.5 * logdet
    )
    return ev, gamma, m2, res2


def logme(features: np.ndarray, labels: np.ndarray, *, max_iter: int = 100, tol: float = 1e-7) -> float:
    """LogME: the maximum log evidence of a Bayesian linear model, per sample, averaged over classes.

    You et al. 2021. For each class k the target is ``t = 1[labels == k]`` ``[N]`` and the model
    ``t = F m + ε`` with prior ``m ~ N(0, α⁻¹ I_D)`` and noise ``ε ~ N(0, β⁻¹ I_N)``. The evidence
    ``p(t | F, α, β)`` (see :func:`log_evidence`) is maximised over ``α, β`` by MacKay's
    fixed-point iteration, ``γ = Σ β σ_i / (α + β σ_i)``, ``α ← γ / ‖m̂‖²``,
    ``β ← (N − γ) / ‖F m̂ − t‖²``, starting from ``α = β = 1`` and stopping when ``α/β`` changes
    by less than ``tol`` (relative). One thin SVD of ``F`` serves every class and iteration.

    Args:
        features: ``[N, D]`` features of the target inputs from the frozen source model.
        labels: ``[N]`` integer target labels.

    Returns:
        ``(1/K) Σ_k max_{α,β} log p(t_k | F, α, β) / N``; higher means the features explain the
        labels linearly with less complexity. When the features explain a class no better than
        noise, the maximum lies at ``α → ∞`` (``m̂ → 0``); the iteration then stops after
        ``max_iter`` steps, where the evidence is already at its limit.
    """
    f, y = _check_features_labels(features, labels, "logme")
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)  # u [N, r], s [r], r = min(N, D)
    sigma = s**2
    tiny = 1e-12
    evidences = []
    for k in np.unique(y):
        t = (y == k).astype(np.float64)
        z = u.T @ t
        z2 = z**2
        residual_out = max(float(t @ t - z2.sum()), 0.0)  # the part of t outside F's column space
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            lam = alpha / beta
            _, gamma, m2, res2 = log_evidence(alpha, beta, sigma, z2, residual_out, n, d)
            alpha = max(gamma, tiny) / max(m2, tiny)
            beta = max(n - gamma, tiny) / max(res2, tiny)
            if abs(alpha / beta - lam) <= tol * lam:
                break
        evidences.append(log_evidence(alpha, beta, sigma, z2, residual_out, n, d)[0])
    return float(np.mean(evidences) / n)


def leep(source_probs: np.ndarray, target_labels: np.ndarray, num_target_classes: int) -> float:
    """LEEP: the log-likelihood of the expected empirical predictor (Nguyen et al. 2020).

    With ``θ(x_i)`` the source model's class probabilities ``[N, K_s]`` on target input ``x_i``:
    ``P̂(y, z) = (1/N) Σ_{i: y_i = y} θ(x_i)_z`` (joint, ``[K_t, K_s]``),
    ``P̂(y | z) = P̂(y, z) / Σ_y' P̂(y', z)``, and
    ``LEEP = (1/N) Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z``. It is ≤ 0; closer to 0 is better.

    Args:
        source_probs: ``[N, K_s]`` rows of source-class probabilities (softmax outputs).
        target_labels: ``[N]`` integer target labels in ``[0, num_target_classes)``.
        num_target_classes: ``K_t``.
    """
    theta, y = _check_features_labels(source_probs, target_labels, "leep")
    if np.any(theta < 0) or not np.allclose(theta.sum(1), 1.0, atol=1e-4):
        raise KdrayError(
            "leep: source_probs must be probabilities (non-negative rows summing to 1); "
            "apply softmax to the source model's logits first."
        )
    if y.min() < 0 or y.max() >= num_target_classes:
        raise KdrayError(
            f"leep: target labels span [{y.min()}, {y.max()}] but num_target_classes is "
            f"{num_target_classes}; labels must lie in [0, num_target_classes)."
        )
    n = theta.shape[0]
    joint = np.zeros((num_target_classes, theta.shape[1]))
    np.add.at(joint, y, theta)
    joint /= n
    marginal = joint.sum(axis=0)  # P̂(z) [K_s]
    cond = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)  # P̂(y | z)
    eep = np.einsum("iz,iz->i", theta, cond[y])  # Σ_z P̂(y_i | z) θ(x_i)_z
    return float(np.mean(np.log(eep)))


def rank_sources(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """``{name: score}`` sorted best (highest) first; ties broken by name so the order is stable."""
    bad = [k for k, v in scores.items() if not math.isfinite(float(v))]
    if bad:
        raise KdrayError(f"rank_sources: scores for {bad} are not finite numbers; check the features of those sources.")
    return sorted(((k, float(v)) for k, v in scores.items()), key=lambda kv: (-kv[1], kv[0]))


def kendall_tau(a: Sequence[float] | Mapping[str, float], b: Sequence[float] | Mapping[str, float]) -> float:
    """Kendall's τ-b between two score lists (or two ``{name: score}`` dicts over the same names).

    ``τ_b = (C − D) / sqrt((n₀ − n₁)(n₀ − n₂))`` over all pairs ``i < j``, with ``C``/``D`` the
    concordant/discordant pairs, ``n₀ = n(n−1)/2`` and ``n₁``/``n₂`` the pairs tied in ``a``/``b``.
    1 means the same order, −1 the reverse; NaN when one side is constant.
    """
    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise KdrayError(
            "kendall_tau: give two dicts over the same names or two lists of equal length, not one of each."
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            raise KdrayError(
                f"kendall_tau: the two dicts name different items; only on one side: {sorted(set(a) ^ set(b))}."
            )
        names = sorted(a)
        a, b = [a[k] for k in names], [b[k] for k in names]
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise KdrayError(
            f"kendall_tau needs two 1-D sequences of equal length >= 2, got shapes {x.shape} and {y.shape}."
        )
    i, j = np.triu_indices(x.size, k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n0 = i.size
    n1, n2 = int(np.sum(sx == 0)), int(np.sum(sy == 0))
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return float(np.sum(sx * sy) / denom) if denom > 0 else float("nan")


__all__ = ["logme", "leep", "log_evidence", "rank_sources", "kendall_tau"]
