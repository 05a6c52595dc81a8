"""LOSSES: the distillation loss terms a ``distill`` stage combines as a weighted list.

Every term is a small ``nn.Module`` behind one interface, built from the YAML spec as
``LOSSES.get(name)(**params)`` (or :func:`build_loss`, which turns bad keywords into a
:class:`~kdray.errors.SpecError`)::

    loss = build_loss("hinton_kl", temperature=4.0)
    loss.setup(student, teacher, example_x)          # before the optimiser is built
    s = forward_with_features(student, x, loss.student_layers, embedding=loss.needs_embedding)
    t = forward_with_features(teacher, x, loss.teacher_layers, embedding=loss.needs_embedding)
    value = loss(s, t, {"x": x, "y": y})             # a scalar tensor

Model outputs travel as :class:`Outputs`: logits ``[N, K]``, the hooked outputs of the module
paths the loss asked for, and optionally the pre-classifier embedding ``[N, D]``. Teacher outputs
are always detached inside the losses: the teacher is never trained by a distillation term.
Labels ``batch["y"]`` may hold ``-1`` for unlabelled rows; terms that use labels skip those rows.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from kdray.core.errors import KdrayError
from kdray.core.registry import Entry, Registry, check_params
from kdray.models import lm
from kdray.models.hooks import Outputs, forward_with_features, resolve_modules

LOSSES: Registry = Registry("loss", group="kdray.losses")


# ---------------------------------------------------------------------------------------------
# The interface.


class DistillLoss(nn.Module):
    """Base class of every loss term.

    Class attributes tell the training loop what to compute before calling ``forward``:

    * ``needs_teacher``: whether ``teacher`` outputs are required (False for plain cross-entropy);
    * ``needs_embedding``: whether ``Outputs.embedding`` should be filled
      (``forward_with_features(..., embedding=True)``);
    * ``student_layers`` / ``teacher_layers``: module paths to hook on each model (set per instance).

    ``setup`` runs once before the optimiser is built; terms with learned parts (projections)
    create them there, so their parameters exist when the loop collects ``loss.parameters()``.
    """

    needs_teacher: bool = True
    needs_embedding: bool = False
    student_layers: tuple[str, ...] = ()
    teacher_layers: tuple[str, ...] = ()

    def setup(self, student: nn.Module, teacher: nn.Module | None, example_x: torch.Tensor) -> None:
        """Check the hooked paths exist (subclasses also build projections here)."""
        resolve_modules(student, self.student_layers, "student")
        if self.teacher_layers:
            if teacher is None:
                raise KdrayError(
                    f"loss {self.name!r} reads teacher layers {list(self.teacher_layers)} "
                    "but no teacher model was given; it needs the teacher to run online."
                )
            resolve_modules(teacher, self.teacher_layers, "teacher")

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # Small checks shared by the terms; each message names both sides.

    def _teacher(self, teacher: Outputs | None) -> Outputs:
        if teacher is None:
            raise KdrayError(f"loss {self.name!r} needs teacher outputs, but the loop passed none.")
        return teacher

    def _same_logits(self, s: torch.Tensor, t: torch.Tensor) -> None:
        if s.shape != t.shape:
            raise KdrayError(
                f"loss {self.name!r}: student logits {tuple(s.shape)} and teacher logits "
                f"{tuple(t.shape)} differ; both models need the same num_classes and batch."
            )

    def _labels(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        if "y" not in batch:
            raise KdrayError(f"loss {self.name!r} needs labels, but the batch has keys {sorted(batch)} and no 'y'.")
        y = batch["y"]
        if y.dim() != 1 or y.shape[0] != logits.shape[0]:
            raise KdrayError(
                f"loss {self.name!r}: labels y {tuple(y.shape)} do not match logits "
                f"{tuple(logits.shape)}; expected y of shape [{logits.shape[0]}]."
            )
        return y.long()

    def _feature(self, out: Outputs, path: str, role: str) -> torch.Tensor:
        if path not in out.features:
            raise KdrayError(
                f"loss {self.name!r} needs the {role} output of {path!r}, but only "
                f"{sorted(out.features)} were captured; hook the loss's {role}_layers."
            )
        return out.features[path]


def register(name: str, **meta: Any):
    """``@LOSSES.register`` that also records the registry name on the class (for messages)."""

    def deco(cls: type[DistillLoss]) -> type[DistillLoss]:
        cls.registry_name = name  # type: ignore[attr-defined]
        return LOSSES.register(name, **meta)(cls)

    return deco


def build_loss(name: str, **params: Any) -> DistillLoss:
    """A loss term with its parameters checked against its signature (``LossTerm.build()`` in a spec)."""
    cls = LOSSES.get(name)
    return cls(**check_params("loss", name, cls, params))


# ---------------------------------------------------------------------------------------------
# Small numeric helpers.


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A scalar 0 that keeps the graph to ``like`` (so backward and DDP see the parameters)."""
    return like.sum() * 0.0


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, ``[N, K] -> [N]``, with 0·log 0 = 0 (teacher logits may be -inf)."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))).sum(-1)


Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
ModulePath = Annotated[str, Field(min_length=1)]


# ---------------------------------------------------------------------------------------------
# Output losses.


@register("cross_entropy")
class CrossEntropy(DistillLoss):
    """Cross-entropy with the labels (the "hard" term), optionally label-smoothed.

    ``L = -(1/|M|) Σ_{i∈M} Σ_k q_ik log softmax(z_S,i)_k`` over the labelled rows
    ``M = {i : y_i >= 0}``, with ``q_i`` the one-hot label smoothed by ε
    (``q = (1-ε)·onehot + ε/K``; Szegedy et al. 2016).

    Shapes: student logits ``[N, K]``, ``batch["y"]`` ``[N]`` (``-1`` = unlabelled, ignored).
    Reduction: mean over labelled rows; a batch with no labelled row gives 0 (still connected to
    the student's graph). Per-sample weights ``batch["w"]`` are not used. A causal LM's logits
    ``[N, T, V]`` are scored against the next tokens of ``batch["x"]`` (mean over real tokens,
    ``kdray.models.lm``; label smoothing does not apply).

    Args:
        label_smoothing: ε in [0, 1).
    """

    needs_teacher = False

    def __init__(self, label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict) -> torch.Tensor:
        logits = student.logits.float()
        if lm.is_sequence(logits):
            return lm.next_token_nll(logits, batch["x"])
        y = self._labels(logits, batch)
        keep = y >= 0
        if not bool(keep.any()):
            return _zero(logits)
        return F.cross_entropy(logits[keep], y[keep], label_smoothing=self.label_smoothing)


@register("hinton_kl")
class HintonKL(DistillLoss):
    """Soft-target distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

    ``L = T² · (1/N) Σ_i KL(softmax(z_T,i/T) ‖ softmax(z_S,i/T))``

    The T² factor keeps the gradient scale independent of T. Shapes: student and teacher logits
    ``[N, K]``. Reduction: "batchmean" (sum over classes, mean over rows, all rows; labels unused).
    Teacher logits may contain ``-inf`` (a top-k cache); those classes contribute 0.

    Args:
        temperature: T > 0.
    """

    def __init__(self, temperature: Positive = 4.0):
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict) -> torch.Tensor:
        t_logits = self._teacher(teacher).logits.detach().float()
        s_logits = student.logits.float()
        self._same_logits(s_logits, t_logits)
        T = self.temperature
        kl = _kl_rows(F.log_softmax(t_logits / T, -1), F.log_softmax(s_logits / T, -1))
        return T * T * kl.mean()


@register("weighted_output_mse")
class WeightedOutputMSE(DistillLoss):
    """Per-sample weighted output regression: the squared distance of the outputs, weighted per example.

    ``L = Σ_i w_i ‖f_T(x_i) − f_S(x_i)‖² / Σ_i w_i``

    ``f`` is the logits (``target="logits"``; Ba & Caruana 2014, "Do Deep Nets Really Need to be
    Deep?") or the softmax at ``temperature`` (``target="probs"``). The weights ``w_i >= 0`` are:

    * ``uniform``: 1;
    * ``class_table``: ``class_weights[y_i]``, or ``class_weights[argmax z_T,i]`` when ``y_i == -1``;
    * ``confidence``: the teacher's max softmax probability ``max_k softmax(z_T,i)_k`` (T = 1, detached);
    * ``column``: ``batch["w"]`` ``[N]``, a per-sample weight column from the data set.

    Shapes: logits ``[N, K]``. Reduction: the weighted mean over rows of the squared L2 distance
    summed over the K classes; all-zero weights give 0. A causal LM's logits ``[N, T, V]`` are
    regressed per token: every position whose next token is real is a row (``class_table`` reads
    that next token as its class, ``column`` gives each of a row's tokens the row's weight); this
    needs the teacher's full logits (online, or ``teacher_cache: off``), not a top-k cache.

    Args:
        target: "logits" or "probs".
        temperature: softmax temperature for ``target="probs"`` (> 0).
        weighting: "uniform", "class_table", "confidence" or "column".
        class_weights: K non-negative floats, required for (and only for) ``class_table``.
    """

    TARGETS = ("logits", "probs")
    WEIGHTINGS = ("uniform", "class_table", "confidence", "column")

    def __init__(
        self,
        target: Literal["logits", "probs"] = "logits",
        temperature: Positive = 1.0,
        weighting: Literal["uniform", "class_table", "confidence", "column"] = "uniform",
        class_weights: list[NonNegative] | None = None,
    ):
        super().__init__()
        self.validate_params({"weighting": weighting, "class_weights": class_weights})
        self.target, self.weighting, self.temperature = target, weighting, float(temperature)
        table = torch.tensor([float(w) for w in class_weights or []], dtype=torch.float32)
        self.register_buffer("class_weights", table, persistent=False)

    @staticmethod
    def validate_params(params: dict[str, Any]) -> None:
        """class_weights goes with (and only with) weighting: class_table."""
        weighting, class_weights = params.get("weighting"), params.get("class_weights")
        if weighting == "class_table" and not class_weights:
            raise ValueError(
                "weighting='class_table' needs class_weights, a list of one non-negative weight per "
                "class, e.g. class_weights: [1.0, 2.0, ...]."
            )
        if weighting != "class_table" and class_weights is not None:
            raise ValueError(
                f"class_weights is only used with weighting='class_table', but weighting={weighting!r}; "
                "remove class_weights or change weighting."
            )

    def _weights(self, s_logits: torch.Tensor, t_logits: torch.Tensor, batch: dict) -> torch.Tensor:
        n, k = s_logits.shape
        if self.weighting == "uniform":
            return torch.ones(n, device=s_logits.device)
        if self.weighting == "confidence":
            return F.softmax(t_logits, -1).max(-1).values
        if self.weighting == "column":
            if "w" not in batch:
                raise KdrayError(
                    "loss 'weighted_output_mse' with weighting='column' needs per-sample weights "
                    f"batch['w'], but the batch has keys {sorted(batch)}; give the data set a weight "
                    "column."
                )
            w = batch["w"]
            if w.shape != (n,):
                raise KdrayError(
                    f"loss 'weighted_output_mse': weights w {tuple(w.shape)} do not match logits "
                    f"{tuple(s_logits.shape)}; expected w of shape [{n}]."
                )
            return w.to(s_logits.device, torch.float32)
        # class_table
        if len(self.class_weights) != k:  # type: ignore[arg-type]  # torch: Module.__getattr__
            raise KdrayError(
                f"loss 'weighted_output_mse': class_weights has {len(self.class_weights)} entries "  # type: ignore[arg-type]  # torch: Module.__getattr__
                f"but the logits have {k} classes; give one weight per class."
            )
        y = batch["y"].long() if "y" in batch else torch.full((n,), -1, device=s_logits.device)
        if y.shape != (n,):
            raise KdrayError(
                f"loss 'weighted_output_mse': labels y {tuple(y.shape)} do not match logits "
                f"{tuple(s_logits.shape)}; expected y of shape [{n}]."
            )
        idx = torch.where(y >= 0, y, t_logits.argmax(-1))
        return self.class_weights.to(s_logits.device)[idx]  # type: ignore[index]  # torch: Module.__getattr__

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict) -> torch.Tensor:
        t_out = self._teacher(teacher)
        t_logits = t_out.logits.detach().float()
        s_logits = student.logits.float()
        if lm.is_sequence(s_logits):  # per token: each real next-token position is a row
            if t_out.topk_ids is not None:
                raise KdrayError(
                    "loss 'weighted_output_mse' regresses the teacher's full logits, but the teacher comes from a "
                    "top-k sequence cache",
                    hint="Set teacher_cache: off for this stage (the teacher then runs online), or use token_kl.",
                )
            mask = lm.token_mask(batch["x"])
            steps = mask.shape[1]
            rows = {"y": lm.targets(batch["x"])[mask]}
            if "w" in batch:
                rows["w"] = batch["w"][:, None].expand(mask.shape)[mask]
            s_logits, t_logits, batch = s_logits[:, :steps][mask], t_logits[:, :steps][mask], rows
        self._same_logits(s_logits, t_logits)
        if self.target == "probs":
            f_s = F.softmax(s_logits / self.temperature, -1)
            f_t = F.softmax(t_logits / self.temperature, -1)
        else:
            f_s, f_t = s_logits, t_logits
        w = self._weights(s_logits, t_logits, batch).detach()
        dist = (f_t - f_s).pow(2).sum(-1)  # [N]
        return (w * dist).sum() / w.sum().clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------
# Feature losses.


def _bridge(s: torch.Tensor, t: torch.Tensor, s_path: str, t_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring a student and a teacher feature to comparable shapes (widths may still differ).

    3-D ``[N, L, D]`` -> mean over L -> ``[N, D]``; 4-D vs 2-D -> global average pool the 4-D map;
    4-D vs 4-D of different spatial size -> adaptive average pool both to the smaller H and W.
    """
    if s.shape[0] != t.shape[0]:
        raise KdrayError(
            f"student {s_path!r} {tuple(s.shape)} and teacher {t_path!r} {tuple(t.shape)} "
            "have different batch sizes; run both models on the same batch."
        )
    if s.dim() not in (2, 3, 4) or t.dim() not in (2, 3, 4):
        raise KdrayError(
            f"cannot bridge student {s_path!r} {tuple(s.shape)} and teacher {t_path!r} "
            f"{tuple(t.shape)}: features must be [N, D], [N, L, D] or [N, C, H, W]; "
            "choose layers from the models' feature_layers."
        )
    s = s.mean(1) if s.dim() == 3 else s
    t = t.mean(1) if t.dim() == 3 else t
    if s.dim() == 4 and t.dim() == 4:
        size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
        s = s if tuple(s.shape[2:]) == size else F.adaptive_avg_pool2d(s, size)
        t = t if tuple(t.shape[2:]) == size else F.adaptive_avg_pool2d(t, size)
    else:
        s = s.mean((2, 3)) if s.dim() == 4 else s
        t = t.mean((2, 3)) if t.dim() == 4 else t
    return s, t


@torch.no_grad()
def _probe(model: nn.Module, x: torch.Tensor, paths: Sequence[str], role: str) -> dict[str, torch.Tensor]:
    """One eval-mode forward with hooks, restoring the train/eval flags (BN statistics untouched)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return forward_with_features(model, x, paths, role=role).features
    finally:
        for m, was in modes.items():
            m.train(was)


@register("feature_hint")
class FeatureHint(DistillLoss):
    """FitNet hint loss (Romero et al. 2015, "FitNets: Hints for Thin Deep Nets").

    ``L = mean((r(g(F_S)) − g(F_T))²)``: the MSE, averaged over every element, between a learned
    projection ``r`` of the student feature at ``student_layer`` and the teacher feature at
    ``teacher_layer``. ``g`` brings the two to comparable shapes first:

    * ``[N, C, H, W]`` vs ``[N, C', H', W']``: adaptive-average-pool the larger spatial map to the
      smaller; ``r`` is a 1x1 convolution C -> C';
    * ``[N, L, D]`` (tokens of a transformer, time steps of a GRU): mean over the sequence dim L;
    * a 4-D map against a 2-D/3-D feature: global-average-pool the map to ``[N, C]``; ``r`` is a
      ``Linear`` D -> D'.

    ``r`` is always learned (also when the widths match), as the FitNet regressor. Call
    :meth:`setup` before building the optimiser: it probes both models once and creates ``r``, whose
    parameters belong to this module.

    Args:
        student_layer: module path in the student, e.g. ``"features.1"``.
        teacher_layer: module path in the teacher.
    """

    def __init__(self, student_layer: ModulePath, teacher_layer: ModulePath):
        super().__init__()
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.student_layers, self.teacher_layers = (student_layer,), (teacher_layer,)
        self.proj: nn.Module | None = None

    def setup(self, student: nn.Module, teacher: nn.Module | None, example_x: torch.Tensor) -> None:
        super().setup(student, teacher, example_x)
        s = _probe(student, example_x, self.student_layers, "student")[self.student_layer]
        t = _probe(teacher, example_x, self.teacher_layers, "teacher")[self.teacher_layer]  # type: ignore[arg-type]  # torch: Module.__getattr__
        s2, t2 = _bridge(s, t, self.student_layer, self.teacher_layer)
        cin, cout = s2.shape[1], t2.shape[1]
        self.proj = (nn.Conv2d(cin, cout, 1) if s2.dim() == 4 else nn.Linear(cin, cout)).to(example_x.device)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict) -> torch.Tensor:
        if self.proj is None:
            raise RuntimeError(
                "feature_hint.setup(student, teacher, example_x) must run before training "
                "(it builds the projection the optimiser has to see)."
            )
        s = self._feature(student, self.student_layer, "student").float()
        t = self._feature(self._teacher(teacher), self.teacher_layer, "teacher").detach().float()
        s2, t2 = _bridge(s, t, self.student_layer, self.teacher_layer)
        cin = self.proj.in_channels if isinstance(self.proj, nn.Conv2d) else self.proj.in_features
        if s2.dim() != (4 if isinstance(self.proj, nn.Conv2d) else 2) or s2.shape[1] != cin:
            raise KdrayError(
                f"feature_hint: student {self.student_layer!r} now gives {tuple(s.shape)} "
                f"(teacher {self.teacher_layer!r} {tuple(t.shape)}), but setup built a projection "
                f"for width {cin}; run setup with inputs shaped like the training data."
            )
        return F.mse_loss(self.proj(s2), t2)


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a conv feature: ``Σ_c |A_c|^p``, ``[N, C, H, W] -> [N, H, W]``."""
    return feature.abs().pow(p).sum(1)


@register("attention_transfer")
class AttentionTransfer(DistillLoss):
    """Activation-based attention transfer (Zagoruyko & Komodakis 2017, "Paying More Attention to Attention").

    For each (student, teacher) pair of conv layers, ``Q = vec(Σ_c |A_c|^p)`` is the spatial
    attention map; maps of different H×W are bilinearly interpolated to the larger of the two
    sizes. With ``q = Q / ‖Q‖₂``:

    ``L = β/2 · (1/|pairs|) Σ_j (1/N) Σ_i ‖q_S,i^j − q_T,i^j‖₂``

    which is eq. 2 of the paper (the p=2 norm, not squared), averaged over pairs and over the batch.
    Because the distance is between unit vectors (at most 2) and not divided by H·W, β defaults to
    1 rather than the reference code's 10³ for its per-element mean of squares.

    Shapes: features ``[N, C, H, W]`` (channel counts may differ; no learned parameters).

    Args:
        pairs: ``[[student_path, teacher_path], ...]``.
        p: exponent of the attention map (> 0).
        beta: β (> 0).
    """

    def __init__(
        self,
        pairs: Annotated[list[tuple[ModulePath, ModulePath]], Field(min_length=1)],
        p: Positive = 2.0,
        beta: Positive = 1.0,
    ):
        super().__init__()
        self.pairs = [tuple(pr) for pr in pairs]
        self.p, self.beta = float(p), float(beta)
        self.student_layers = tuple(dict.fromkeys(s for s, _ in self.pairs))
        self.teacher_layers = tuple(dict.fromkeys(t for _, t in self.pairs))

    def _check_4d(self, s: torch.Tensor, t: torch.Tensor, s_path: str, t_path: str) -> None:
        if s.dim() != 4 or t.dim() != 4:
            raise KdrayError(
                f"attention_transfer needs conv feature maps [N, C, H, W], but student {s_path!r} "
                f"gives {tuple(s.shape)} and teacher {t_path!r} gives {tuple(t.shape)}; pick conv "
                "layers, or use feature_hint for MLP/GRU/transformer features."
            )
        if s.shape[0] != t.shape[0]:
            raise KdrayError(
                f"attention_transfer: student {s_path!r} {tuple(s.shape)} and teacher {t_path!r} "
                f"{tuple(t.shape)} have different batch sizes."
            )

    def setup(self, student: nn.Module, teacher: nn.Module | None, example_x: torch.Tensor) -> None:
        """Fail before training when a pair is not two conv feature maps."""
        super().setup(student, teacher, example_x)
        s = _probe(student, example_x, self.student_layers, "student")
        t = _probe(teacher, example_x, self.teacher_layers, "teacher")  # type: ignore[arg-type]  # torch: Module.__getattr__
        for sp, tp in self.pairs:
            self._check_4d(s[sp], t[tp], sp, tp)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict) -> torch.Tensor:
        teacher = self._teacher(teacher)
        total = 0.0
        for sp, tp in self.pairs:
            s = self._feature(student, sp, "student").float()
            t = self._feature(teacher, tp, "teacher").detach().float()
            self._check_4d(s, t, sp, tp)
            qs, qt = attention_map(s, self.p), attention_map(t, self.p)
            size = (max(qs.shape[1], qt.shape[1]), max(qs.shape[2], qt.shape[2]))
            qs, qt = (
                q
                if tuple(q.shape[1:]) == size
                else F.interpolate(q[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                for q in (qs, qt)
            )
            qs, qt = F.normalize(qs.flatten(1), dim=1), F.normalize(qt.flatten(1), dim=1)
            total = total + torch.linalg.vector_norm(qs - qt, dim=1).mean()
        return self.beta / 2 * torch.as_tensor(total) / len(self.pairs)


# ---------------------------------------------------------------------------------------------
# Relational and decoupled losses.


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """``[N, D] -> [N, N]`` Euclidean distances (clamped before the sqrt so its gradient stays finite)."""
    sq = (e[:, None, :] - e[None, :, :]).pow(2).sum(-1)
    return sq.clamp_min(1e-12).sqrt() * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def _rkd_distance(e: torch.Tensor) -> torch.Tensor:
    """Distances divided by their mean over pairs i ≠ j (scale-free)."""
    d = _pairwise_distances(e)
    n = len(e)
    mu = d.sum() / max(n * (n - 1), 1)
    return d / mu.clamp_min(1e-12)


def _rkd_angles(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos ∠(e_i, e_j, e_k) = <(e_i−e_j)/‖·‖, (e_k−e_j)/‖·‖>`` as ``[j, i, k]``; edge lengths ``[j, i]``."""
    diff = e[None, :, :] - e[:, None, :]  # diff[j, i] = e_i - e_j
    length = diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()
    unit = diff / length[..., None]
    return unit @ unit.transpose(1, 2), length


@register("rkd")
class RelationalKD(DistillLoss):
    """Relational knowledge distillation (Park, Kim, Lu & Cho 2019, "Relational Knowledge Distillation").

    The student copies the teacher's *relations* between samples rather than its outputs:

    * distance: ``ψ_D(t_i, t_j) = ‖t_i − t_j‖₂ / μ`` with μ the mean distance over pairs i ≠ j,
      ``L_D = mean_{i≠j} huber(ψ_D(s_i, s_j), ψ_D(t_i, t_j))``;
    * angle: ``ψ_A(t_i, t_j, t_k) = <(t_i−t_j)/‖t_i−t_j‖, (t_k−t_j)/‖t_k−t_j‖>``,
      ``L_A = mean over distinct (i, j, k) of huber(ψ_A(s), ψ_A(t))``;

    ``L = distance_weight·L_D + angle_weight·L_A`` (Huber with δ = 1, i.e. smooth-L1). Both terms
    are invariant to scaling the embeddings. Triplets with a zero-length edge are skipped.

    Shapes: ``embedding`` ``[N, D_S]`` and ``[N, D_T]`` (widths may differ, as only relations are
    compared). When either side has no embedding (e.g. a cached teacher), both sides use their
    logits ``[N, K]`` instead, so that like is compared with like. Costs O(N³) memory for angles.

    Args:
        distance_weight: weight of L_D (>= 0).
        angle_weight: weight of L_A (>= 0).
    """

    needs_embedding = True

    def __init__(self, distance_weight: NonNegative = 25.0, angle_weight: NonNegative = 50.0):
        super().__init__()
        self.distance_weight, self.angle_weight = float(distance_weight), float(angle_weight)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict) -> torch.Tensor:
        teacher = self._teacher(teacher)
        if student.embedding is not None and teacher.embedding is not None:
            s, t, what = student.embedding, teacher.embedding, "embeddings"
        else:
            s, t, what = student.logits, teacher.logits, "logits"
        s, t = s.float().flatten(1), t.detach().float().flatten(1)
        if len(s) != len(t):
            raise KdrayError(
                f"rkd: student {what} {tuple(s.shape)} and teacher {what} {tuple(t.shape)} have different batch sizes."
            )
        n = len(s)
        loss = _zero(s)
        if self.distance_weight and n >= 2:
            off = ~torch.eye(n, dtype=torch.bool, device=s.device)
            d = F.smooth_l1_loss(_rkd_distance(s)[off], _rkd_distance(t)[off])
            loss = loss + self.distance_weight * d
        if self.angle_weight and n >= 3:
            a_s, len_s = _rkd_angles(s)
            a_t, len_t = _rkd_angles(t)
            idx = torch.arange(n, device=s.device)
            j, i, k = idx[:, None, None], idx[None, :, None], idx[None, None, :]
            edge = (len_s > 1e-6) & (len_t > 1e-6)  # [j, i]
            valid = (i != j) & (k != j) & (i != k) & edge[:, :, None] & edge[:, None, :]
            if bool(valid.any()):
                loss = loss + self.angle_weight * F.smooth_l1_loss(a_s[valid], a_t[valid])
        return loss


@register("dkd")
class DecoupledKD(DistillLoss):
    """Decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled Knowledge Distillation").

    Splits Hinton's KL at the ground-truth class t of each labelled row:

    * TCKD: ``KL(b_T ‖ b_S)`` with the binary ``b = [p_t, 1 − p_t]``;
    * NCKD: ``KL(p̂_T ‖ p̂_S)`` with ``p̂`` the softmax over the non-target classes only;

    all probabilities at temperature T, and
    ``L = T² · (1/|M|) Σ_{i∈M} (α·TCKD_i + β·NCKD_i)`` over the labelled rows ``M = {i : y_i >= 0}``.

    Shapes: logits ``[N, K]`` (K >= 2), ``batch["y"]`` ``[N]``. Reduction: mean over labelled rows;
    no labelled row gives 0 (connected to the student's graph). The paper's warm-up is left to the
    loss weight schedule.

    Args:
        alpha: α, weight of TCKD (>= 0).
        beta: β, weight of NCKD (>= 0).
        temperature: T > 0.
    """

    def __init__(self, alpha: NonNegative = 1.0, beta: NonNegative = 8.0, temperature: Positive = 4.0):
        super().__init__()
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)

    @staticmethod
    def _binary_and_rest(z: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log [p_t, 1 − p_t] ``[M, 2]`` and log p̂ over the non-target classes ``[M, K]`` (-inf at t)."""
        log_p = F.log_softmax(z, -1)
        log_pt = log_p.gather(1, target[:, None])
        others = z.masked_fill(F.one_hot(target, z.shape[1]).bool(), float("-inf"))
        # log(1 − p_t) = logsumexp over the other classes − logsumexp over all: stable when p_t ≈ 1.
        log_rest = torch.logsumexp(others, -1, keepdim=True) - torch.logsumexp(z, -1, keepdim=True)
        return torch.cat([log_pt, log_rest], 1), F.log_softmax(others, -1)

    def forward(self, student: Outputs, teacher: Outputs | None, batch: dict) -> torch.Tensor:
        t_logits = self._teacher(teacher).logits.detach().float()
        s_logits = student.logits.float()
        self._same_logits(s_logits, t_logits)
        if s_logits.shape[1] < 2:
            raise KdrayError(f"dkd needs at least 2 classes, logits are {tuple(s_logits.shape)}.")
        y = self._labels(s_logits, batch)
        keep = y >= 0
        if not bool(keep.any()):
            return _zero(s_logits)
        T, y = self.temperature, y[keep]
        b_s, rest_s = self._binary_and_rest(s_logits[keep] / T, y)
        b_t, rest_t = self._binary_and_rest(t_logits[keep] / T, y)
        tckd, nckd = _kl_rows(b_t, b_s), _kl_rows(rest_t, rest_s)
        return T * T * (self.alpha * tckd + self.beta * nckd).mean()


__all__ = ["LOSSES", "LossTerm", "DistillLoss", "build_loss", "attention_map"]


class LossTerm(Entry):
    """One weighted term of a distillation objective: ``{name: hinton_kl, weight: 0.9, temperature: 4}``."""

    entry_kind: ClassVar[str] = "loss"
    entry_registry: ClassVar[Registry] = LOSSES

    weight: float = Field(1.0, ge=0, allow_inf_nan=False)
