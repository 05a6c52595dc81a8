"""Unsupervised domain adaptation methods: small modules that turn a batch into losses.

Each method is a short class behind one interface (DomainBed's ``algorithms.py`` layout, except
that methods return losses and the training loop owns the optimiser, AMP, DDP and checkpoints)::

    ADAPT_METHODS.get("dann").prepare_model(model)   # before DDP: e.g. SHOT freezes the classifier
    model = ray.train.torch.prepare_model(model)       # (DDP) in the Ray Train loop
    method = build_adapt_method("dann", model, num_classes=10, weight=1.0)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    for step, batch in enumerate(loader):          # {"x_src", "y_src", "x_tgt"}
        out = method(batch, progress=step / total_steps)
        out["loss"].backward(); opt.step(); opt.zero_grad()   # DDP wraps the method: all of it syncs

The batch holds ``x_src`` [N, ...], ``y_src`` [N] (absent for source-free methods) and ``x_tgt``
[M, ...]; target labels never enter (a ``y_tgt`` key is an error). ``progress`` in [0, 1] is the
fraction of training done, for schedules. ``forward`` returns ``{"loss": total, <parts>...}`` with
the parts detached, for logging.

The model follows the kdray model contract (``model(x) == model.classifier(model.embed(x))``).
Methods call ``model(x)`` once and read the embedding as the classifier's input through a forward
pre-hook, so the call goes through a DDP wrapper's ``forward`` (which DDP needs to synchronise
gradients) and features and logits come from the same pass.

Source and target go through ONE forward, ``model(torch.cat([x_src, x_tgt]))``: BatchNorm then
normalises both domains with the same batch statistics and updates its running statistics once
per step with a mixture of both, which is what the network sees at test time on the target.
Two separate forwards would normalise each domain by its own statistics during training (hiding
part of the shift from the alignment loss, then exposing it at test time) and would run the DDP
forward twice per backward.

Model selection without target labels (DomainBed: the rule changes conclusions) uses
:func:`entropy_score` or :func:`snd_score`; see ``SELECTION_RULES`` in ``kdray.adapt.stage``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, ClassVar, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from kdray.core.errors import KdrayError, SpecError
from kdray.core.registry import Entry, Registry, check_params
from kdray.models.hooks import classifier_name, embedding_and_logits, resolve_modules, unwrap

ADAPT_METHODS: Registry = Registry("adapt method", group="kdray.adapt_methods")

# Model-selection rules for adapt stages (the spec field picks one):
#   source_val: accuracy on held-out SOURCE data (DomainBed's "training-domain validation");
#   entropy:    lowest mean prediction entropy on target data (entropy_score; lower is better);
#   snd:        highest Soft Neighbourhood Density on target data (snd_score; Saito et al. 2021);
#   oracle:     accuracy on labelled TARGET validation data. It uses target labels, so it is an
#               upper bound for comparison only and is not deployable.

NonNegative = Annotated[float, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
Kernels = Annotated[Sequence[Positive], Field(min_length=1)]

EPS = 1e-5


# --------------------------------------------------------------------------------------------
# Functional pieces: each is a formula with its paper, usable and testable on its own.
# --------------------------------------------------------------------------------------------


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Prediction entropy ``H(softmax(z)) = -Σ_k p_k log p_k`` in nats; [N, K] -> [N]."""
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def information_maximization(logits: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """SHOT's information-maximisation loss (Liang et al., ICML 2020), a scalar.

    ``L_IM = mean_i H(p_i) - H(mean_i p_i)`` with ``p_i = softmax(z_i)``: the first term makes
    each prediction confident, the second (diversity) keeps the predictions spread over classes.
    Its minimum, ``-log K``, is reached by confident one-hot predictions that use every class
    equally often. logits: [M, K].
    """
    mean_p = logits.softmax(dim=-1).mean(dim=0)
    diversity = -(mean_p * torch.log(mean_p + eps)).sum()
    return entropy(logits).mean() - diversity


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """DANN's gradient-reversal schedule ``λ(p) = 2 / (1 + exp(-γ p)) - 1`` (Ganin et al., JMLR 2016).

    Rises from 0 at ``p = 0`` to about 1 at ``p = 1`` (0.9866 at ``p = 0.5`` with ``γ = 10``), so
    the noisy early discriminator does not disturb the features.
    """
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coeff * grad, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Gradient reversal layer: identity forward, gradient multiplied by ``-coeff`` backward."""
    return _GradientReversal.apply(x, coeff)


def no_autocast(t: torch.Tensor):
    """Turn autocast off for statistics of a batch (distances, covariances) that half precision ruins."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _autograd_all_gather():
    """The newest all_gather with autograd this torch has, as ``fn(t [n, ...]) -> [world*n, ...]``, or None."""
    try:  # torch >= 2.13 deprecates torch.distributed.nn.functional in favour of this one
        from torch.distributed import _functional_collectives as fc

        if hasattr(fc, "all_gather_single_autograd"):
            return lambda t: fc.wait_tensor(fc.all_gather_single_autograd(t, 0, dist.group.WORLD))
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch.distributed.nn.functional import all_gather

        return lambda t: torch.cat(all_gather(t))
    except ImportError:  # pragma: no cover
        return None


def gather_from_all_ranks(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` [n, ...] from every rank along dim 0, keeping gradients to the local part.

    Outside ``torch.distributed`` (or with one rank) returns ``t``. Uses an all_gather with
    autograd (``torch.distributed.nn.functional.all_gather``, or its successor in
    ``torch.distributed._functional_collectives`` where torch has it), whose backward sums each
    rank's gradient for the local slice: every rank computes the same global loss, so the local
    features get ``world_size x`` its gradient, and DDP's averaging of parameter gradients over
    ranks then yields exactly the gradient of the global loss. Where neither exists, falls back
    to ``dist.all_gather`` with the local slice put back in place: gradients then flow only
    through the local part (other ranks' terms count as constants), a common approximation.
    All ranks must pass the same shape (use ``drop_last=True``); this is checked, naming sizes.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    if len({int(s) for s in sizes}) != 1:
        raise KdrayError(
            f"all_gather needs the same batch size on every rank, got {[int(s) for s in sizes]} "
            f"(rank {rank} has {t.shape[0]}).",
            hint="Use drop_last=True in the data loader.",
        )
    gather = _autograd_all_gather()
    if gather is not None:
        return gather(t.contiguous())
    parts = [torch.empty_like(t) for _ in range(world)]  # pragma: no cover - very old torch
    dist.all_gather(parts, t.detach().contiguous())
    parts[rank] = t
    return torch.cat(parts)


def gaussian_mmd(f_s: torch.Tensor, f_t: torch.Tensor, kernels: Iterable[float] = (0.5, 1, 2, 4, 8)) -> torch.Tensor:
    """Multi-kernel Gaussian MMD² between two feature batches (Long et al., ICML 2015, "DAN").

    ``MMD² = mean k(s, s') + mean k(t, t') - 2 mean k(s, t)`` (the biased V-statistic, >= 0 and
    exactly 0 for identical batches), with ``k = (1/|M|) Σ_m exp(-‖a - b‖² / (m σ²))`` where
    ``σ²`` is the median squared pairwise distance of the pooled batch (the median heuristic,
    taken without gradient) and ``m`` runs over ``kernels``. DAN learns the kernel weights; equal
    weights are the usual simplification.

    Args:
        f_s: [N, D] source features; f_t: [M, D] target features.
        kernels: multipliers of the median bandwidth ``σ²``.
    """
    kernels = [float(k) for k in kernels]
    if f_s.ndim != 2 or f_s.shape[1:] != f_t.shape[1:]:
        raise KdrayError(
            f"MMD needs features [N, D] and [M, D], got source {tuple(f_s.shape)} and target {tuple(f_t.shape)}."
        )
    z = torch.cat([f_s, f_t])
    with no_autocast(z):
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        sq = z.pow(2).sum(dim=1)
        d2 = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)
        off_diagonal = ~torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        sigma2 = d2.detach()[off_diagonal].median().clamp_min(1e-12)
        k = torch.stack([torch.exp(-d2 / (m * sigma2)) for m in kernels]).mean(0)
        ns = f_s.shape[0]
        return k[:ns, :ns].mean() + k[ns:, ns:].mean() - 2 * k[:ns, ns:].mean()


def covariance(f: torch.Tensor) -> torch.Tensor:
    """Unbiased feature covariance ``(f - mean)ᵀ (f - mean) / (n - 1)``; [n, d] -> [d, d]."""
    c = f - f.mean(dim=0, keepdim=True)
    return c.T @ c / (f.shape[0] - 1)


def coral_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Deep CORAL (Sun & Saenko, ECCV-W 2016): ``‖C_s - C_t‖_F² / (4 d²)``.

    Args:
        f_s: [N, d] source features; f_t: [M, d] target features; N, M >= 2.
    """
    if f_s.ndim != 2 or f_s.shape[1:] != f_t.shape[1:] or min(f_s.shape[0], f_t.shape[0]) < 2:
        raise KdrayError(
            f"CORAL needs features [N, d] and [M, d] with N, M >= 2, got source {tuple(f_s.shape)} "
            f"and target {tuple(f_t.shape)}.",
            hint="Use batches of at least 2 samples per domain.",
        )
    d = f_s.shape[1]
    with no_autocast(f_s):
        f_s, f_t = (f.float() if f.dtype in (torch.float16, torch.bfloat16) else f for f in (f_s, f_t))
        return (covariance(f_s) - covariance(f_t)).pow(2).sum() / (4 * d * d)


def entropy_score(logits: torch.Tensor) -> float:
    """Model selection: mean prediction entropy on target data, in nats. Lower is better.

    Args:
        logits: [M, K] target logits.
    """
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise KdrayError(f"entropy_score needs logits [M, K] with M >= 1, got shape {tuple(logits.shape)}.")
    return float(entropy(logits.detach().float()).mean())


@torch.no_grad()
def snd_score(
    embeddings_or_logits: torch.Tensor, temperature: float = 0.05, *, softmax: bool = False, chunk: int = 1024
) -> float:
    """Model selection: Soft Neighbourhood Density (Saito et al., ICCV 2021). Higher is better.

    With ``f̂_i`` the L2-normalised rows, ``S_ij = f̂_i · f̂_j`` for ``j != i`` and
    ``P_i = softmax_j(S_ij / τ)``, ``SND = mean_i H(P_i)``: high when each target sample has
    many close neighbours (dense clusters), low when samples are isolated. The paper prefers the
    softmax outputs as ``f``; pass logits with ``softmax=True`` for that, or embeddings as they are.

    Args:
        embeddings_or_logits: [M, D] target features or logits, M >= 2.
        temperature: τ > 0 (the paper's 0.05).
        softmax: apply softmax over the last dim first (for logits).
        chunk: rows per block, so memory stays O(chunk x M).
    """
    f = embeddings_or_logits.detach().double()  # float64: tiny entropies at small τ stay exact
    if f.ndim != 2 or f.shape[0] < 2:
        raise KdrayError(f"snd_score needs [M, D] with M >= 2 samples, got shape {tuple(f.shape)}.")
    if not temperature > 0:
        raise KdrayError(f"snd_score: temperature must be > 0, got {temperature}.")
    if softmax:
        f = f.softmax(dim=-1)
    f = F.normalize(f, dim=1)
    total = 0.0
    for start in range(0, f.shape[0], chunk):
        s = f[start : start + chunk] @ f.T / temperature
        rows = torch.arange(s.shape[0], device=f.device)
        s[rows, rows + start] = float("-inf")  # a sample is not its own neighbour
        logp = s.log_softmax(dim=1)
        total += float(-(logp.exp() * logp.nan_to_num(neginf=0.0)).sum())
    return total / f.shape[0]


# --------------------------------------------------------------------------------------------
# The interface.
# --------------------------------------------------------------------------------------------


def classifier_of(model: nn.Module) -> nn.Module:
    """The classifier: a kdray model's ``classifier``, or the layer a user's model was adopted with
    (its ``classifier_name``: ``model.classifier`` or its last ``nn.Linear``)."""
    inner = unwrap(model)
    name = classifier_name(inner)
    return resolve_modules(inner, [name])[name]


class AdaptMethod(nn.Module):
    """Base class. Subclasses implement ``forward(batch, progress) -> {"loss": ..., parts...}``.

    Args:
        model: a kdray model (``embed`` + ``classifier``), possibly DDP-wrapped. It is a
            submodule, so ``method.train()``/``.eval()``/``.to()`` reach it.
        num_classes: must equal ``model.classifier.out_features``.
        weight: weight of the method's adaptation term, >= 0.
    """

    source_free: ClassVar[bool] = False
    name: ClassVar[str] = ""

    def __init__(self, model: nn.Module, num_classes: int, weight: NonNegative = 1.0):
        super().__init__()
        inner = unwrap(model)
        head = classifier_of(inner)
        if not isinstance(head, nn.Linear) or not hasattr(inner, "embed"):
            raise KdrayError(
                f"adapt method {self.name!r} needs a model with .embed and a nn.Linear classifier, got "
                f"{type(inner).__name__} with classifier {type(head).__name__}.",
                hint="Set model.classifier to the nn.Linear that maps the embedding to the class scores.",
            )
        if head.out_features != num_classes:
            raise KdrayError(
                f"adapt method {self.name!r}: num_classes={num_classes} but model.classifier has "
                f"{head.out_features} outputs.",
                hint="Build the model with the same num_classes.",
            )
        if not (weight >= 0 and math.isfinite(weight)):
            raise KdrayError(
                f"adapt method {self.name!r}: parameter 'weight' must be a finite number >= 0, got {weight!r}."
            )
        self.model = model
        self.num_classes = num_classes
        self.weight = float(weight)

    @classmethod
    def prepare_model(cls, model: nn.Module) -> nn.Module:
        """Changes a method makes to the bare model; call BEFORE wrapping it in DDP.

        DDP records which parameters need gradients when it wraps a model, so freezing must come
        first. A no-op except for methods that freeze layers (:class:`SHOT`); the constructor
        applies it too (idempotent), which is enough without DDP.
        """
        return model

    @property
    def embed_dim(self) -> int:
        return classifier_of(self.model).in_features  # type: ignore[return-value]  # checked nn.Linear in __init__

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the model that the optimiser must also update (e.g. a discriminator)."""
        return []

    # -- batch handling -----------------------------------------------------------------------
    def _check_batch(self, batch: Mapping[str, Any], progress: float, source: bool = True, target: bool = True) -> None:
        if not 0.0 <= progress <= 1.0:
            raise KdrayError(
                f"adapt method {self.name!r}: progress must be in [0, 1] (fraction of training done), got {progress}."
            )
        if "y_tgt" in batch:
            raise KdrayError(
                f"adapt method {self.name!r} got target labels ('y_tgt') in its batch; unsupervised "
                f"adaptation must never see them.",
                hint="Drop 'y_tgt' from the training batch.",
            )
        need = (["x_src", "y_src"] if source else []) + (["x_tgt"] if target else [])
        missing = [k for k in need if k not in batch]
        if missing:
            raise KdrayError(f"adapt method {self.name!r}: batch lacks {missing}; it has {sorted(batch)}.")
        if source:
            x_s, y_s = batch["x_src"], batch["y_src"]
            if target and x_s.shape[1:] != batch["x_tgt"].shape[1:]:
                raise KdrayError(
                    f"adapt method {self.name!r}: source inputs {tuple(x_s.shape)} and target inputs "
                    f"{tuple(batch['x_tgt'].shape)} differ beyond the batch dimension."
                )
            if tuple(y_s.shape) != (x_s.shape[0],):
                raise KdrayError(
                    f"adapt method {self.name!r}: y_src has shape {tuple(y_s.shape)} but x_src has "
                    f"{x_s.shape[0]} rows; expected ({x_s.shape[0]},)."
                )

    def joint_forward(self, batch: Mapping[str, Any]):
        """``(f_s, z_s, f_t, z_t)`` from one forward of ``cat([x_src, x_tgt])`` (see module docstring)."""
        n = batch["x_src"].shape[0]
        f, z = embedding_and_logits(self.model, torch.cat([batch["x_src"], batch["x_tgt"]]))
        return f[:n], z[:n], f[n:], z[n:]

    def aligned_features(self, batch: Mapping[str, Any]):
        """``(f_s, z_s, f_t)`` for batch-statistic losses; features from every rank with ``all_gather``."""
        f_s, z_s, f_t, _ = self.joint_forward(batch)
        if getattr(self, "all_gather", False):
            f_s, f_t = gather_from_all_ranks(f_s), gather_from_all_ranks(f_t)
        return f_s, z_s, f_t

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_classes={self.num_classes}, weight={self.weight}"


def _register(name: str):
    def deco(cls: type[AdaptMethod]) -> type[AdaptMethod]:
        cls.name = name
        return ADAPT_METHODS.register(name, source_free=cls.source_free)(cls)

    return deco


# --------------------------------------------------------------------------------------------
# The methods.
# --------------------------------------------------------------------------------------------


@_register("source_only")
class SourceOnly(AdaptMethod):
    """Cross-entropy on labelled source data: the baseline every adapt stage reports.

    ``x_tgt`` is ignored, and not forwarded, so target data does not even reach BatchNorm
    statistics: the baseline is untouched by the target domain. ``weight`` is unused.
    """

    def forward(self, batch: Mapping[str, Any], progress: float = 0.0) -> dict[str, torch.Tensor]:
        self._check_batch(batch, progress, target=False)
        ce = F.cross_entropy(self.model(batch["x_src"]), batch["y_src"])
        return {"loss": ce, "ce": ce.detach()}


@_register("dann")
class DANN(AdaptMethod):
    """Domain-adversarial training (Ganin et al., JMLR 2016).

    A discriminator ``D`` (Linear(d, hidden) - ReLU - Linear(hidden, 1)) classifies embeddings as
    source (0) or target (1); between the features and ``D`` a gradient reversal layer multiplies
    the gradient by ``-weight·λ(p)`` with ``λ(p) = 2/(1 + exp(-γp)) - 1``, so ``D`` learns to tell
    the domains apart while the features learn to fool it::

        loss = CE(z_s, y_s) + BCE(D(GRL(f)), domain)

    Args:
        weight: scale of the reversed gradient (the λ schedule's maximum).
        hidden: discriminator width.
        gamma: schedule steepness γ (10 in the paper).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        weight: NonNegative = 1.0,
        hidden: PositiveInt = 256,
        gamma: Positive = 10.0,
    ):
        super().__init__(model, num_classes, weight)
        self.gamma = gamma
        self.discriminator = nn.Sequential(nn.Linear(self.embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def forward(self, batch: Mapping[str, Any], progress: float) -> dict[str, torch.Tensor]:
        self._check_batch(batch, progress)
        f_s, z_s, f_t, z_t = self.joint_forward(batch)
        lam = self.weight * dann_lambda(progress, self.gamma)
        f = torch.cat([f_s, f_t])
        d_logits = self.discriminator(grad_reverse(f, lam)).squeeze(1)
        domain = torch.cat([torch.zeros(len(f_s)), torch.ones(len(f_t))]).to(d_logits)
        domain_loss = F.binary_cross_entropy_with_logits(d_logits, domain)
        ce = F.cross_entropy(z_s, batch["y_src"])
        domain_acc = ((d_logits > 0).float() == domain).float().mean()
        return {
            "loss": ce + domain_loss,
            "ce": ce.detach(),
            "domain": domain_loss.detach(),
            "domain_acc": domain_acc.detach(),
            "lambda": torch.tensor(lam),
        }


@_register("mmd")
class MMD(AdaptMethod):
    """Multi-kernel MMD alignment of embeddings (Long et al., ICML 2015), see :func:`gaussian_mmd`.

    ``loss = CE(z_s, y_s) + weight · MMD²(f_s, f_t)``.

    Args:
        kernels: bandwidth multipliers of the median heuristic, non-empty, each > 0.
        all_gather: under ``torch.distributed``, compute MMD over the features of all ranks
            (:func:`gather_from_all_ranks`) instead of the local batch. Off by default: the
            estimate is then per rank, noisier but with no extra communication.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        weight: NonNegative = 1.0,
        kernels: Kernels = (0.5, 1.0, 2.0, 4.0, 8.0),
        all_gather: bool = False,
    ):
        super().__init__(model, num_classes, weight)
        if len(kernels) == 0 or any(not k > 0 for k in kernels):
            raise KdrayError(
                f"adapt method 'mmd': parameter 'kernels' must be a non-empty list of numbers > 0, "
                f"got {list(kernels)!r}."
            )
        self.kernels = [float(k) for k in kernels]
        self.all_gather = all_gather

    def forward(self, batch: Mapping[str, Any], progress: float) -> dict[str, torch.Tensor]:
        self._check_batch(batch, progress)
        f_s, z_s, f_t = self.aligned_features(batch)
        mmd = gaussian_mmd(f_s, f_t, self.kernels)
        ce = F.cross_entropy(z_s, batch["y_src"])
        return {"loss": ce + self.weight * mmd, "ce": ce.detach(), "mmd": mmd.detach()}


@_register("coral")
class CORAL(AdaptMethod):
    """Deep CORAL (Sun & Saenko, 2016): ``loss = CE(z_s, y_s) + weight · ‖C_s - C_t‖_F² / (4d²)``.

    Args:
        all_gather: compute the covariances over all ranks' features, as for :class:`MMD`.
    """

    def __init__(self, model: nn.Module, num_classes: int, weight: NonNegative = 1.0, all_gather: bool = False):
        super().__init__(model, num_classes, weight)
        self.all_gather = all_gather

    def forward(self, batch: Mapping[str, Any], progress: float) -> dict[str, torch.Tensor]:
        self._check_batch(batch, progress)
        f_s, z_s, f_t = self.aligned_features(batch)
        coral = coral_loss(f_s, f_t)
        ce = F.cross_entropy(z_s, batch["y_src"])
        return {"loss": ce + self.weight * coral, "ce": ce.detach(), "coral": coral.detach()}


@_register("entropy_min")
class EntropyMin(AdaptMethod):
    """Entropy minimisation (Grandvalet & Bengio, 2005): ``CE(z_s, y_s) + weight · mean H(softmax(z_t))``."""

    def forward(self, batch: Mapping[str, Any], progress: float) -> dict[str, torch.Tensor]:
        self._check_batch(batch, progress)
        _, z_s, _, z_t = self.joint_forward(batch)
        ent = entropy(z_t).mean()
        ce = F.cross_entropy(z_s, batch["y_src"])
        return {"loss": ce + self.weight * ent, "ce": ce.detach(), "entropy": ent.detach()}


@_register("shot")
class SHOT(AdaptMethod):
    """Source HypOthesis Transfer (Liang et al., ICML 2020): source-free adaptation.

    The classifier (the source hypothesis) is frozen (``requires_grad=False``); the features adapt
    to target data alone::

        loss = weight · L_IM(z_t) + beta · CE(z_t, ŷ)

    with ``L_IM`` the information maximisation loss (:func:`information_maximization`) and ``ŷ``
    pseudo-labels from clustering in feature space (cosine similarity of L2-normalised embeddings
    ``f̂``): class centroids weighted by the predictions, ``c_k = Σ_i p_ik f̂_i / Σ_i p_ik``; label
    each sample by its nearest centroid; recompute the centroids from those hard labels (classes
    left empty drop out) and label again.

    Pseudo-labels, two ways:

    * the loop calls :meth:`refresh_pseudo_labels` with all its target data at each epoch start
      (as in the paper); the centroids are kept and each batch is labelled by the nearest of them,
      using its current features (the paper labels with the epoch-start features instead; this
      needs no sample indices in the batch);
    * if never refreshed, each batch is clustered on its own, which is noisier for small batches.

    Source keys in the batch are ignored (``source_free = True``).

    Args:
        weight: weight of the information-maximisation term.
        beta: weight of the pseudo-label cross-entropy (0.3 in the paper; 0 = IM only).
    """

    source_free = True

    @classmethod
    def prepare_model(cls, model: nn.Module) -> nn.Module:
        """Freeze the classifier (the source hypothesis). Call before DDP wrapping."""
        for p in classifier_of(model).parameters():
            p.requires_grad_(False)
        return model

    def __init__(self, model: nn.Module, num_classes: int, weight: NonNegative = 1.0, beta: NonNegative = 0.3):
        super().__init__(model, num_classes, weight)
        self.beta = beta
        self.prepare_model(unwrap(model))
        self.register_buffer("centroids", torch.empty(0), persistent=False)  # [K, D] after a refresh

    @staticmethod
    def _centroid_sums(f_hat: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums, mass = weights.T @ f_hat, weights.sum(dim=0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)  # every rank clusters the whole target set, not its shard
            dist.all_reduce(mass)
        return sums, mass

    @staticmethod
    def _nearest(f_hat: torch.Tensor, centroids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        sim = f_hat @ F.normalize(centroids, dim=1).T
        if valid is not None:
            sim = sim.masked_fill(~valid, float("-inf"))
        return sim.argmax(dim=1)

    def cluster(self, features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Centroids [K, D] (rows of empty classes are NaN) from features [M, D] and softmax [M, K]."""
        f_hat = F.normalize(features.float(), dim=1)
        probs = probs.float()
        sums, mass = self._centroid_sums(f_hat, probs)
        soft = sums / (mass[:, None] + EPS)
        labels = self._nearest(f_hat, soft)
        sums, count = self._centroid_sums(f_hat, F.one_hot(labels, self.num_classes).to(f_hat))
        hard = sums / count.clamp_min(1)[:, None]
        return hard.masked_fill((count == 0)[:, None], float("nan"))

    def assign(self, features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """Nearest valid (non-NaN) centroid by cosine similarity; [M, D] -> [M] labels."""
        valid = ~centroids.isnan().any(dim=1)
        return self._nearest(F.normalize(features.float(), dim=1), centroids.nan_to_num(0.0), valid)

    @torch.no_grad()
    def refresh_pseudo_labels(
        self, x_tgt_all: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 256
    ) -> torch.Tensor:
        """Cluster all target data (this rank's shard; sums are all-reduced across ranks) and keep the centroids.

        Runs the model in eval mode (BatchNorm running statistics, no dropout), then restores
        its mode. Returns this shard's pseudo-labels [M] (for logging, e.g. their accuracy).
        """
        chunks = x_tgt_all.split(batch_size) if isinstance(x_tgt_all, torch.Tensor) else x_tgt_all
        device = next(unwrap(self.model).parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            feats, logits = zip(*(embedding_and_logits(self.model, x.to(device)) for x in chunks))
        finally:
            self.model.train(was_training)
        f, z = torch.cat(feats).float(), torch.cat(logits).float()
        with no_autocast(f):
            self.centroids = self.cluster(f, z.softmax(dim=1))
            return self.assign(f, self.centroids)

    def forward(self, batch: Mapping[str, Any], progress: float) -> dict[str, torch.Tensor]:
        self._check_batch(batch, progress, source=False)
        f, z = embedding_and_logits(self.model, batch["x_tgt"])
        im = information_maximization(z)
        out = {"im": im.detach()}
        loss = self.weight * im
        if self.beta > 0:
            with torch.no_grad(), no_autocast(f):
                centroids = self.centroids if self.centroids.numel() else self.cluster(f, z.float().softmax(1))
                pseudo = self.assign(f, centroids)
            pl = F.cross_entropy(z, pseudo)
            loss = loss + self.beta * pl
            out["pseudo_ce"] = pl.detach()
        return {"loss": loss, **out}


# --------------------------------------------------------------------------------------------
# Building from a spec.
# --------------------------------------------------------------------------------------------


class AdaptMethodSpec(Entry):
    """A stage's ``method:`` block, e.g. ``{name: dann, weight: 1.0, hidden: 256}``."""

    entry_kind: ClassVar[str] = "adapt method"
    entry_registry: ClassVar[Registry] = ADAPT_METHODS
    entry_skip: ClassVar[tuple[str, ...]] = ("model", "num_classes")


def build_adapt_method(
    entry: AdaptMethodSpec | Mapping[str, Any] | str, model: nn.Module, num_classes: int, **params: Any
) -> AdaptMethod:
    """Build a registered method with checked parameters.

    ``build_adapt_method("mmd", model, 10, kernels=[1, 2])`` or with a spec / mapping.

    Raises:
        KdrayError: unknown method, unknown parameter (with the valid ones) or a value out of range.
    """
    if isinstance(entry, AdaptMethodSpec):
        entry = entry.model_dump()
    if isinstance(entry, str):
        entry = {"name": entry}
    entry = {**entry, **params}
    if "name" not in entry:
        raise SpecError(
            f"an adapt method entry needs a 'name', got {entry!r}.",
            hint=f"Known methods: {', '.join(ADAPT_METHODS.names())}.",
        )
    name = entry.pop("name")
    cls = ADAPT_METHODS.get(name)
    checked = check_params("adapt method", name, cls, entry, skip=("model", "num_classes"))
    return cls(model, num_classes, **checked)


__all__ = [
    "ADAPT_METHODS",
    "AdaptMethod",
    "AdaptMethodSpec",
    "build_adapt_method",
    "SourceOnly",
    "DANN",
    "MMD",
    "CORAL",
    "EntropyMin",
    "SHOT",
    "entropy",
    "information_maximization",
    "dann_lambda",
    "grad_reverse",
    "gather_from_all_ranks",
    "gaussian_mmd",
    "covariance",
    "coral_loss",
    "entropy_score",
    "snd_score",
    "embedding_and_logits",
    "unwrap",
]
