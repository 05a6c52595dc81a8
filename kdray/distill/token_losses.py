"""Token-level distillation losses for causal language models: forward KL, reverse KL, generalised JSD.

A causal LM's logits are ``[N, T, V]``: position ``t`` predicts the token at ``t + 1`` of the row
``batch["x"]`` (``kdray.models.lm``). Every term here compares the teacher's and the student's
next-token distributions at the positions whose next token is real (``x[:, t + 1] >= 0``: padding is
left out) and averages over those positions.

The teacher comes either as full logits ``[N, T, V]`` (online, or a full-logit cache) or as its
top-k (``Outputs.topk_ids`` ``[N, T', k]`` and ``Outputs.logits`` holding the matching log-probabilities
at temperature 1, ``T' >= T - 1``: the sequence cache, ``kdray.distill.seqcache``). ``top_k`` also cuts
a full-logit teacher to its top ``k`` here, so that full and top-k distillation can be compared on the
same run. On the top-k, ``tail: true`` keeps the probability the teacher gives to every other token as
one more bucket (the student's bucket is its own mass outside the ``k`` ids), and ``tail: false``
renormalises both distributions over the ``k`` ids. The temperature divides the log-probabilities of
the buckets (exact at ``temperature: 1``; with ``tail`` the tail is tempered as one bucket). Every
divergence is multiplied by ``T²`` (Hinton et al. 2015), which keeps gradient scales comparable
across temperatures.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from kdray.core.errors import KdrayError
from kdray.distill.losses import DistillLoss, Positive, _kl_rows, _zero, register
from kdray.models import lm
from kdray.models.hooks import Outputs

TopK = Annotated[int, Field(ge=1)]


def tail_log_mass(log_probs_k: torch.Tensor) -> torch.Tensor:
    """``log(1 - Σ exp(log_probs_k))`` per row: the log-probability of every id outside the top-k."""
    top = torch.logsumexp(log_probs_k, -1).clamp(max=-1e-6)
    return torch.log(-torch.expm1(top))


def token_distributions(
    name: str, student: Outputs, teacher: Outputs, x: torch.Tensor, temperature: float, top_k: int | None, tail: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probabilities ``[M, B]`` over the same buckets at the ``M`` real positions."""
    if not lm.is_sequence(student.logits):
        raise KdrayError(
            f"loss {name!r} compares next-token distributions of causal LMs (logits [N, T, vocab]), but the "
            f"student's logits are {tuple(student.logits.shape)}",
            hint="Use hinton_kl for classifiers; token_* losses for language models on text datasets.",
        )
    mask = lm.token_mask(x)
    steps = mask.shape[1]
    s = student.logits[:, :steps].float()[mask]  # [M, V]
    t = teacher.logits[:, :steps].detach().float()[mask]
    ids = teacher.topk_ids[:, :steps][mask].long() if teacher.topk_ids is not None else None
    T = temperature
    if ids is None and top_k is None:  # full logits on both sides
        if s.shape != t.shape:
            raise KdrayError(
                f"loss {name!r}: student logits {tuple(student.logits.shape)} and teacher logits "
                f"{tuple(teacher.logits.shape)} differ; the teacher and student need the same vocabulary."
            )
        return F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)
    if ids is None:  # a full-logit teacher cut to its top-k here
        t, ids = F.log_softmax(t, -1).topk(min(int(top_k or 1), t.shape[-1]), -1)
    elif top_k is not None and top_k < ids.shape[-1]:  # fewer than the cache holds: its first k (sorted)
        t, ids = t[:, :top_k], ids[:, :top_k]
    if ids.numel() and int(ids.max()) >= s.shape[-1]:
        raise KdrayError(
            f"loss {name!r}: the teacher's top-k holds token id {int(ids.max())} but the student's vocabulary has "
            f"{s.shape[-1]} ids",
            hint="Distil between models of the same tokenizer (one text dataset).",
        )
    s_all = F.log_softmax(s, -1)
    s_k = s_all.gather(-1, ids)  # the student's log-probabilities of the teacher's top-k ids (T = 1)
    if tail:
        t_b = torch.cat([t, tail_log_mass(t)[:, None]], -1)
        s_b = torch.cat([s_k, tail_log_mass(s_k)[:, None]], -1)
        return F.log_softmax(t_b / T, -1), F.log_softmax(s_b / T, -1)
    return F.log_softmax(t / T, -1), F.log_softmax(s_k / T, -1)


class TokenDivergence(DistillLoss):
    """Shared parameters and masking of the token-level terms (the module docstring)."""

    def __init__(self, temperature: Positive = 1.0, top_k: TopK | None = None, tail: bool = True):
        super().__init__()
        self.temperature, self.top_k, self.tail = float(temperature), top_k, bool(tail)

    def divergence(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict) -> torch.Tensor:
        p, q = token_distributions(
            self.name, student, self._teacher(teacher), batch["x"], self.temperature, self.top_k, self.tail
        )
        if not len(p):
            return _zero(student.logits)
        return self.temperature**2 * self.divergence(p, q).mean()


@register("token_kl")
class TokenKL(TokenDivergence):
    """Forward KL per token (Hinton et al. 2015's soft targets at every position, as word-level KD in
    Kim & Rush 2016; the usual offline LM distillation).

    ``L = T² · (1/|M|) Σ_{(i,t)∈M} KL(p_T,it ‖ p_S,it)`` with ``p = softmax(z/T)`` over the vocabulary,
    or over the teacher's top-k (+ tail bucket), and ``M`` the positions whose next token is real.

    Shapes: logits ``[N, T, V]``; a cached teacher gives top-k ids and log-probs ``[N, T-1, k]``.
    Reduction: mean over real positions; no real position gives 0. Mode-covering: the student spreads
    mass over everything the teacher finds plausible.

    Args:
        temperature: T > 0 (1 by default: the teacher's own distribution).
        top_k: compare only the teacher's k most likely ids (None: all, or all the cache holds).
        tail: keep the rest of the teacher's mass as one bucket (true) or renormalise over the k (false).
    """

    def divergence(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        return _kl_rows(log_p, log_q)


@register("token_reverse_kl")
class TokenReverseKL(TokenDivergence):
    """Reverse KL per token (Gu et al. 2024, MiniLLM; GKD's β = 1): ``KL(p_S ‖ p_T)``.

    ``L = T² · (1/|M|) Σ_{(i,t)∈M} KL(p_S,it ‖ p_T,it)``, same buckets and masking as ``token_kl``.
    Mode-seeking: the student puts its mass where the teacher's is largest rather than covering its tail.
    On a top-k teacher without ``tail`` the student is renormalised over the k ids too, so both sides
    are distributions over the same support.

    Args:
        temperature: T > 0.
        top_k: compare only the teacher's k most likely ids (None: all).
        tail: keep the rest of the mass as one bucket (true) or renormalise over the k (false).
    """

    def divergence(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        return _kl_rows(log_q, log_p)


@register("token_jsd")
class TokenJSD(TokenDivergence):
    """Generalised Jensen-Shannon divergence per token (Agarwal et al. 2024, GKD).

    ``JSD_β(P ‖ Q) = β KL(P ‖ M) + (1 − β) KL(Q ‖ M)``, ``M = β P + (1 − β) Q``, with ``P`` the teacher's
    and ``Q`` the student's next-token distribution; ``L = T² · mean over real positions``. β → 0 behaves
    like forward KL and β → 1 like reverse KL (scaled by β and 1 − β); β = 0.5 is the symmetric JSD.

    Args:
        beta: β in (0, 1).
        temperature: T > 0.
        top_k: compare only the teacher's k most likely ids (None: all).
        tail: keep the rest of the mass as one bucket (true) or renormalise over the k (false).
    """

    def __init__(
        self,
        beta: Annotated[float, Field(gt=0, lt=1)] = 0.5,
        temperature: Positive = 1.0,
        top_k: TopK | None = None,
        tail: bool = True,
    ):
        super().__init__(temperature, top_k, tail)
        self.beta = float(beta)

    def divergence(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        b = self.beta
        log_m = torch.logsumexp(
            torch.stack([log_p + torch.log(torch.tensor(b)), log_q + torch.log1p(torch.tensor(-b))]), 0
        )
        return b * _kl_rows(log_p, log_m) + (1 - b) * _kl_rows(log_q, log_m)
