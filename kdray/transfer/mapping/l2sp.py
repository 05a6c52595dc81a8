"""L2-SP: fine-tuning regularised toward the weights the plan gave the target."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from kdray.core.errors import KdrayError
from kdray.models.hooks import unwrap
from kdray.transfer.mapping.apply import source_value
from kdray.transfer.mapping.keys import shape_str, strip_module_prefix
from kdray.transfer.mapping.report import TransferReport


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
        source = strip_module_prefix(source_state)
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
