"""Match strategies: the built-in ``{match: name | shape | explicit}`` rules and the state they extend."""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

from kdray.core.errors import KdrayError
from kdray.transfer.mapping.adapters import adapt_description, cannot_adapt
from kdray.transfer.mapping.keys import close_names, fill_glob, glob_regex, is_norm_affine, quote_list, shape_str
from kdray.transfer.mapping.report import Entry, Status
from kdray.transfer.mapping.specs import MATCH_STRATEGIES, MappingRule


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
            f"{quote_list(state.t_anchor[:3])}, source names like {quote_list(state.s_anchor[:3])}.",
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
            queues[(is_norm_affine(k, state.s_keys), state.src[k])].append(k)
    for k in state.t_anchor:
        q = queues.get((is_norm_affine(k, state.t_keys), state.tgt[k]))
        if k not in state.claims and q:
            state.claim_transfer(k, q.popleft(), "copy", f"mapping[{i}] shape")


@MATCH_STRATEGIES.register("explicit", ops=("copy", "slice", "repeat_channels", "reinit", "skip"), pairs=True)
def match_explicit(state: PlanState, rule: MappingRule, i: int) -> None:
    """``pairs: {target_glob: source_glob}``; each ``*`` of the target glob fills one of the source glob."""
    src, tgt, where, op = state.src, state.tgt, f"transfer.mapping[{i}]", rule.resolved_op
    for tglob, sglob in (rule.pairs or {}).items():
        rx = glob_regex(tglob)
        hits = [(k, m.groups()) for k in state.t_anchor if (m := rx.match(k))]
        if not hits:
            follower_hint = (
                " Running statistics are not mapped on their own: they follow their layer's weight."
                if any(rx.match(k) for k in state.t_follow)
                else ""
            )
            raise KdrayError(
                f"explicit target glob {tglob!r} matches no target tensor; close target names: "
                f"{quote_list(close_names(tglob, state.t_anchor))}.{follower_hint}",
                where=where,
                hint=f"Close source names: {quote_list(close_names(sglob or tglob, state.s_anchor))}.",
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
            sk = fill_glob(sglob or "", groups)
            if sk not in src or sk in state.s_follow:
                raise KdrayError(
                    f"target {k!r} ({shape_str(tgt[k])}) maps to source {sk!r} through {tglob!r}: {sglob!r}, "
                    f"but the source has no tensor {sk!r}; close source names: {quote_list(close_names(sk, state.s_anchor))}.",
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
