"""The ``transfer:`` block of a transfer stage: mapping rules, layer rules, L2-SP, and the table
of match strategies a ``{match: <name>}`` rule names (its entries live in :mod:`.strategies`)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from kdray.core.registry import Registry, did_you_mean
from kdray.core.spec import Spec

Op = Literal["copy", "slice", "repeat_channels", "reinit", "skip"]

# A match strategy pairs still-unclaimed target tensors with source tensors (``{match: <name>}``).
# It is registered with the ops it takes and whether it reads ``pairs``; see ``match_name`` in :mod:`.strategies`.
MATCH_STRATEGIES: Registry = Registry("transfer strategy", group="kdray.transfer_strategies")


class MappingRule(Spec):
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


class LayerRule(Spec):
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


class L2SPSpec(Spec):
    """``α·Σ‖w − w_source‖²`` over transferred weights plus ``β·Σ‖w‖²`` over new ones."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(ge=0)
    beta: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "L2SPSpec":
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("l2sp with alpha = beta = 0 does nothing; remove the l2sp block or set alpha > 0")
        return self


class TransferSpec(Spec):
    """The ``transfer:`` block of a transfer stage (see the docstring of :mod:`kdray.transfer.mapping`)."""

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
