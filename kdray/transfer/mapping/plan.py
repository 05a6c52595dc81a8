"""Planning: decide, for every tensor of the target, where its initial value comes from."""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch
import torch.nn as nn

from kdray.core.errors import KdrayError
from kdray.models.hooks import unwrap
from kdray.transfer.mapping.adapters import cannot_adapt
from kdray.transfer.mapping.keys import anchors_of, is_norm_affine, shape_str, strip_module_prefix
from kdray.transfer.mapping.layers import layer_actions
from kdray.transfer.mapping.report import TransferReport
from kdray.transfer.mapping.specs import MATCH_STRATEGIES, LayerRule, TransferSpec
from kdray.transfer.mapping.strategies import PlanState


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
    state = _plan_state(model, strip_module_prefix(source_state))
    classifier = getattr(model, "classifier_name", "classifier")
    actions = layer_actions(model, spec)

    _claim_layer_reinit(state, actions)
    for i, rule in enumerate(spec.mapping):
        MATCH_STRATEGIES.get(rule.match)(state, rule, i)
    unmapped = [k for k in state.t_anchor if k not in state.claims]
    _check_arch_change(state, spec, unmapped, classifier, source_arch, target_arch)
    _check_strict(state, spec, unmapped)
    for k in unmapped:
        state.claim(k, "reinitialised", None, reason=_why_new(k, state.tgt, state.src, state.near_miss, classifier))
    _claim_followers(state)
    _flag_layers(state, spec, actions)
    return _report(state, spec, actions, source_arch, target_arch)


def _plan_state(model: nn.Module, source: Mapping[str, torch.Tensor]) -> PlanState:
    """Both networks' keys and shapes, with running statistics set apart to follow their layer."""
    tgt = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    src = {k: tuple(v.shape) for k, v in source.items()}
    t_follow, s_follow = anchors_of(tgt), anchors_of(src)
    t_anchor = [k for k in tgt if k not in t_follow]
    s_anchor = [k for k in src if k not in s_follow]
    return PlanState(tgt, src, t_anchor, s_anchor, t_follow, s_follow, set(tgt), set(src))


def _claim_layer_reinit(state: PlanState, actions: Mapping[str, tuple[int, LayerRule]]) -> None:
    """Layer reinit comes first: it overrides any mapping rule."""
    for k in state.t_anchor:
        if k in actions and actions[k][1].action == "reinit":
            i, r = actions[k]
            state.claim(k, "reinitialised", f"layers[{i}]", reason=f"layer rule reinit ({r.select!r})", reset=True)


def _check_arch_change(
    state: PlanState,
    spec: TransferSpec,
    unmapped: list[str],
    classifier: str,
    source_arch: str | None,
    target_arch: str | None,
) -> None:
    """Across architectures, a name-only mapping must leave at most the classifier unmapped."""
    if not (source_arch and target_arch and source_arch != target_arch):
        return
    if not all(r.match == "name" for r in spec.mapping):
        return
    body = [k for k in unmapped if not k.startswith(classifier + ".")]
    if body:
        shown = "; ".join(_describe_unmapped(k, state.tgt, state.src, state.near_miss) for k in body[:6])
        more = f" and {len(body) - 6} more" if len(body) > 6 else ""
        raise KdrayError(
            f"the source is {source_arch!r} and the target {target_arch!r}, and transfer.mapping matches only "
            f"by name, but {len(body)} of {len(state.t_anchor)} target tensors find no same-named source tensor "
            f"that fits ({shown}{more}).",
            where="transfer.mapping",
            hint="Add {match: shape} after {match: name} to pair the rest by shape in order, or explicit "
            "pairs with op: slice / repeat_channels; the report lists what each rule paired.",
        )


def _check_strict(state: PlanState, spec: TransferSpec, unmapped: list[str]) -> None:
    """``strict: true`` allows no target tensor that no rule mapped."""
    if spec.strict and unmapped:
        shown = "; ".join(_describe_unmapped(k, state.tgt, state.src, state.near_miss) for k in unmapped)
        raise KdrayError(
            f"strict is true but {len(unmapped)} target tensors are not mapped: {shown}.",
            where="transfer.strict",
            hint="Map them with a rule, mark them with {match: explicit, pairs: {'<glob>': null}, op: reinit}, "
            "or set strict: false to keep their fresh initialisation.",
        )


def _claim_followers(state: PlanState) -> None:
    """Running statistics follow their layer's anchor (same source layer, same op)."""
    src, tgt = state.src, state.tgt
    for k, anchor in state.t_follow.items():
        a = state.claims[anchor]
        leaf = k.rpartition(".")[2]
        if a.status in ("copied", "adapted"):
            s_module = (a.source or "").rpartition(".")[0]
            sk = f"{s_module}.{leaf}" if s_module else leaf
            op = a.op if a.op in ("copy", "slice") else "copy"
            if sk not in src:
                state.claim(k, "reinitialised", f"follows {anchor}", reason=f"source layer {s_module!r} has no {leaf}")
            elif cannot_adapt(op, src[sk], tgt[k]) is not None:
                state.claim(
                    k,
                    "reinitialised",
                    f"follows {anchor}",
                    reason=f"source {sk!r} is {shape_str(src[sk])}, target {shape_str(tgt[k])}",
                )
            else:
                state.claim_transfer(k, sk, op, f"follows {anchor}")
        else:
            state.claim(k, a.status, f"follows {anchor}", reason=f"follows {anchor} ({a.status})", reset=a.reset)


def _flag_layers(state: PlanState, spec: TransferSpec, actions: Mapping[str, tuple[int, LayerRule]]) -> None:
    """Layer flags, the ``copy`` layer action's promise that the tensors were transferred, and
    ``batchnorm: frozen`` on the affine weights of normalisation layers."""
    bad_copy: dict[int, list[str]] = defaultdict(list)
    for k, e in state.claims.items():
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
        for k, e in state.claims.items():
            if is_norm_affine(k, state.t_keys):
                e.frozen = True


def _report(
    state: PlanState,
    spec: TransferSpec,
    actions: Mapping[str, tuple[int, LayerRule]],
    source_arch: str | None,
    target_arch: str | None,
) -> TransferReport:
    """The report: every target tensor in state-dict order, the unused source tensors, and notes."""
    claims = state.claims
    notes = []
    frozen_new = [k for k, e in claims.items() if e.frozen and e.status == "reinitialised" and k in actions]
    if frozen_new:
        notes.append(
            f"{len(frozen_new)} frozen tensors were not transferred and stay at their random "
            f"initialisation: {', '.join(frozen_new[:5])}{' ...' if len(frozen_new) > 5 else ''}"
        )

    used = {e.source for e in claims.values() if e.source and e.status in ("copied", "adapted")}
    unused = [(k, state.src[k]) for k in state.src if k not in used]
    entries = [claims[k] for k in state.tgt]
    return TransferReport(entries, unused, source_arch, target_arch, spec.batchnorm, notes, spec)


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
