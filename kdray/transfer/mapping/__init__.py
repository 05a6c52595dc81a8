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

One module per concern, none importing this package: ``specs`` (the ``transfer:`` block and the
``MATCH_STRATEGIES`` table), ``keys`` (key, glob and shape helpers), ``adapters`` (``slice``,
``repeat_channels``), ``report`` (:class:`Entry`, :class:`TransferReport`), ``strategies`` (the
built-in ``{match: ...}`` rules and :class:`PlanState`), ``layers`` (layer rules), ``plan``
(:func:`plan_transfer`), ``apply`` (:func:`apply_transfer`), ``batchnorm``, ``l2sp`` and ``tying``.
"""

from kdray.transfer.mapping.adapters import adapt_description, adapt_tensor, cannot_adapt, uniform_indices
from kdray.transfer.mapping.apply import apply_transfer, source_value
from kdray.transfer.mapping.batchnorm import apply_batchnorm_rules, set_batchnorm_mode
from kdray.transfer.mapping.keys import shape_str
from kdray.transfer.mapping.l2sp import L2SP
from kdray.transfer.mapping.layers import apply_layer_rules, layer_actions
from kdray.transfer.mapping.plan import plan_transfer
from kdray.transfer.mapping.report import Entry, Status, TransferReport
from kdray.transfer.mapping.specs import MATCH_STRATEGIES, L2SPSpec, LayerRule, MappingRule, Op, TransferSpec
from kdray.transfer.mapping.strategies import (  # importing it registers the built-in strategies
    PlanState,
    match_explicit,
    match_name,
    match_shape,
)
from kdray.transfer.mapping.tying import tie_modules

__all__ = [
    "MATCH_STRATEGIES",
    "MappingRule",
    "LayerRule",
    "L2SPSpec",
    "TransferSpec",
    "Entry",
    "TransferReport",
    "PlanState",
    "match_name",
    "match_shape",
    "match_explicit",
    "plan_transfer",
    "apply_transfer",
    "adapt_tensor",
    "cannot_adapt",
    "adapt_description",
    "uniform_indices",
    "layer_actions",
    "apply_layer_rules",
    "set_batchnorm_mode",
    "apply_batchnorm_rules",
    "L2SP",
    "tie_modules",
    "shape_str",
    "source_value",
    "Op",
    "Status",
]
