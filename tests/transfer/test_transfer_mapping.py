"""Tests for kdray.transfer: mapping rules and adapters on real kdray models, the transfer report,
layer rules, batch-norm modes, L2-SP, tied modules, and every bad-input error.

    .venv/bin/python -m pytest tests/transfer/test_transfer_mapping.py -q -p no:cacheprovider
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import ValidationError

from kdray.core.errors import KdrayError
from kdray.models import create_model
from kdray.transfer.mapping import (
    L2SP,
    TransferSpec,
    apply_batchnorm_rules,
    apply_layer_rules,
    apply_transfer,
    plan_transfer,
    set_batchnorm_mode,
    tie_modules,
    uniform_indices,
)
from kdray.transfer.share import Share

IMG = 8  # small images keep every forward pass cheap


def transfer_weights(source_state, target, spec, **arch):
    """Plan the transfer, then carry it out (what the transfer stage does in two steps)."""
    return apply_transfer(target, source_state, plan_transfer(source_state, target, spec, **arch))


def model(name: str, seed: int, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, image_size=IMG, **kw)


def spec(**kw) -> TransferSpec:
    return TransferSpec.model_validate(kw)


def trained_bn_stats(m: nn.Module, in_channels: int = 1) -> nn.Module:
    """Run a few batches in train mode so running statistics differ from their defaults."""
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(4, in_channels, IMG, IMG))
    return m


def assert_every_key_once(report, target: nn.Module) -> None:
    keys = [e.key for e in report.entries]
    assert keys == list(target.state_dict().keys())
    assert len(set(keys)) == len(keys)


# ---------------------------------------------------------------- mapping rules and adapters


def test_new_head_copies_everything_else_bit_equal():
    src = trained_bn_stats(model("cnn_small", 0))
    tgt = model("cnn_small", 1, num_classes=5)
    report = transfer_weights(src.state_dict(), tgt, spec(), source_arch="cnn_small", target_arch="cnn_small")

    assert_every_key_once(report, tgt)
    s, t = src.state_dict(), tgt.state_dict()
    for e in report.entries:
        if e.key.startswith("classifier."):
            assert e.status == "reinitialised"
            assert e.reason == "new classifier head: 10 -> 5 classes"
        else:
            assert e.status == "copied" and e.source == e.key, e
            assert torch.equal(t[e.key], s[e.key]), e.key  # bit-equal, BN running stats included
    assert any(k.endswith("running_var") for k in t)
    assert [k for k, _ in report.unused_source] == ["classifier.weight", "classifier.bias"]
    summary = report.summary()
    assert summary["reinitialised"] == 2 and summary["copied"] == len(t) - 2

    # The report is JSON and a table with one line per target tensor.
    doc = json.loads(json.dumps(report.to_json()))
    assert [d["key"] for d in doc["tensors"]] == list(t)
    assert doc["unused_source"][0] == {"key": "classifier.weight", "shape": [10, 128]}
    table = report.to_table()
    for k in t:
        assert sum(line.split()[0] == k for line in table.splitlines() if line.strip()) == 1
    assert "new classifier head: 10 -> 5 classes" in table


def test_repeat_channels_keeps_activations_for_equal_channels():
    src = trained_bn_stats(model("cnn_small", 0, in_channels=3), in_channels=3)
    tgt = model("cnn_small", 1, in_channels=1)
    report = transfer_weights(src.state_dict(), tgt, spec(mapping=[{"match": "name", "op": "repeat_channels"}]))

    adapted = [e for e in report.entries if e.status == "adapted"]
    assert len(adapted) == 1 and adapted[0].how == "repeat_channels 3->1"
    assert all(e.status == "copied" for e in report.entries if e is not adapted[0])
    w_src = src.state_dict()[adapted[0].key]
    assert torch.allclose(tgt.state_dict()[adapted[0].key], w_src.sum(1, keepdim=True))  # mean * 3/1

    # A grey image fed to the RGB source as three equal channels gives the same logits.
    src.eval(), tgt.eval()
    x = torch.randn(3, 1, IMG, IMG)
    assert torch.allclose(tgt(x), src(x.repeat(1, 3, 1, 1)), atol=1e-5)

    # And the other way: grey source -> RGB target splits the filter in thirds.
    back = model("cnn_small", 2, in_channels=3)
    transfer_weights(tgt.state_dict(), back, spec(mapping=[{"match": "name", "op": "repeat_channels"}]))
    back.eval()
    assert torch.allclose(back(x.repeat(1, 3, 1, 1)), tgt(x), atol=1e-5)


def test_slice_mlp_512_to_256_takes_every_other_unit():
    src, tgt = model("mlp_512", 0), model("mlp_256", 1)
    report = transfer_weights(
        src.state_dict(),
        tgt,
        spec(mapping=[{"match": "name", "op": "slice"}]),
        source_arch="mlp_512",
        target_arch="mlp_256",
    )
    by = report.by_key()
    assert by["layers.0.0.weight"].how == "slice 512x64 -> 256x64"
    assert by["layers.1.0.weight"].how == "slice 512x512 -> 256x256"
    assert by["classifier.bias"].status == "copied"
    assert uniform_indices(512, 256).tolist() == list(range(0, 512, 2))
    s = src.state_dict()
    assert torch.equal(tgt.layers[1][0].weight, s["layers.1.0.weight"][::2, ::2])
    # The first hidden layer of the target is exactly the source's even units.
    x = torch.randn(4, 1, IMG, IMG)
    assert torch.equal(tgt.layers[0](x.flatten(1)), src.layers[0](x.flatten(1))[:, ::2])


def test_shape_rule_pairs_cnn_small_into_resnet_small_in_order():
    src = trained_bn_stats(model("cnn_small", 0))
    tgt = model("resnet_small", 1)
    sp = spec(mapping=[{"match": "name"}, {"match": "shape"}])
    plan = plan_transfer(src.state_dict(), tgt, sp, source_arch="cnn_small", target_arch="resnet_small")
    report = apply_transfer(tgt, src.state_dict(), plan)
    assert_every_key_once(report, tgt)

    s_shapes = {k: tuple(v.shape) for k, v in src.state_dict().items()}
    s_order = list(s_shapes)
    by_shape = [e for e in report.entries if e.rule == "mapping[1] shape"]
    assert len(by_shape) >= 3  # conv and batch-norm tensors found a partner
    for e in by_shape:
        assert e.status == "copied" and s_shapes[e.source] == e.shape
        assert torch.equal(tgt.state_dict()[e.key], src.state_dict()[e.source])
    # In order: among targets of one shape, their sources appear in source order.
    for shape in {e.shape for e in by_shape}:
        idx = [s_order.index(e.source) for e in by_shape if e.shape == shape]
        assert idx == sorted(idx)
    # Running statistics come from the same source layer as the weight they follow.
    by = report.by_key()
    for e in report.entries:
        if e.key.endswith("running_mean") and e.status == "copied":
            w = by[e.key.rsplit(".", 1)[0] + ".weight"]
            assert e.source == w.source.rsplit(".", 1)[0] + ".running_mean"
    # The classifier bias (10) is found by name; the weight (10x128 vs 10x64) is not.
    assert by["classifier.bias"].rule == "mapping[0] name"
    assert "10x128" in by["classifier.weight"].reason and "10x64" in by["classifier.weight"].reason
    used = {e.source for e in report.entries if e.source}
    assert {k for k, _ in report.unused_source} == set(s_shapes) - used
    assert "mapping[1] shape" not in report.to_table()  # the table shows sources, not rule ids
    assert any(f"<- {by_shape[0].source}" in line for line in report.to_table().splitlines())


def test_explicit_slice_reinit_and_skip():
    src = model("cnn_small", 0)
    tgt = model("cnn_small", 1, num_classes=5)
    report = transfer_weights(
        src.state_dict(),
        tgt,
        spec(
            mapping=[{"match": "explicit", "pairs": {"classifier.*": "classifier.*"}, "op": "slice"}, {"match": "name"}]
        ),
    )
    assert report.by_key()["classifier.weight"].how == "slice 10x128 -> 5x128"
    assert torch.equal(tgt.classifier.weight, src.classifier.weight[[0, 2, 4, 6, 8]])
    assert report.unused_source == []

    # reinit re-runs reset_parameters even when the target already holds the source weights; a
    # rule earlier in the list wins over {match: name}.
    tgt2 = model("cnn_small", 2)
    tgt2.load_state_dict(src.state_dict())
    torch.manual_seed(3)
    report = transfer_weights(
        src.state_dict(),
        tgt2,
        spec(
            mapping=[
                {"match": "explicit", "pairs": {"head.1.weight": None}, "op": "reinit"},
                {"match": "explicit", "pairs": {"classifier.*": None}, "op": "skip"},
                {"match": "name"},
            ],
            strict=True,
        ),
    )
    by = report.by_key()
    assert by["head.1.weight"].status == "reinitialised" and "rule reinit" in by["head.1.weight"].reason
    assert not torch.equal(tgt2.head[1].weight, src.head[1].weight)
    assert by["head.1.bias"].status == "copied"
    assert torch.equal(tgt2.head[1].bias, src.head[1].bias)  # restored after the module's reset
    assert by["classifier.weight"].status == "kept"
    assert {k for k, _ in report.unused_source} == {"head.1.weight", "classifier.weight", "classifier.bias"}


def test_ddp_prefixed_source_state_is_accepted():
    src, tgt = model("mlp_32", 0), model("mlp_32", 1)
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    report = transfer_weights(state, tgt, spec())
    assert report.summary()["copied"] == len(state)
    assert torch.equal(tgt.classifier.weight, src.classifier.weight)


# ---------------------------------------------------------------- bad input


def test_strict_lists_unmapped_tensors_with_shapes():
    src, tgt = model("cnn_small", 0), model("cnn_small", 1, num_classes=5)
    with pytest.raises(KdrayError) as e:
        plan_transfer(src.state_dict(), tgt, spec(strict=True))
    msg = str(e.value)
    assert "transfer.strict" in msg and "classifier.weight 5x128" in msg and "10x128" in msg
    assert "classifier.bias 5" in msg
    # Reinitialising them by rule satisfies strict.
    plan_transfer(
        src.state_dict(),
        tgt,
        spec(
            strict=True,
            mapping=[{"match": "name"}, {"match": "explicit", "pairs": {"classifier.*": None}, "op": "reinit"}],
        ),
    )


def test_explicit_glob_that_matches_nothing_names_close_keys():
    src, tgt = model("cnn_small", 0), model("cnn_small", 1)
    with pytest.raises(KdrayError) as e:
        plan_transfer(src.state_dict(), tgt, spec(mapping=[{"match": "explicit", "pairs": {"clasifier.*": "head.*"}}]))
    msg = str(e.value)
    assert "transfer.mapping[0]" in msg and "'clasifier.*'" in msg and "classifier.weight" in msg
    assert "head.1.weight" in msg  # close source names for the source glob


def test_explicit_pair_to_missing_source_key():
    src, tgt = model("cnn_small", 0), model("cnn_small", 1)
    with pytest.raises(KdrayError) as e:
        plan_transfer(src.state_dict(), tgt, spec(mapping=[{"match": "explicit", "pairs": {"classifier.*": "fc.*"}}]))
    msg = str(e.value)
    assert "'classifier.weight'" in msg and "'fc.weight'" in msg and "no tensor" in msg


def test_shape_mismatch_without_adapter_names_both_sides():
    src, tgt = model("cnn_small", 0), model("cnn_small", 1, num_classes=5)
    with pytest.raises(KdrayError) as e:
        plan_transfer(
            src.state_dict(), tgt, spec(mapping=[{"match": "explicit", "pairs": {"classifier.*": "classifier.*"}}])
        )
    msg = str(e.value)
    assert "target 'classifier.weight' has shape 5x128" in msg
    assert "source 'classifier.weight' has shape 10x128" in msg and "op: slice" in msg
    # slice cannot grow a tensor.
    small, big = model("mlp_32", 0), model("mlp_64", 1)
    with pytest.raises(KdrayError) as e:
        plan_transfer(
            small.state_dict(),
            big,
            spec(mapping=[{"match": "explicit", "pairs": {"layers.*": "layers.*"}, "op": "slice"}]),
        )
    assert "64x64" in str(e.value) and "32x64" in str(e.value) and "target 64 > source 32" in str(e.value)


def test_layer_rule_selecting_nothing_lists_close_paths():
    src, tgt = model("cnn_small", 0), model("cnn_small", 1)
    bad = spec(layers=[{"select": "feature.0.*", "action": "freeze"}])
    with pytest.raises(KdrayError) as e:
        plan_transfer(src.state_dict(), tgt, bad)
    assert "transfer.layers[0]" in str(e.value) and "'feature.0.*'" in str(e.value) and "'features.0'" in str(e.value)
    with pytest.raises(KdrayError):
        apply_layer_rules(tgt, bad)


def test_layer_copy_action_requires_transfer():
    src, tgt = model("cnn_small", 0), model("cnn_small", 1, num_classes=5)
    with pytest.raises(KdrayError) as e:
        plan_transfer(src.state_dict(), tgt, spec(layers=[{"select": "classifier", "action": "copy"}]))
    assert "transfer.layers[0]" in str(e.value) and "classifier.weight 5x128" in str(e.value)


def test_architecture_change_mapped_by_name_alone_fails():
    src, tgt = model("cnn_small", 0), model("resnet_small", 1)
    with pytest.raises(KdrayError) as e:
        plan_transfer(
            src.state_dict(),
            tgt,
            spec(mapping=[{"match": "name"}]),
            source_arch="cnn_small",
            target_arch="resnet_small",
        )
    msg = str(e.value)
    assert "'cnn_small'" in msg and "'resnet_small'" in msg and "stem.0.weight 16x1x3x3 (not in source)" in msg
    assert "{match: shape}" in msg
    # Same names, different widths: cnn_large -> cnn_small.
    big, small = model("cnn_large", 0).state_dict(), model("cnn_small", 1)
    k = next(k for k, v in small.state_dict().items() if k in big and big[k].shape != v.shape)
    t_shape, s_shape = ("x".join(map(str, x.shape)) for x in (small.state_dict()[k], big[k]))
    with pytest.raises(KdrayError) as e:
        plan_transfer(big, small, spec(), source_arch="cnn_large", target_arch="cnn_small")
    assert f"{k} {t_shape} (same-named source tensor is {s_shape}" in str(e.value)
    # Without architecture names the same mapping only reports.
    report = plan_transfer(src.state_dict(), tgt, spec()).copy()
    assert report.by_key()["stem.0.weight"].reason == "no source match"


def test_name_rule_with_no_common_names():
    with pytest.raises(KdrayError) as e:
        plan_transfer(
            model("mlp_32", 0).state_dict(),
            model("resnet_small", 1),
            spec(mapping=[{"match": "explicit", "pairs": {"classifier.*": None}, "op": "reinit"}, {"match": "name"}]),
        )
    assert "transfer.mapping[1]" in str(e.value) and "no target tensor name in the source" in str(e.value)


@pytest.mark.parametrize(
    "block, words",
    [
        ({"mapping": [{"match": "explicit"}]}, "needs pairs"),
        ({"mapping": [{"match": "name", "pairs": {"a": "b"}}]}, "match: explicit"),
        ({"mapping": [{"match": "shape", "op": "slice"}]}, "takes op copy"),
        ({"mapping": [{"match": "explicit", "pairs": {"a.*": "b"}}]}, "1 '*' on the target side but 0"),
        ({"mapping": [{"match": "explicit", "pairs": {"a.*": "b.*"}, "op": "reinit"}]}, "'a.*': null"),
        ({"mapping": [{"match": "explicit", "pairs": {"a.*": None}}]}, "no source glob"),
        ({"mapping": []}, "at least one rule"),
        ({"layers": [{"select": "x", "action": "lr_scale"}]}, "no lr_scale value"),
        ({"layers": [{"select": "x", "action": "lr_scale", "lr_scale": 0}]}, "use action: freeze"),
        ({"layers": [{"select": "x", "action": "freeze", "lr_scale": 0.1}]}, "only read with action: lr_scale"),
        ({"l2sp": {"alpha": 0, "beta": 0}}, "does nothing"),
        ({"batchnorm": "fixed"}, "'train', 'eval' or 'frozen'"),
        ({"mapping": [{"match": "name"}], "stict": True}, "Extra inputs are not permitted"),
    ],
)
def test_spec_validation_messages(block, words):
    with pytest.raises(ValidationError) as e:
        TransferSpec.model_validate(block)
    assert words in str(e.value)


# ---------------------------------------------------------------- layer rules and batch norm


def test_freeze_and_lr_scale_groups():
    src, tgt = model("cnn_small", 0), model("cnn_small", 1, num_classes=5)
    sp = spec(
        layers=[
            {"select": "features.0.*", "action": "freeze"},
            {"select": "features.*", "action": "lr_scale", "lr_scale": 0.1},
        ]
    )
    report = transfer_weights(src.state_dict(), tgt, sp)
    by = report.by_key()
    assert by["features.0.0.0.weight"].frozen and by["features.0.0.0.weight"].lr_scale is None  # first rule wins
    assert by["features.1.0.0.weight"].lr_scale == 0.1 and not by["features.1.0.0.weight"].frozen
    assert "lr x0.1" in report.to_table() and "frozen" in report.to_table()

    groups = apply_layer_rules(tgt, sp)
    scales = {g["lr_scale"]: g["names"] for g in groups}
    assert set(scales) == {0.1, 1.0}
    assert all(n.startswith("features.1.") for n in scales[0.1]) and "features.1.0.0.weight" in scales[0.1]
    assert "classifier.weight" in scales[1.0] and not any(
        n.startswith("features.0.") for names in scales.values() for n in names
    )
    assert tgt.features[0][0][0].weight.requires_grad is False

    opt = torch.optim.SGD([{"params": g["params"], "lr": 0.5 * g["lr_scale"]} for g in groups])
    before = {k: v.clone() for k, v in tgt.state_dict().items()}
    tgt.train()
    apply_batchnorm_rules(tgt, sp)
    loss = F.cross_entropy(tgt(torch.randn(4, 1, IMG, IMG)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert tgt.features[0][0][0].weight.grad is None and tgt.features[0][0][1].weight.grad is None
    assert tgt.features[1][0][0].weight.grad is not None
    opt.step()
    after = tgt.state_dict()
    for k in before:
        if k.startswith("features.0."):
            assert torch.equal(before[k], after[k]), k  # weights and BN statistics of a frozen layer
    assert not torch.equal(before["features.1.0.0.weight"], after["features.1.0.0.weight"])
    # lr_scale 0.1 makes the step exactly a tenth of the plain SGD step.
    g = tgt.features[1][0][0].weight.grad
    assert torch.allclose(before["features.1.0.0.weight"] - after["features.1.0.0.weight"], 0.05 * g, atol=1e-7)


def test_batchnorm_modes():
    m = model("cnn_small", 0)
    bn = m.features[0][0][1]
    x = torch.randn(4, 1, IMG, IMG)

    def step_changes_stats() -> bool:
        before = bn.running_mean.clone()
        m(x)
        return not torch.equal(before, bn.running_mean)

    m.train()
    assert set_batchnorm_mode(m, "train") == [] and step_changes_stats()
    m.train()
    changed = set_batchnorm_mode(m, "eval")
    assert "features.0.0.1" in changed and not step_changes_stats() and bn.weight.requires_grad
    m.train()
    set_batchnorm_mode(m, "frozen", ["features.0.*"])
    assert not step_changes_stats() and not bn.weight.requires_grad and not bn.bias.requires_grad
    assert m.features[1][0][1].training and m.features[1][0][1].weight.requires_grad  # not selected

    # apply_batchnorm_rules: BN inside frozen layers stops updating even with batchnorm: train.
    m2 = model("cnn_small", 1)
    sp = spec(layers=[{"select": "features.0", "action": "freeze"}])
    m2.train()
    assert apply_batchnorm_rules(m2, sp) == ["features.0.0.1"]
    assert not m2.features[0][0][1].training and m2.features[1][0][1].training
    # batchnorm: frozen also leaves BN affine parameters out of the optimizer groups.
    groups = apply_layer_rules(model("cnn_small", 2), spec(batchnorm="frozen"))
    names = [n for g in groups for n in g["names"]]
    assert "features.0.0.1.weight" not in names and "features.0.0.0.weight" in names
    with pytest.raises(KdrayError, match="not one of train, eval, frozen"):
        set_batchnorm_mode(m, "off")


# ---------------------------------------------------------------- L2-SP


def test_l2sp_value_by_hand_on_a_tiny_model():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    tgt = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))  # a new 5-class head
    sp = spec(l2sp={"alpha": 0.5, "beta": 0.25})
    plan = plan_transfer(src.state_dict(), tgt, sp)
    apply_transfer(tgt, src.state_dict(), plan)
    reg = L2SP(tgt, src.state_dict(), plan)
    assert reg.transferred == ["0.weight", "0.bias"] and reg.new == ["1.weight", "1.bias"]

    new_sq = (tgt[1].weight.detach() ** 2).sum().item() + (tgt[1].bias.detach() ** 2).sum().item()
    assert reg(tgt).item() == pytest.approx(0.25 * new_sq, rel=1e-6)  # transferred part is 0 at init
    with torch.no_grad():
        tgt[0].weight += 0.5  # 12 entries moved by 0.5: ‖Δ‖² = 3
        tgt[0].bias[0] -= 2.0  # ‖Δ‖² = 4
    value = reg(tgt)
    assert value.item() == pytest.approx(0.5 * (3.0 + 4.0) + 0.25 * new_sq, rel=1e-6)
    value.backward()  # d/dw α‖w − w0‖² = 2α(w − w0) = 2·0.5·0.5
    assert torch.allclose(tgt[0].weight.grad, torch.full((4, 3), 0.5))
    assert torch.allclose(tgt[1].bias.grad, 2 * 0.25 * tgt[1].bias.detach())


def test_l2sp_is_zero_at_init_for_adapted_weights_and_works_under_ddp(tmp_path):
    import torch.distributed as dist

    src, tgt = model("mlp_64", 0), model("mlp_32", 1)
    plan = plan_transfer(src.state_dict(), tgt, spec(mapping=[{"match": "name", "op": "slice"}], l2sp={"alpha": 1.0}))
    apply_transfer(tgt, src.state_dict(), plan)
    reg = L2SP(tgt, src.state_dict(), plan)
    assert reg(tgt).item() == 0.0 and len(reg.transferred) == 6

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(tgt)
        with torch.no_grad():
            tgt.classifier.bias += 1.0
        assert reg(ddp).item() == pytest.approx(10.0)
        reg_from_ddp = L2SP(ddp, {f"module.{k}": v for k, v in src.state_dict().items()}, plan)
        assert reg_from_ddp(ddp).item() == pytest.approx(10.0)
    finally:
        dist.destroy_process_group()


def test_l2sp_needs_weights():
    src, tgt = model("mlp_32", 0), model("mlp_32", 1)
    plan = plan_transfer(src.state_dict(), tgt, spec())
    with pytest.raises(KdrayError, match="transfer.l2sp"):
        L2SP(tgt, src.state_dict(), plan)


# ---------------------------------------------------------------- parameter sharing


def test_tie_modules_shares_storage_and_training():
    a, b = model("cnn_small", 0, num_classes=10), model("cnn_small", 1, num_classes=5)
    x = torch.randn(4, 1, IMG, IMG)
    joint = Share(a, b, ["features", "features.*", "head"], x, torch.tensor([0, 1, 2, 3]), 1.0, 4, 0)
    assert joint.shared == ["features", "head"]
    assert b.features is a.features
    assert b.features[0][0][0].weight.data_ptr() == a.features[0][0][0].weight.data_ptr()
    n_unique = len(list(joint.parameters()))
    assert n_unique == len(list(a.parameters())) + 2  # only b's classifier weight and bias are extra

    out = joint({"x": x, "y": torch.tensor([0, 1, 2, 3])})
    assert out["logits"].shape == (4, 10) and out["loss"].ndim == 0

    opt = torch.optim.SGD(a.parameters(), lr=0.1)  # a step on task A only
    trunk_b, head_b = b.head[1].weight.clone(), b.classifier.weight.clone()
    F.cross_entropy(a(x), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert not torch.equal(b.head[1].weight, trunk_b)  # B sees the trunk A trained
    assert torch.equal(b.head[1].weight, a.head[1].weight)
    assert torch.equal(b.classifier.weight, head_b)


def test_tie_modules_errors():
    a, b = model("cnn_small", 0, num_classes=10), model("cnn_small", 1, num_classes=5)
    with pytest.raises(KdrayError) as e:
        tie_modules(a, b, ["classifier"])
    assert "'classifier'" in str(e.value) and "('weight', (5, 128))" in str(e.value) and "(10, 128)" in str(e.value)
    with pytest.raises(KdrayError) as e:
        tie_modules(a, b, ["featurs"])
    assert "'featurs'" in str(e.value) and "'features'" in str(e.value)
    with pytest.raises(KdrayError, match="no counterpart"):
        tie_modules(model("mlp_32", 0), b, ["features"])
