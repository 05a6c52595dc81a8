"""Planning: decide, for every tensor of the target, where its initial value comes from."""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch
import torch.nn as nn

from kdray.core.errors import KdrayError
from kdray.core.hooks import unwrap
from kdray.transfer.mapping.adapters import cannot_adapt
from kdray.transfer.mapping.keys import anchors_of, is_norm_affine, shape_str, strip_module_prefix
from kdray.transfer.mapping.layers import layer_actions
from kdray.transfer.mapping.report import TransferReport
from kdray.transfer.mapping.specs import MATCH_STRATEGIES, TransferSpec
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
    source = strip_module_prefix(source_state)
    tgt = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    src = {k: tuple(v.shape) for k, v in source.items()}
    t_follow, s_follow = anchors_of(tgt), anchors_of(src)
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
            if is_norm_affine(k, t_keys):
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
