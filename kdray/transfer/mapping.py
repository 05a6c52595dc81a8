"""Cross-network knowledge transfer: map a source network's weights onto a target network.

Four ways to reuse what a source network learned (design §3, seed 000):

* **initialisation** ``W_target = W_source``, also across architectures: ``mapping`` rules pair
  target tensors with source tensors by name, by shape in order, or by explicit glob pairs, with
  adapters for the classic mismatches (a new classifier head, different input channels, a
  narrower layer by slicing);
* **layer-wise sharing** ``W_l,target = W_l,source`` for l in L: ``layers`` rules select target
  modules by path glob and ``copy`` (require transfer), ``freeze``, ``reinit`` or ``lr_scale`` them;
* **parameter sharing** ``W_shared = W_source ∩ W_target``: :func:`tie_modules` ties the shared
  modules of two networks trained jointly (one tensor, two heads; the ``share`` stage);
* **L2-SP** (:class:`L2SP`): fine-tuning regularised toward the source weights.

The user-facing block of a ``kind: transfer`` stage::

    transfer:
      mapping:                     # ordered; the first rule that claims a target tensor wins
        - {match: name}            # same key, same shape -> copy
        - {match: shape}           # the rest paired in order by identical shape
        - {match: explicit, pairs: {"classifier.*": "head.*"}, op: slice}
      layers:                      # module-path globs on the TARGET; first matching rule wins
        - {select: "features.0.*", action: freeze}
        - {select: "features.*", action: lr_scale, lr_scale: 0.1}
      batchnorm: train             # train | eval | frozen
      strict: false
      l2sp: {alpha: 0.01, beta: 0.0001}

Use from a training loop::

    spec = TransferSpec.model_validate(stage_block)
    plan = plan_transfer(source_state, model, spec, source_arch="cnn_small", target_arch="cnn_small")
    report = apply_transfer(model, source_state, plan)      # report.to_table() goes to the log
    groups = apply_layer_rules(model, spec)                 # optimizer param groups with lr_scale
    l2sp = L2SP(model, source_state, plan) if spec.l2sp else None
    for epoch in ...:
        model.train(); apply_batchnorm_rules(model, spec)   # after every model.train()
        loss = task_loss + (l2sp(model) if l2sp else 0)

Batch-norm running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``) are
never matched on their own: they follow their layer's ``weight`` (or ``running_mean`` when the
layer has no affine weight), so a layer's statistics always come from the same source layer as
its scale and shift.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kdray.core.errors import KdrayError
from kdray.core.registry import Registry, did_you_mean
from kdray.models.hooks import unwrap

Op = Literal["copy", "slice", "repeat_channels", "reinit", "skip"]
Status = Literal["copied", "adapted", "reinitialised", "kept"]

# A match strategy pairs still-unclaimed target tensors with source tensors (``{match: <name>}``).
# It is registered with the ops it takes and whether it reads ``pairs``; see ``match_name`` below.
MATCH_STRATEGIES: Registry = Registry("transfer strategy", group="kdray.transfer_strategies")

# --------------------------------------------------------------------------- spec


class MappingRule(BaseModel):
    """One mapping rule: which source tensor initialises which target tensor, and how.

    * ``{match: name, op: copy|slice|repeat_channels}``: a target tensor takes the source tensor
      with the same key when ``op`` can produce the target's shape from it (``copy``, the default:
      equal shapes). Tensors it cannot adapt are left for later rules.
    * ``{match: shape}``: each remaining target tensor takes the next unused source tensor of
      identical shape, in state-dict order (normalisation-layer weights pair only with each other).
    * ``{match: explicit, pairs: {target_glob: source_glob}, op: ...}``: ``*`` in the target glob
      captures text that fills the ``*`` of the source glob in order (``"classifier.*": "head.*"``
      maps ``classifier.weight`` to ``head.weight``). With ``op: reinit`` or ``op: skip`` the source
      side is ``null``. A shape that ``op`` cannot adapt is an error naming both tensors.
    """

    model_config = ConfigDict(extra="forbid")

    match: str
    pairs: dict[str, str | None] | None = None
    op: Op | None = None

    @field_validator("match")
    @classmethod
    def _strategy(cls, v: str) -> str:
        if v not in MATCH_STRATEGIES:
            raise ValueError(f"unknown match strategy {v!r}; {did_you_mean(v, MATCH_STRATEGIES.names())}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "MappingRule":
        meta = MATCH_STRATEGIES.meta(self.match)
        if not meta.get("pairs"):
            if self.pairs is not None:
                raise ValueError(
                    f"'pairs' belongs to {{match: explicit}} rules, not {{match: {self.match}}}; "
                    "move the pairs into a rule with match: explicit"
                )
            allowed = meta.get("ops", ("copy",))
            if self.op is not None and self.op not in allowed:
                raise ValueError(
                    f"{{match: {self.match}}} takes op {' or '.join(allowed)}, not {self.op!r}; "
                    "use {match: explicit, pairs: {...}, op: " + self.op + "} to name the tensors"
                )
            return self
        if not self.pairs:
            raise ValueError(
                '{match: explicit} needs pairs, e.g. pairs: {"classifier.*": "head.*"} (target glob -> source glob)'
            )
        op = self.op or "copy"
        for tgt, src in self.pairs.items():
            if any(c in tgt + (src or "") for c in "?[]"):
                raise ValueError(f"explicit pair {tgt!r}: {src!r} may use only '*' as a wildcard")
            if op in ("reinit", "skip"):
                if src is not None:
                    raise ValueError(
                        f"op {op!r} takes no source tensor: write {tgt!r}: null instead of {tgt!r}: {src!r}"
                    )
            elif src is None:
                raise ValueError(f"explicit pair {tgt!r} has no source glob; give one, or use op: reinit / op: skip")
            elif tgt.count("*") != src.count("*"):
                raise ValueError(
                    f"explicit pair {tgt!r}: {src!r} has {tgt.count('*')} '*' on the target side but "
                    f"{src.count('*')} on the source side; each '*' of the target fills one of the source"
                )
        return self

    @property
    def resolved_op(self) -> str:
        return self.op or "copy"


class LayerRule(BaseModel):
    """``{select: <module-path glob on the target>, action: copy|freeze|reinit|lr_scale}``.

    ``copy`` requires that every selected tensor was transferred (an error otherwise); ``freeze``
    sets ``requires_grad=False`` and keeps the layer's batch-norm statistics fixed; ``reinit``
    keeps the target's fresh initialisation even where a mapping rule would transfer; ``lr_scale``
    multiplies the learning rate of the selected parameters by ``lr_scale``.
    """

    model_config = ConfigDict(extra="forbid")

    select: str = Field(min_length=1)
    action: Literal["copy", "freeze", "reinit", "lr_scale"]
    lr_scale: float | None = None

    @model_validator(mode="after")
    def _check(self) -> "LayerRule":
        if self.action == "lr_scale":
            if self.lr_scale is None:
                raise ValueError(
                    f"layer rule {self.select!r} has action lr_scale but no lr_scale value, "
                    "e.g. {select: 'features.*', action: lr_scale, lr_scale: 0.1}"
                )
            if self.lr_scale <= 0:
                raise ValueError(
                    f"lr_scale must be > 0 (got {self.lr_scale}); use action: freeze to stop training a layer"
                )
        elif self.lr_scale is not None:
            raise ValueError(f"lr_scale is only read with action: lr_scale, not action: {self.action}; remove it")
        return self


class L2SPSpec(BaseModel):
    """``α·Σ‖w − w_source‖²`` over transferred weights plus ``β·Σ‖w‖²`` over new ones."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(ge=0)
    beta: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "L2SPSpec":
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("l2sp with alpha = beta = 0 does nothing; remove the l2sp block or set alpha > 0")
        return self


class TransferSpec(BaseModel):
    """The ``transfer:`` block of a transfer stage (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    mapping: list[MappingRule] = Field(default_factory=lambda: [MappingRule(match="name")])
    layers: list[LayerRule] = Field(default_factory=list)
    batchnorm: Literal["train", "eval", "frozen"] = "train"
    strict: bool = False
    l2sp: L2SPSpec | None = None

    @field_validator("mapping")
    @classmethod
    def _mapping(cls, v: list[MappingRule]) -> list[MappingRule]:
        if not v:
            raise ValueError("mapping needs at least one rule, e.g. [{match: name}]; with none, nothing is transferred")
        return v


# --------------------------------------------------------------------------- small helpers

_STAT_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def shape_str(shape: Sequence[int]) -> str:
    """``(512, 784)`` -> ``"512x784"``; a scalar is ``"scalar"``."""
    return "x".join(str(s) for s in shape) if len(shape) else "scalar"


def _strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict saved from a DDP-wrapped model has every key prefixed with ``module.``."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _close(pattern: str, names: Iterable[str], n: int = 5) -> list[str]:
    """Names that look like ``pattern`` (a glob or key); falls back to names sharing its first part."""
    names = list(dict.fromkeys(names))
    plain = pattern.replace("*", "").strip(".")
    hits = difflib.get_close_matches(plain, names, n=n, cutoff=0.4)
    head = plain.split(".")[0]
    hits += [c for c in names if c not in hits and head and c.startswith(head)]
    return hits[:n] or names[:n]


def _list(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names) if names else "(none)"


def _glob_regex(glob: str) -> re.Pattern[str]:
    """``"features.*.weight"`` -> a regex whose groups capture each ``*``."""
    return re.compile("^" + "(.*)".join(re.escape(part) for part in glob.split("*")) + "$")


def _fill(glob: str, captures: Sequence[str]) -> str:
    parts = glob.split("*")
    return "".join(p + (captures[i] if i < len(captures) else "") for i, p in enumerate(parts))


def _anchors_of(keys: Iterable[str]) -> dict[str, str]:
    """Map each running-statistics key to the key it follows (its layer's ``weight``).

    A layer without an affine ``weight`` is anchored on its ``running_mean``.
    """
    keys = set(keys)
    follows: dict[str, str] = {}
    for k in keys:
        module, _, leaf = k.rpartition(".")
        if leaf not in _STAT_SUFFIXES:
            continue
        prefix = f"{module}." if module else ""
        anchor = prefix + "weight" if prefix + "weight" in keys else prefix + "running_mean"
        if anchor != k:
            follows[k] = anchor
    return follows


def _is_norm_affine(key: str, keys: set[str]) -> bool:
    """Whether ``key`` is the weight/bias of a layer that keeps running statistics."""
    module, _, leaf = key.rpartition(".")
    prefix = f"{module}." if module else ""
    return leaf in ("weight", "bias") and prefix + "running_mean" in keys


def _candidates(key: str) -> list[str]:
    """A tensor key and every module path above it: ``a.b.w`` -> ``["a", "a.b", "a.b.w"]``."""
    parts = key.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


# --------------------------------------------------------------------------- adapters


def uniform_indices(n_source: int, n_target: int) -> torch.Tensor:
    """``n_target`` indices spread evenly over ``range(n_source)``: ``i * n_source // n_target``.

    512 -> 256 takes every other index (0, 2, ..., 510). The same formula on both sides of a
    hidden layer picks the same units as rows of layer l and columns of layer l+1, so a network
    sliced this way keeps a consistent sub-network of the source. When the source width is an
    integer multiple k of the target's, packed blocks (GRU gates ``[3H, .]``, attention
    ``in_proj [3D, D]``) stay aligned too: block g unit j of the target is block g unit j·k of the source.
    """
    return torch.arange(n_target) * n_source // n_target


def cannot_adapt(op: str, source_shape: Sequence[int], target_shape: Sequence[int]) -> str | None:
    """Why ``op`` cannot turn a source tensor of ``source_shape`` into ``target_shape`` (None: it can)."""
    s, t = tuple(source_shape), tuple(target_shape)
    if s == t:
        return None
    if op == "copy":
        return "copy needs equal shapes"
    if len(s) != len(t):
        return f"{op} needs tensors with the same number of dimensions ({len(s)} vs {len(t)})"
    if op == "slice":
        bigger = [f"dim {d}: target {t[d]} > source {s[d]}" for d in range(len(t)) if t[d] > s[d]]
        return (
            f"slice needs the target no larger than the source on every dim ({'; '.join(bigger)})" if bigger else None
        )
    if op == "repeat_channels":
        other = [d for d in range(len(t)) if d != 1 and t[d] != s[d]]
        if len(t) < 2 or other:
            return (
                "repeat_channels changes only dim 1 (input channels) of a weight [out, in, ...]; "
                f"dims {other} differ too"
            )
        return None
    return f"op {op!r} does not adapt shapes"


def adapt_tensor(op: str, source: torch.Tensor, target_shape: Sequence[int]) -> tuple[torch.Tensor, str | None]:
    """Produce a tensor of ``target_shape`` from ``source``; returns it and how (None: a plain copy).

    * ``slice``: along every dim where the target is smaller, keep :func:`uniform_indices`.
      A Linear 512->256 (weight 512x784 -> 256x784) keeps rows 0, 2, ..., 510.
    * ``repeat_channels``: a conv weight ``[O, C_src, kh, kw]`` becomes ``[O, C_tgt, kh, kw]`` by
      averaging over the source input channels, repeating the mean ``C_tgt`` times and scaling by
      ``C_src / C_tgt``: ``w_tgt[:, j] = (1 / C_tgt) · Σ_c w_src[:, c]``. For an input whose
      channels are all equal (a grey image fed as RGB, or RGB as grey) the target layer then gives
      exactly the source layer's output, so activations keep their scale (3 -> 1 sums the RGB
      filters; 1 -> 3 splits the grey filter in thirds).
    """
    s, t = tuple(source.shape), tuple(target_shape)
    reason = cannot_adapt(op, s, t)
    if reason is not None:
        raise ValueError(reason)
    if s == t:
        return source, None
    if op == "slice":
        out = source
        for d in range(len(t)):
            if t[d] < s[d]:
                out = out.index_select(d, uniform_indices(s[d], t[d]).to(out.device))
        return out, f"slice {shape_str(s)} -> {shape_str(t)}"
    if op == "repeat_channels":
        c_src, c_tgt = s[1], t[1]
        mean = source.mean(dim=1, keepdim=True) * (c_src / c_tgt)
        out = mean.expand(*t[:1], c_tgt, *t[2:]).contiguous()
        return out, f"repeat_channels {c_src}->{c_tgt}"
    raise ValueError(f"op {op!r} does not adapt shapes")


# --------------------------------------------------------------------------- plan and report


@dataclass
class Entry:
    """What happens to one target tensor. ``how`` says how it was adapted, ``reason`` why it was not transferred."""

    key: str
    shape: tuple[int, ...]
    status: Status
    source: str | None = None
    source_shape: tuple[int, ...] | None = None
    op: str | None = None
    how: str | None = None
    reason: str | None = None
    rule: str | None = None
    frozen: bool = False
    lr_scale: float | None = None
    reset: bool = False  # re-run the owning module's reset_parameters() (a reinit rule asked for it)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["source_shape"] = list(self.source_shape) if self.source_shape is not None else None
        return d


@dataclass
class TransferReport:
    """Every target tensor exactly once (state-dict order), plus the source tensors left unused."""

    entries: list[Entry]
    unused_source: list[tuple[str, tuple[int, ...]]]
    source_arch: str | None = None
    target_arch: str | None = None
    batchnorm: str = "train"
    notes: list[str] = field(default_factory=list)
    spec: TransferSpec | None = None  # the block the plan was made from (L2-SP reads it)

    def copy(self) -> "TransferReport":
        return TransferReport(
            [Entry(**asdict(e)) for e in self.entries],
            list(self.unused_source),
            self.source_arch,
            self.target_arch,
            self.batchnorm,
            list(self.notes),
            self.spec,
        )

    def summary(self) -> dict[str, int]:
        counts = {s: sum(e.status == s for e in self.entries) for s in ("copied", "adapted", "reinitialised", "kept")}
        counts["frozen"] = sum(e.frozen for e in self.entries)
        counts["lr_scaled"] = sum(e.lr_scale is not None for e in self.entries)
        counts["unused_source"] = len(self.unused_source)
        return counts

    def by_key(self) -> dict[str, Entry]:
        return {e.key: e for e in self.entries}

    def to_json(self) -> dict[str, Any]:
        return {
            "source_arch": self.source_arch,
            "target_arch": self.target_arch,
            "batchnorm": self.batchnorm,
            "summary": self.summary(),
            "tensors": [e.to_json() for e in self.entries],
            "unused_source": [{"key": k, "shape": list(s)} for k, s in self.unused_source],
            "notes": list(self.notes),
        }

    def to_table(self) -> str:
        """A fixed-width table for the log: one line per target tensor, then unused source tensors."""
        rows = [("target tensor", "shape", "status", "from / how / why", "training")]
        for e in self.entries:
            if e.status == "copied":
                detail = f"<- {e.source}"
            elif e.status == "adapted":
                detail = f"<- {e.source}: {e.how}"
            else:
                detail = e.reason or ""
            train = "frozen" if e.frozen else (f"lr x{e.lr_scale:g}" if e.lr_scale is not None else "")
            rows.append((e.key, shape_str(e.shape), e.status, detail, train))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        lines = [ln.rstrip() for ln in lines]
        lines.insert(1, "-" * max(len(ln) for ln in lines))
        arch = f"{self.source_arch or '?'} -> {self.target_arch or '?'}"
        s = self.summary()
        lines.insert(
            0,
            f"transfer {arch}: {s['copied']} copied, {s['adapted']} adapted, "
            f"{s['reinitialised']} reinitialised, {s['kept']} kept; {s['frozen']} frozen, "
            f"{s['lr_scaled']} lr-scaled; batchnorm {self.batchnorm}",
        )
        if self.unused_source:
            lines.append(
                f"unused source tensors ({len(self.unused_source)}): "
                + ", ".join(f"{k} {shape_str(sh)}" for k, sh in self.unused_source)
            )
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def layer_actions(model: nn.Module, spec: TransferSpec) -> dict[str, tuple[int, LayerRule]]:
    """For each target state-dict key, the first layer rule that selects it (``(index, rule)``).

    A rule selects a tensor when its glob matches the tensor's key or any module path above it,
    so ``features.0``, ``features.0.*`` and ``features.0.0.weight`` all select
    ``features.0.0.weight``. A rule that selects nothing is an error listing close module paths.
    """
    model = unwrap(model)
    keys = list(model.state_dict().keys())
    modules = [name for name, _ in model.named_modules() if name]
    out: dict[str, tuple[int, LayerRule]] = {}
    for i, rule in enumerate(spec.layers):
        hit = [k for k in keys if any(fnmatch.fnmatchcase(c, rule.select) for c in _candidates(k))]
        if not hit:
            raise KdrayError(
                f"select {rule.select!r} matches no module or tensor of the target; close module paths: "
                f"{_list(_close(rule.select, modules))}.",
                where=f"transfer.layers[{i}]",
                hint="Globs are matched against module paths such as 'features.0' (see model.named_modules()).",
            )
        for k in hit:
            out.setdefault(k, (i, rule))
    return out


# --------------------------------------------------------------------------- match strategies


@dataclass
class PlanState:
    """What a match strategy reads and extends while a transfer is planned."""

    tgt: dict[str, tuple[int, ...]]  # target key -> shape
    src: dict[str, tuple[int, ...]]  # source key -> shape
    t_anchor: list[str]  # target keys a rule may claim (statistics follow their layer)
    s_anchor: list[str]
    t_follow: dict[str, str]  # target statistic -> the key it follows
    s_follow: dict[str, str]
    t_keys: set[str]
    s_keys: set[str]
    claims: dict[str, Entry] = field(default_factory=dict)
    near_miss: dict[str, str] = field(default_factory=dict)  # target key -> why a same-named source was not used

    def claim(
        self,
        key: str,
        status: Status,
        rule: str | None,
        *,
        source_key: str | None = None,
        op: str | None = None,
        how: str | None = None,
        reason: str | None = None,
        reset: bool = False,
    ) -> None:
        self.claims[key] = Entry(
            key,
            self.tgt[key],
            status,
            source_key,
            self.src.get(source_key) if source_key else None,
            op,
            how,
            reason,
            rule,
            reset=reset,
        )

    def claim_transfer(self, key: str, source_key: str, op: str, rule: str) -> None:
        how = None
        if self.src[source_key] != self.tgt[key]:
            how = adapt_description(op, self.src[source_key], self.tgt[key])
        self.claim(key, "adapted" if how else "copied", rule, source_key=source_key, op=op, how=how)


@MATCH_STRATEGIES.register("name", ops=("copy", "slice", "repeat_channels"))
def match_name(state: PlanState, rule: MappingRule, i: int) -> None:
    """A target tensor takes the same-named source tensor when ``op`` can produce its shape."""
    src, tgt = state.src, state.tgt
    open_keys = [k for k in state.t_anchor if k not in state.claims]
    common = [k for k in open_keys if k in src and k not in state.s_follow]
    if open_keys and not common:
        raise KdrayError(
            f"{{match: name}} finds no target tensor name in the source: target names look like "
            f"{_list(state.t_anchor[:3])}, source names like {_list(state.s_anchor[:3])}.",
            where=f"transfer.mapping[{i}]",
            hint="Pair them with {match: shape} (in order, by identical shape) or explicit pairs.",
        )
    for k in common:
        why = cannot_adapt(rule.resolved_op, src[k], tgt[k])
        if why is None:
            state.claim_transfer(k, k, rule.resolved_op, f"mapping[{i}] name")
        else:
            state.near_miss[k] = f"same-named source tensor is {shape_str(src[k])}, target {shape_str(tgt[k])}: {why}"


@MATCH_STRATEGIES.register("shape", ops=("copy",))
def match_shape(state: PlanState, rule: MappingRule, i: int) -> None:
    """Each open target tensor takes the next unused source tensor of identical shape, in order."""
    used = {e.source for e in state.claims.values() if e.source}
    queues: dict[tuple, deque[str]] = defaultdict(deque)
    for k in state.s_anchor:
        if k not in used:
            queues[(_is_norm_affine(k, state.s_keys), state.src[k])].append(k)
    for k in state.t_anchor:
        q = queues.get((_is_norm_affine(k, state.t_keys), state.tgt[k]))
        if k not in state.claims and q:
            state.claim_transfer(k, q.popleft(), "copy", f"mapping[{i}] shape")


@MATCH_STRATEGIES.register("explicit", ops=("copy", "slice", "repeat_channels", "reinit", "skip"), pairs=True)
def match_explicit(state: PlanState, rule: MappingRule, i: int) -> None:
    """``pairs: {target_glob: source_glob}``; each ``*`` of the target glob fills one of the source glob."""
    src, tgt, where, op = state.src, state.tgt, f"transfer.mapping[{i}]", rule.resolved_op
    for tglob, sglob in (rule.pairs or {}).items():
        rx = _glob_regex(tglob)
        hits = [(k, m.groups()) for k in state.t_anchor if (m := rx.match(k))]
        if not hits:
            follower_hint = (
                " Running statistics are not mapped on their own: they follow their layer's weight."
                if any(rx.match(k) for k in state.t_follow)
                else ""
            )
            raise KdrayError(
                f"explicit target glob {tglob!r} matches no target tensor; close target names: "
                f"{_list(_close(tglob, state.t_anchor))}.{follower_hint}",
                where=where,
                hint=f"Close source names: {_list(_close(sglob or tglob, state.s_anchor))}.",
            )
        for k, groups in hits:
            if k in state.claims:
                continue
            if op == "reinit":
                state.claim(k, "reinitialised", f"mapping[{i}] explicit", reason=f"rule reinit ({tglob!r})", reset=True)
                continue
            if op == "skip":
                state.claim(k, "kept", f"mapping[{i}] explicit", reason=f"rule skip ({tglob!r}): target value kept")
                continue
            sk = _fill(sglob or "", groups)
            if sk not in src or sk in state.s_follow:
                raise KdrayError(
                    f"target {k!r} ({shape_str(tgt[k])}) maps to source {sk!r} through {tglob!r}: {sglob!r}, "
                    f"but the source has no tensor {sk!r}; close source names: {_list(_close(sk, state.s_anchor))}.",
                    where=where,
                    hint="Fix the source glob so that it names existing source tensors.",
                )
            why = cannot_adapt(op, src[sk], tgt[k])
            if why is not None:
                raise KdrayError(
                    f"target {k!r} has shape {shape_str(tgt[k])} but source {sk!r} has shape "
                    f"{shape_str(src[sk])}; {why}.",
                    where=where,
                    hint="Use op: slice (target no larger on any dim), op: repeat_channels (conv input "
                    "channels), or op: reinit to keep the target's fresh initialisation.",
                )
            state.claim_transfer(k, sk, op, f"mapping[{i}] explicit")


def plan_transfer(
    source_state: Mapping[str, torch.Tensor],
    target: nn.Module,
    spec: TransferSpec,
    *,
    source_arch: str | None = None,
    target_arch: str | None = None,
) -> TransferReport:
    """Decide, for every tensor of ``target``, where its initial value comes from.

    Args:
        source_state: the source network's state dict (keys prefixed ``module.`` are stripped).
        target: the freshly built target network (may be DDP-wrapped).
        spec: the validated ``transfer:`` block.
        source_arch, target_arch: registered model names; when both are given and differ, a
            name-only mapping that leaves non-classifier tensors unmapped is an error.

    Returns:
        A :class:`TransferReport` whose entries list every target state-dict key once, in order.

    Raises:
        KdrayError: a rule or glob that matches nothing, a shape an op cannot adapt, a source key
            that does not exist, ``strict`` with unmapped tensors, or an architecture change
            mapped by name alone. Each message names the target and source keys and shapes.
    """
    model = unwrap(target)
    source = _strip_module_prefix(source_state)
    tgt = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    src = {k: tuple(v.shape) for k, v in source.items()}
    t_follow, s_follow = _anchors_of(tgt), _anchors_of(src)
    t_anchor = [k for k in tgt if k not in t_follow]
    s_anchor = [k for k in src if k not in s_follow]
    t_keys, s_keys = set(tgt), set(src)
    classifier = getattr(model, "classifier_name", "classifier")
    actions = layer_actions(model, spec)

    state = PlanState(tgt, src, t_anchor, s_anchor, t_follow, s_follow, t_keys, s_keys)
    claims, near_miss, claim, claim_transfer = state.claims, state.near_miss, state.claim, state.claim_transfer

    # Layer reinit comes first: it overrides any mapping rule.
    for k in t_anchor:
        if k in actions and actions[k][1].action == "reinit":
            i, r = actions[k]
            claim(k, "reinitialised", f"layers[{i}]", reason=f"layer rule reinit ({r.select!r})", reset=True)

    for i, rule in enumerate(spec.mapping):
        MATCH_STRATEGIES.get(rule.match)(state, rule, i)

    unmapped = [k for k in t_anchor if k not in claims]

    if source_arch and target_arch and source_arch != target_arch and all(r.match == "name" for r in spec.mapping):
        body = [k for k in unmapped if not k.startswith(classifier + ".")]
        if body:
            shown = "; ".join(_describe_unmapped(k, tgt, src, near_miss) for k in body[:6])
            more = f" and {len(body) - 6} more" if len(body) > 6 else ""
            raise KdrayError(
                f"the source is {source_arch!r} and the target {target_arch!r}, and transfer.mapping matches only "
                f"by name, but {len(body)} of {len(t_anchor)} target tensors find no same-named source tensor "
                f"that fits ({shown}{more}).",
                where="transfer.mapping",
                hint="Add {match: shape} after {match: name} to pair the rest by shape in order, or explicit "
                "pairs with op: slice / repeat_channels; the report lists what each rule paired.",
            )

    if spec.strict and unmapped:
        shown = "; ".join(_describe_unmapped(k, tgt, src, near_miss) for k in unmapped)
        raise KdrayError(
            f"strict is true but {len(unmapped)} target tensors are not mapped: {shown}.",
            where="transfer.strict",
            hint="Map them with a rule, mark them with {match: explicit, pairs: {'<glob>': null}, op: reinit}, "
            "or set strict: false to keep their fresh initialisation.",
        )

    for k in unmapped:
        claim(k, "reinitialised", None, reason=_why_new(k, tgt, src, near_miss, classifier))

    # Running statistics follow their layer's anchor (same source layer, same op).
    for k, anchor in t_follow.items():
        a = claims[anchor]
        leaf = k.rpartition(".")[2]
        if a.status in ("copied", "adapted"):
            s_module = (a.source or "").rpartition(".")[0]
            sk = f"{s_module}.{leaf}" if s_module else leaf
            op = a.op if a.op in ("copy", "slice") else "copy"
            if sk not in src:
                claim(k, "reinitialised", f"follows {anchor}", reason=f"source layer {s_module!r} has no {leaf}")
            elif cannot_adapt(op, src[sk], tgt[k]) is not None:
                claim(
                    k,
                    "reinitialised",
                    f"follows {anchor}",
                    reason=f"source {sk!r} is {shape_str(src[sk])}, target {shape_str(tgt[k])}",
                )
            else:
                claim_transfer(k, sk, op, f"follows {anchor}")
        else:
            claim(k, a.status, f"follows {anchor}", reason=f"follows {anchor} ({a.status})", reset=a.reset)

    # Layer flags, and the ``copy`` layer action's promise that the tensors were transferred.
    bad_copy: dict[int, list[str]] = defaultdict(list)
    for k, e in claims.items():
        if k not in actions:
            continue
        i, r = actions[k]
        if r.action == "freeze":
            e.frozen = True
        elif r.action == "lr_scale":
            e.lr_scale = r.lr_scale
        elif r.action == "copy" and e.status not in ("copied", "adapted"):
            bad_copy[i].append(f"{k} {shape_str(e.shape)} ({e.reason})")
    if bad_copy:
        i, items = next(iter(bad_copy.items()))
        raise KdrayError(
            f"layer rule {{select: {spec.layers[i].select!r}, action: copy}} selects target tensors that receive "
            f"no source weights: {'; '.join(items)}.",
            where=f"transfer.layers[{i}]",
            hint="Add a mapping rule that covers them (by name, shape or explicit pairs), or change the action.",
        )
    if spec.batchnorm == "frozen":
        for k, e in claims.items():
            if _is_norm_affine(k, t_keys):
                e.frozen = True

    notes = []
    frozen_new = [k for k, e in claims.items() if e.frozen and e.status == "reinitialised" and k in actions]
    if frozen_new:
        notes.append(
            f"{len(frozen_new)} frozen tensors were not transferred and stay at their random "
            f"initialisation: {', '.join(frozen_new[:5])}{' ...' if len(frozen_new) > 5 else ''}"
        )

    used = {e.source for e in claims.values() if e.source and e.status in ("copied", "adapted")}
    unused = [(k, src[k]) for k in src if k not in used]
    entries = [claims[k] for k in tgt]
    return TransferReport(entries, unused, source_arch, target_arch, spec.batchnorm, notes, spec)


def adapt_description(op: str, source_shape: Sequence[int], target_shape: Sequence[int]) -> str:
    """The ``how`` text of an adapted tensor, without computing it."""
    if op == "repeat_channels":
        return f"repeat_channels {source_shape[1]}->{target_shape[1]}"
    return f"{op} {shape_str(source_shape)} -> {shape_str(target_shape)}"


def _describe_unmapped(k: str, tgt: dict, src: dict, near_miss: dict[str, str]) -> str:
    if k in near_miss:
        return f"{k} {shape_str(tgt[k])} ({near_miss[k]})"
    if k in src:
        return f"{k} {shape_str(tgt[k])} (source has {shape_str(src[k])})"
    return f"{k} {shape_str(tgt[k])} (not in source)"


def _why_new(k: str, tgt: dict, src: dict, near_miss: dict[str, str], classifier: str) -> str:
    """The reason text of a target tensor that no rule mapped."""
    if (
        k.startswith(classifier + ".")
        and k in src
        and len(src[k]) == len(tgt[k])
        and src[k][0] != tgt[k][0]
        and src[k][1:] == tgt[k][1:]
    ):
        return f"new classifier head: {src[k][0]} -> {tgt[k][0]} classes"
    if k in near_miss:
        return near_miss[k]
    if k in src:
        return f"same-named source tensor is {shape_str(src[k])}, target {shape_str(tgt[k])}; no rule adapts it"
    return "no source match"


def apply_transfer(target: nn.Module, source_state: Mapping[str, torch.Tensor], plan: TransferReport) -> TransferReport:
    """Carry out ``plan`` on ``target`` in place and return the report.

    Tensors re-initialised by a ``reinit`` rule get their owning module's ``reset_parameters()``
    (other tensors of that module are restored afterwards); copied tensors are bit-equal to the
    source; adapted ones are computed by :func:`adapt_tensor`.
    """
    model = unwrap(target)
    source = _strip_module_prefix(source_state)
    state = model.state_dict(keep_vars=True)
    planned = {e.key: e.shape for e in plan.entries}
    actual = {k: tuple(v.shape) for k, v in state.items()}
    if planned != actual:
        diff = sorted(set(planned.items()) ^ set(actual.items()))[:6]
        raise KdrayError(
            f"the transfer plan was made for a different target model; differing (key, shape): {diff}.",
            hint="Call plan_transfer on the same model you pass to apply_transfer.",
        )
    report = plan.copy()
    by_key = report.by_key()

    with torch.no_grad():
        reset = defaultdict(list)
        for e in report.entries:
            if e.reset:
                reset[e.key.rpartition(".")[0]].append(e.key)
        for path, keys in reset.items():
            module = model.get_submodule(path) if path else model
            if not hasattr(module, "reset_parameters"):
                for k in keys:
                    by_key[k].reason = (
                        by_key[k].reason or ""
                    ) + f"; module {path or '<root>'!r} has no reset_parameters(), target value kept"
                continue
            prefix = f"{path}." if path else ""
            others = {
                k: v.detach().clone()
                for k, v in state.items()
                if k.startswith(prefix) and "." not in k[len(prefix) :] and k not in keys
            }
            module.reset_parameters()  # type: ignore[operator]  # torch: Module.__getattr__
            for k, v in others.items():
                state[k].copy_(v)

        for e in report.entries:
            if e.status in ("copied", "adapted"):
                state[e.key].copy_(source_value(e, source))
    return report


def source_value(entry: Entry, source_state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The value ``entry``'s target tensor takes from ``source_state`` (copied or adapted)."""
    assert entry.source is not None, f"{entry.key} takes no source tensor"
    src = source_state[entry.source]
    if tuple(src.shape) != entry.shape:
        src, _ = adapt_tensor(entry.op or "copy", src, entry.shape)
    return src


# --------------------------------------------------------------------------- layer rules and batch norm


def apply_layer_rules(target: nn.Module, spec: TransferSpec) -> list[dict[str, Any]]:
    """Freeze what the ``layers`` rules (and ``batchnorm: frozen``) freeze; return optimizer param groups.

    Frozen parameters get ``requires_grad=False`` and are left out of the groups (as are parameters
    that were already frozen). Returns ``[{"params": [...], "names": [...], "lr_scale": s}, ...]``,
    one group per distinct scale, scale 1.0 for parameters no ``lr_scale`` rule selects; the loop
    sets each group's ``lr = base_lr * lr_scale`` (and keeps the ratio under its scheduler).
    Call before wrapping the model in DDP, which needs to know which parameters train.
    """
    model = unwrap(target)
    actions = layer_actions(model, spec)
    keys = set(model.state_dict().keys())
    groups: dict[float, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        action = actions.get(name, (None, None))[1]
        if (action is not None and action.action == "freeze") or (
            spec.batchnorm == "frozen" and _is_norm_affine(name, keys)
        ):
            p.requires_grad_(False)
            continue
        if not p.requires_grad:
            continue
        scale = float(action.lr_scale or 1.0) if action is not None and action.action == "lr_scale" else 1.0
        g = groups.setdefault(scale, {"params": [], "names": [], "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def _bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_batchnorm_mode(model: nn.Module, mode: str, select_globs: Sequence[str] | None = None) -> list[str]:
    """Put batch-norm layers in ``mode``; call it after every ``model.train()``, which undoes it.

    * ``train``: leave them as ``model.train()/eval()`` set them;
    * ``eval``: normalise with the running statistics and stop updating them (affine still trains);
    * ``frozen``: ``eval`` plus ``requires_grad=False`` on the affine weight and bias.

    ``select_globs`` limits the change to layers whose path (or a path above it) matches a glob;
    None selects every batch-norm layer. Returns the module paths changed.
    """
    if mode not in ("train", "eval", "frozen"):
        raise KdrayError(f"batchnorm mode {mode!r} is not one of train, eval, frozen.", where="transfer.batchnorm")
    if mode == "train":
        return []
    done = []
    for name, m in _bn_modules(unwrap(model)):
        if select_globs is not None and not any(
            fnmatch.fnmatchcase(c, g) for g in select_globs for c in _candidates(name)
        ):
            continue
        m.eval()
        if mode == "frozen":
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
        done.append(name)
    return done


def apply_batchnorm_rules(model: nn.Module, spec: TransferSpec) -> list[str]:
    """Apply ``spec.batchnorm`` to every batch-norm layer, and ``eval`` to those inside frozen layers.

    A frozen layer must compute the same function throughout training; its batch-norm layers would
    otherwise keep updating their running statistics. Returns the module paths set to eval/frozen.
    """
    inner = unwrap(model)
    done = set(set_batchnorm_mode(inner, spec.batchnorm))
    if spec.layers:
        actions = layer_actions(inner, spec)
        frozen = []
        for n, m in _bn_modules(inner):
            rule = actions.get(f"{n}.weight" if m.affine else f"{n}.running_mean", (None, None))[1]
            if rule is not None and rule.action == "freeze":
                frozen.append(n)
        if frozen:
            done |= set(set_batchnorm_mode(inner, "eval", frozen))
    return sorted(done)


# --------------------------------------------------------------------------- L2-SP


class L2SP(nn.Module):
    """L2-SP regulariser (Li, Grandvalet & Davoine, ICML 2018, "Explicit inductive bias for transfer
    learning with convolutional networks").

    ``Ω(w) = α · Σ_{i ∈ transferred} ‖w_i − w_i^src‖² + β · Σ_{j ∈ new} ‖w_j‖²``

    ``w_i^src`` is the value the plan gave the parameter (the source tensor, adapted to the target
    shape where needed), so Ω is 0 from transferred weights right after :func:`apply_transfer`.
    "Transferred" is every parameter copied or adapted; "new" is every other parameter. The paper
    writes α/2 and β/2; here the ½ is folded into α and β. Buffers (running statistics) are not
    regularised. ``forward(model)`` accepts the model bare or wrapped in DDP.
    """

    def __init__(
        self,
        target: nn.Module,
        source_state: Mapping[str, torch.Tensor],
        plan: TransferReport,
        alpha: float | None = None,
        beta: float | None = None,
    ):
        super().__init__()
        l2sp = plan.spec.l2sp if plan.spec is not None else None
        if alpha is None and l2sp is None:
            raise KdrayError(
                "L2SP needs alpha and beta: set transfer.l2sp: {alpha: 0.01, beta: 0.0001} or pass them.",
                where="transfer.l2sp",
            )
        self.alpha = float(alpha if alpha is not None else l2sp.alpha)  # type: ignore[union-attr]  # checked above
        self.beta = float(beta if beta is not None else (l2sp.beta if l2sp else 0.0))
        source = _strip_module_prefix(source_state)
        params = dict(unwrap(target).named_parameters())
        self.transferred: list[str] = []
        self.new: list[str] = []
        for e in plan.entries:
            if e.key not in params:
                continue
            if e.status in ("copied", "adapted"):
                ref = source_value(e, source).detach().to(params[e.key].device, params[e.key].dtype).clone()
                self.register_buffer(f"ref_{len(self.transferred)}", ref, persistent=False)
                self.transferred.append(e.key)
            else:
                self.new.append(e.key)

    def forward(self, model: nn.Module) -> torch.Tensor:
        params = dict(unwrap(model).named_parameters())
        missing = [k for k in self.transferred + self.new if k not in params]
        if missing:
            raise KdrayError(
                f"L2SP was built for a model with parameters {missing[:5]} that this model lacks.",
                hint="Build L2SP from the same model (and plan) that is being trained.",
            )
        total = next(iter(params.values())).new_zeros(())
        if self.alpha:
            for i, k in enumerate(self.transferred):
                w, ref = params[k], getattr(self, f"ref_{i}")
                if w.shape != ref.shape:
                    raise KdrayError(
                        f"L2SP reference for {k!r} is {shape_str(ref.shape)} but the parameter is "
                        f"{shape_str(w.shape)}.",
                        hint="Rebuild L2SP after changing the model.",
                    )
                total = total + self.alpha * (w - ref.to(w.device, w.dtype)).pow(2).sum()
        if self.beta:
            for k in self.new:
                total = total + self.beta * params[k].pow(2).sum()
        return total


# --------------------------------------------------------------------------- parameter sharing


def tie_modules(net_a: nn.Module, net_b: nn.Module, globs: Sequence[str]) -> list[str]:
    """Make the modules of ``net_b`` selected by ``globs`` the very module objects of ``net_a``.

    ``W_shared = W_a ∩ W_b``: after tying, both networks hold one tensor per shared weight, so a
    step through either network updates what the other sees. A selected path must exist in both
    networks with the same class and the same tensor names and shapes. When a path and paths below
    it are selected, the highest one is tied. Returns the tied module paths.
    """
    a, b = unwrap(net_a), unwrap(net_b)
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    selected: list[str] = []
    for g in globs:
        hit = [p for p in mods_b if p and fnmatch.fnmatchcase(p, g)]
        if not hit:
            raise KdrayError(
                f"shared glob {g!r} matches no module of the second network; close module paths: "
                f"{_list(_close(g, [p for p in mods_b if p]))}.",
                where="shared",
            )
        selected += [p for p in hit if p not in selected]
    top = [p for p in selected if not any(p.startswith(q + ".") for q in selected if q != p)]
    for p in top:
        if p not in mods_a:
            raise KdrayError(
                f"module {p!r} of the second network has no counterpart in the first; close paths there: "
                f"{_list(_close(p, [q for q in mods_a if q]))}.",
                where="shared",
            )
        ma, mb = mods_a[p], mods_b[p]
        sa = {k: tuple(v.shape) for k, v in ma.state_dict().items()}
        sb = {k: tuple(v.shape) for k, v in mb.state_dict().items()}
        if type(ma) is not type(mb) or sa != sb:
            diff = sorted(set(sa.items()) ^ set(sb.items()))[:6]
            raise KdrayError(
                f"cannot tie {p!r}: first network has {type(ma).__name__} with "
                f"{len(sa)} tensors, second has {type(mb).__name__} with {len(sb)}; differing "
                f"(name, shape): {diff}.",
                where="shared",
                hint="Tie only modules whose tensors have the same names and shapes in both networks.",
            )
    for p in top:
        parent, _, attr = p.rpartition(".")
        setattr(b.get_submodule(parent) if parent else b, attr, mods_a[p])
    return top


__all__ = [
    "MATCH_STRATEGIES",
    "MappingRule",
    "LayerRule",
    "L2SPSpec",
    "TransferSpec",
    "Entry",
    "TransferReport",
    "plan_transfer",
    "apply_transfer",
    "adapt_tensor",
    "cannot_adapt",
    "uniform_indices",
    "layer_actions",
    "apply_layer_rules",
    "set_batchnorm_mode",
    "apply_batchnorm_rules",
    "L2SP",
    "tie_modules",
    "shape_str",
    "source_value",
]
