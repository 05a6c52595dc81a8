"""Tests for kdray.losses: hand-computed values, shape bridging, errors and real optimisation steps.

.venv/bin/python -m pytest tests/distill/test_losses.py -q -p no:cacheprovider
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn as nn

from kdray.core.errors import KdrayError, SpecError
from kdray.distill.losses import LOSSES, DistillLoss, build_loss
from kdray.models import create_model
from kdray.models.hooks import Outputs, capture, forward_with_features


def softmax(row: list[float], T: float = 1.0) -> list[float]:
    exps = [math.exp(v / T) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def out(logits, **kw) -> Outputs:
    return Outputs(logits=torch.tensor(logits, dtype=torch.float32, requires_grad=True), **kw)


S = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
T_ = [[3.0, 1.0, 0.0], [1.0, 1.0, 1.5]]


# ---------------------------------------------------------------- registry-wide checks

# One example per registered loss: the student/teacher models, the parameters and the batch extras.
# Adding a loss to LOSSES without an entry here fails test_every_loss_has_an_example.
EXAMPLES = {
    "cross_entropy": dict(student="mlp_32", teacher=None, params={"label_smoothing": 0.1}),
    "hinton_kl": dict(student="mlp_32", teacher="cnn_small", params={"temperature": 2.0}),
    "weighted_output_mse": dict(
        student="mlp_32", teacher="cnn_small", params={"weighting": "column", "target": "probs", "temperature": 2.0}
    ),
    "feature_hint": dict(
        student="mlp_32", teacher="cnn_small", params={"student_layer": "layers.1", "teacher_layer": "features.1"}
    ),
    "attention_transfer": dict(
        student="cnn_small",
        teacher="resnet_small",
        params={"pairs": [["features.0", "layers.1"], ["features.1", "layers.2"]]},
    ),
    "rkd": dict(student="mlp_32", teacher="cnn_small", params={}),
    "dkd": dict(student="mlp_32", teacher="cnn_small", params={"temperature": 2.0}),
    # causal LMs on token rows (kdray.distill.token_losses): logits [N, T, vocab]
    "token_kl": dict(student="lm_tiny", teacher="lm_tiny", params={"temperature": 2.0}, tokens=True),
    "token_reverse_kl": dict(student="lm_tiny", teacher="lm_tiny", params={"top_k": 4}, tokens=True),
    "token_jsd": dict(
        student="lm_tiny", teacher="lm_tiny", params={"beta": 0.3, "top_k": 4, "tail": False}, tokens=True
    ),
}


def test_every_loss_has_an_example():
    assert sorted(EXAMPLES) == LOSSES.names()


@pytest.mark.parametrize("name", LOSSES.names())
def test_registered_loss_is_documented_and_builds(name):
    cls = LOSSES.get(name)
    assert issubclass(cls, DistillLoss)
    doc = cls.__doc__ or ""
    # the formula, the paper (a year) and the parameters are in the docstring
    assert "L = " in doc and "Args:" in doc and any(f"20{y:02d}" in doc for y in range(26)), name
    required = [
        p
        for p, v in inspect.signature(cls.__init__).parameters.items()
        if p != "self" and v.default is inspect.Parameter.empty
    ]
    if required:  # a spec without them gets a SpecError naming them, not a TypeError
        with pytest.raises(SpecError, match=required[0]):
            build_loss(name)
    else:
        assert isinstance(build_loss(name), cls)
    loss = build_loss(name, **EXAMPLES[name]["params"])
    assert loss.needs_teacher == (EXAMPLES[name]["teacher"] is not None)


@pytest.mark.parametrize("name", LOSSES.names())
def test_a_few_steps_reduce_each_loss(name):
    torch.manual_seed(0)
    ex = EXAMPLES[name]
    size = {"in_channels": 8} if ex.get("tokens") else {"image_size": 8}  # token rows of 8, or 8x8 images
    student = create_model(ex["student"], num_classes=10, **size)
    teacher = create_model(ex["teacher"], num_classes=10, **size).eval() if ex["teacher"] else None
    x = torch.randint(0, 10, (4, 8)) if ex.get("tokens") else torch.randn(4, 1, 8, 8)
    batch = {"x": x, "y": torch.tensor([1, 3, -1, 7]), "w": torch.tensor([1.0, 0.5, 2.0, 0.0])}
    loss_fn = build_loss(name, **ex["params"])
    loss_fn.setup(student, teacher, x)
    params = list(student.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    t_out = None
    if teacher is not None:
        with torch.no_grad():
            t_out = forward_with_features(teacher, x, loss_fn.teacher_layers, embedding=loss_fn.needs_embedding)

    def value() -> torch.Tensor:
        s_out = forward_with_features(student, x, loss_fn.student_layers, embedding=loss_fn.needs_embedding)
        return loss_fn(s_out, t_out, batch)

    first = value()
    assert first.dim() == 0 and torch.isfinite(first) and first.item() > 0
    for _ in range(8):
        opt.zero_grad()
        v = value()
        v.backward()
        opt.step()
    last = value().item()
    assert last < 0.8 * first.item(), name


# ---------------------------------------------------------------- output losses


def test_cross_entropy_ignores_unlabelled_rows():
    logits = [[1.0, 0.0, -1.0], [5.0, 5.0, 5.0], [0.0, 2.0, 1.0]]
    y = torch.tensor([0, -1, 2])
    expected = (-math.log(softmax(logits[0])[0]) - math.log(softmax(logits[2])[2])) / 2
    got = build_loss("cross_entropy")(out(logits), None, {"y": y})
    assert got.item() == pytest.approx(expected, rel=1e-6)

    eps = 0.2
    q0 = [(1 - eps) * (k == 0) + eps / 3 for k in range(3)]
    q2 = [(1 - eps) * (k == 2) + eps / 3 for k in range(3)]
    smoothed = (
        -(
            sum(q * math.log(p) for q, p in zip(q0, softmax(logits[0])))
            + sum(q * math.log(p) for q, p in zip(q2, softmax(logits[2])))
        )
        / 2
    )
    got = build_loss("cross_entropy", label_smoothing=eps)(out(logits), None, {"y": y})
    assert got.item() == pytest.approx(smoothed, rel=1e-6)


def test_cross_entropy_on_an_unlabelled_batch_is_zero_with_a_graph():
    s = out([[1.0, 2.0], [3.0, 0.0]])
    value = build_loss("cross_entropy")(s, None, {"y": torch.tensor([-1, -1])})
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert torch.equal(s.logits.grad, torch.zeros(2, 2))


def test_labels_must_match_logits():
    with pytest.raises(KdrayError, match=r"labels y \(3,\).*logits \(2, 2\)"):
        build_loss("cross_entropy")(out([[1.0, 2.0], [3.0, 0.0]]), None, {"y": torch.tensor([0, 1, 1])})


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_hinton_kl_matches_hand_computation(T):
    expected = T * T * sum(kl(softmax(t, T), softmax(s, T)) for s, t in zip(S, T_)) / 2  # batchmean
    got = build_loss("hinton_kl", temperature=T)(out(S), out(T_), {})
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_hinton_kl_is_zero_for_equal_logits_and_handles_topk_cache_fill():
    loss = build_loss("hinton_kl")
    assert loss(out(S), out(S), {}).item() == pytest.approx(0.0, abs=1e-7)
    # A top-k cache stores the other logits as -inf: those classes contribute 0, not NaN.
    t = [[3.0, 1.0, float("-inf")], [1.0, float("-inf"), 1.5]]
    s = out(S)
    value = loss(s, out(t), {})
    kept = [[k for k, v in enumerate(tr) if v > -1e9] for tr in t]
    expected = (
        16
        * sum(kl(softmax([tr[k] for k in ks], 4), [softmax(sr, 4)[k] for k in ks]) for sr, tr, ks in zip(S, t, kept))
        / 2
    )
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert torch.isfinite(s.logits.grad).all()


def test_hinton_kl_rejects_mismatched_logits_and_bad_temperature():
    with pytest.raises(KdrayError, match=r"student logits \(2, 3\) and teacher logits \(2, 2\)"):
        build_loss("hinton_kl")(out(S), out([[1.0, 2.0], [0.0, 0.0]]), {})
    with pytest.raises(SpecError, match="parameter 'temperature' = 0 is invalid: Input should be greater than 0"):
        build_loss("hinton_kl", temperature=0)
    with pytest.raises(KdrayError, match="needs teacher outputs"):
        build_loss("hinton_kl")(out(S), None, {})


# weighted_output_mse on three rows, two classes.
WS = [[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]
WT = [[2.0, 0.0], [0.0, 0.0], [3.0, 1.0]]
D = [1.0, 4.0, 4.0]  # ‖f_T − f_S‖² per row for target="logits"
Y = torch.tensor([0, 1, -1])


@pytest.mark.parametrize(
    "weighting,params,w",
    [
        ("uniform", {}, [1.0, 1.0, 1.0]),
        # row 2 is unlabelled: the teacher's argmax (class 0) picks its weight
        ("class_table", {"class_weights": [1.0, 3.0]}, [1.0, 3.0, 1.0]),
        ("confidence", {}, [max(softmax(r)) for r in WT]),
        ("column", {}, [0.5, 0.0, 2.0]),
    ],
)
def test_weighted_output_mse_weightings(weighting, params, w):
    loss = build_loss("weighted_output_mse", weighting=weighting, **params)
    batch = {"y": Y, "w": torch.tensor([0.5, 0.0, 2.0])}
    expected = sum(wi * d for wi, d in zip(w, D)) / sum(w)
    assert loss(out(WS), out(WT), batch).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_output_mse_reduction_and_probs_target():
    loss = build_loss("weighted_output_mse", weighting="column")
    batch = {"y": Y, "w": torch.tensor([1.0, 2.0, 3.0])}
    scaled = {"y": Y, "w": torch.tensor([10.0, 20.0, 30.0])}
    # a weighted *mean*: scaling all weights leaves it unchanged; all-zero weights give 0
    assert loss(out(WS), out(WT), batch).item() == pytest.approx((1 + 8 + 12) / 6)
    assert loss(out(WS), out(WT), scaled).item() == pytest.approx((1 + 8 + 12) / 6)
    s = out(WS)
    zero = loss(s, out(WT), {"w": torch.zeros(3)})
    assert zero.item() == 0.0
    zero.backward()
    assert torch.equal(s.logits.grad, torch.zeros(3, 2))

    probs = build_loss("weighted_output_mse", target="probs", temperature=2.0)
    d = [sum((a - b) ** 2 for a, b in zip(softmax(t, 2), softmax(r, 2))) for r, t in zip(WS, WT)]
    assert probs(out(WS), out(WT), {}).item() == pytest.approx(sum(d) / 3, rel=1e-6)


def test_weighted_output_mse_validation():
    with pytest.raises(
        SpecError,
        match="'weighting' = 'confidnce' is invalid: Input should be 'uniform', 'class_table', 'confidence' or 'column'",
    ):
        build_loss("weighted_output_mse", weighting="confidnce")
    with pytest.raises(SpecError, match="needs class_weights"):
        build_loss("weighted_output_mse", weighting="class_table")
    with pytest.raises(SpecError, match="only used with weighting='class_table'"):
        build_loss("weighted_output_mse", class_weights=[1.0, 2.0])
    with pytest.raises(
        SpecError, match=r"parameter 'class_weights\[1\]' = -2.0 is invalid: Input should be greater than or equal to 0"
    ):
        build_loss("weighted_output_mse", weighting="class_table", class_weights=[1.0, -2.0])
    with pytest.raises(KdrayError, match="class_weights has 3 entries but the logits have 2 classes"):
        build_loss("weighted_output_mse", weighting="class_table", class_weights=[1.0, 1.0, 1.0])(
            out(WS), out(WT), {"y": Y}
        )
    with pytest.raises(KdrayError, match=r"needs per-sample weights batch\['w'\]"):
        build_loss("weighted_output_mse", weighting="column")(out(WS), out(WT), {"y": Y})


def test_build_loss_suggests_parameter_names():
    with pytest.raises(SpecError, match="has no parameter 'temprature'; did you mean 'temperature'\\?"):
        build_loss("hinton_kl", temprature=2)
    with pytest.raises(KdrayError, match="did you mean 'hinton_kl'"):
        build_loss("hinton")


# ---------------------------------------------------------------- hooks


def test_capture_reads_outputs_and_removes_hooks():
    torch.manual_seed(0)
    model = create_model("cnn_small", image_size=8)
    with capture(model, ["features.1", "head"]) as feats:
        model(torch.randn(2, 1, 8, 8))
    assert feats["features.1"].shape == (2, 64, 2, 2) and feats["head"].shape == (2, 128)
    assert all(not m._forward_hooks for m in model.modules())
    # paths are those of the user's model also through a (Distributed)DataParallel wrapper
    with capture(nn.DataParallel(model), ["head"]) as feats:
        nn.DataParallel(model)(torch.randn(3, 1, 8, 8))
    assert feats["head"].shape == (3, 128)


def test_forward_with_features_embedding_is_the_classifier_input():
    torch.manual_seed(0)
    model = create_model("mlp_32", image_size=8).eval()
    x = torch.randn(3, 1, 8, 8)
    o = forward_with_features(model, x, ["layers.0"], embedding=True)
    assert torch.allclose(o.embedding, model.embed(x)) and torch.allclose(o.logits, model(x))
    assert set(o.features) == {"layers.0"}
    assert forward_with_features(model, x).embedding is None


def test_bad_layer_path_lists_close_names():
    model = create_model("cnn_small", image_size=8)
    expected = (
        r"no module 'features\.3'; did you mean 'features\.1' or 'features\.0'.*feature layers are: features\.0, "
    )
    with pytest.raises(KdrayError, match=expected + r"features\.1, head"):
        with capture(model, ["features.3"]):
            pass
    hint = build_loss("feature_hint", student_layer="layers.1", teacher_layer="featurs.1")
    with pytest.raises(KdrayError, match=r"teacher VGGLike has no module 'featurs\.1'; did you mean 'features\.1'"):
        hint.setup(create_model("mlp_32", image_size=8), model, torch.randn(2, 1, 8, 8))


# ---------------------------------------------------------------- feature_hint


def width(feature: torch.Tensor) -> int:
    return feature.shape[1] if feature.dim() == 4 else feature.shape[-1]


@pytest.mark.parametrize(
    "teacher,t_layer,student,s_layer,kind",
    [
        ("cnn_small", "features.1", "mlp_512", "layers.1", nn.Linear),  # 4-D vs 2-D: GAP the map
        ("cnn_large", "features.2", "cnn_small", "features.1", nn.Conv2d),  # 4-D vs 4-D: other width and H×W
        ("cnn_large", "features.0", "cnn_small", "features.1", nn.Conv2d),  # the teacher's map is the larger
        ("vit_small", "blocks.5", "gru_small", "encoder", nn.Linear),  # 3-D vs 3-D: mean over sequence
        ("gru_large", "encoder", "vit_tiny", "blocks.1", nn.Linear),
        ("cnn_small", "features.1", "vit_tiny", "blocks.3", nn.Linear),  # 4-D vs 3-D
    ],
)
def test_feature_hint_projection_shapes(teacher, t_layer, student, s_layer, kind):
    torch.manual_seed(0)
    t_model = create_model(teacher, image_size=28).eval()
    s_model = create_model(student, image_size=28)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        t_out = forward_with_features(t_model, x, [t_layer])
        s_feat = forward_with_features(s_model.eval(), x, [s_layer]).features[s_layer]
    s_model.train()
    t_feat = t_out.features[t_layer]
    loss = build_loss("feature_hint", student_layer=s_layer, teacher_layer=t_layer)
    assert loss.student_layers == (s_layer,) and loss.teacher_layers == (t_layer,)
    loss.setup(s_model, t_model, x)
    assert type(loss.proj) is kind
    w = loss.proj.weight
    assert (w.shape[0], w.shape[1]) == (width(t_feat), width(s_feat))
    assert s_model.training and not t_model.training  # setup restored the modes
    value = loss(forward_with_features(s_model, x, loss.student_layers), t_out, {})
    value.backward()
    assert torch.isfinite(value) and w.grad.abs().sum() > 0
    if kind is nn.Conv2d:  # the 4-D cases must exercise pooling to the smaller map
        assert s_feat.shape[2:] != t_feat.shape[2:]


def test_feature_hint_pools_the_larger_map_to_the_smaller():
    loss = build_loss("feature_hint", student_layer="s", teacher_layer="t")
    loss.proj = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        loss.proj.weight.fill_(1.0)
    s = torch.arange(16.0).reshape(1, 1, 4, 4)  # 2x2 block means: 2.5, 4.5, 10.5, 12.5
    t = torch.tensor([[[[2.5, 4.5], [10.5, 13.5]]]])
    value = loss(Outputs(torch.zeros(1, 2), {"s": s}), Outputs(torch.zeros(1, 2), {"t": t}), {})
    assert value.item() == pytest.approx(1.0 / 4)


def test_feature_hint_value_is_mse_after_projection():
    loss = build_loss("feature_hint", student_layer="s", teacher_layer="t")
    loss.proj = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        loss.proj.weight.copy_(torch.tensor([[1.0, 2.0]]))
    s = Outputs(torch.zeros(2, 3), {"s": torch.tensor([[[1.0, 1.0], [3.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])})
    t = Outputs(torch.zeros(2, 3), {"t": torch.tensor([[1.0], [2.0]])})
    # row 0: mean over the sequence -> [2, 1] -> 2 + 2 = 4, error 3; row 1: 0, error 2 -> (9 + 4) / 2
    assert loss(s, t, {}).item() == pytest.approx(6.5)


def test_feature_hint_cannot_bridge_5d():
    student = nn.Sequential(nn.Unflatten(1, (1, 1)), nn.Flatten(), nn.Linear(64, 10))
    loss = build_loss("feature_hint", student_layer="0", teacher_layer="features.1")
    with pytest.raises(KdrayError, match=r"student '0' \(2, 1, 1, 8, 8\) and teacher 'features.1' \(2, 64, 2, 2\)"):
        loss.setup(student, create_model("cnn_small", image_size=8), torch.randn(2, 1, 8, 8))


# ---------------------------------------------------------------- attention_transfer


def test_attention_transfer_hand_case():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], requires_grad=True)  # [1, 1, 2, 2]
    t = torch.tensor([[[[1.0, 0.0], [0.0, -1.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # [1, 2, 2, 2]
    q_s = [v * v for v in (1.0, 2.0, 3.0, 4.0)]
    q_s = [v / math.sqrt(sum(u * u for u in q_s)) for v in q_s]
    q_t = [0.5, 0.5, 0.5, 0.5]  # Σ_c A_c² = 1 everywhere
    dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(q_s, q_t)))
    loss = build_loss("attention_transfer", pairs=[["a", "b"]], beta=3.0)
    value = loss(Outputs(torch.zeros(1, 2), {"a": s}), Outputs(torch.zeros(1, 2), {"b": t}), {})
    assert value.item() == pytest.approx(3.0 / 2 * dist, rel=1e-6)
    # two pairs: averaged; the second pair (uniform maps of 2x2 vs 4x4, interpolated) contributes 0
    loss2 = build_loss("attention_transfer", pairs=[["a", "b"], ["c", "d"]], beta=3.0)
    value2 = loss2(
        Outputs(torch.zeros(1, 2), {"a": s, "c": torch.ones(1, 3, 2, 2)}),
        Outputs(torch.zeros(1, 2), {"b": t, "d": 2 * torch.ones(1, 5, 4, 4)}),
        {},
    )
    assert value2.item() == pytest.approx(3.0 / 2 * dist / 2, rel=1e-6)


def test_attention_transfer_needs_conv_maps():
    loss = build_loss("attention_transfer", pairs=[["layers.1", "features.1"]])
    with pytest.raises(KdrayError, match=r"needs conv feature maps.*student 'layers.1' gives \(2, 32\)"):
        loss.setup(
            create_model("mlp_32", image_size=8), create_model("cnn_small", image_size=8), torch.randn(2, 1, 8, 8)
        )
    with pytest.raises(SpecError, match="parameter 'pairs(\\[0\\])?' = .* is invalid"):
        build_loss("attention_transfer", pairs=["features.1"])


# ---------------------------------------------------------------- rkd


def emb_out(e: torch.Tensor) -> Outputs:
    return Outputs(logits=torch.zeros(len(e), 3), embedding=e)


def test_rkd_zero_for_equal_relations_positive_otherwise_and_scale_free():
    torch.manual_seed(0)
    t = torch.randn(6, 5)
    s = torch.randn(6, 3, requires_grad=True)
    loss = build_loss("rkd")
    assert loss(emb_out(t.clone()), emb_out(t), {}).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(emb_out(3.0 * t), emb_out(t), {}).item() == pytest.approx(0.0, abs=1e-5)
    value = loss(emb_out(s), emb_out(t), {})
    assert value.item() > 0
    value.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    distance = build_loss("rkd", angle_weight=0.0)
    base = distance(emb_out(s), emb_out(t), {}).item()
    assert base > 0
    assert distance(emb_out(7.0 * s), emb_out(t), {}).item() == pytest.approx(base, rel=1e-5)
    assert distance(emb_out(s), emb_out(0.1 * t), {}).item() == pytest.approx(base, rel=1e-5)


def test_rkd_distance_and_angle_hand_cases():
    s = torch.tensor([[0.0], [1.0], [3.0]])
    t = torch.tensor([[0.0], [1.0], [2.0]])
    # s distances 1, 3, 2 / mean 2; t distances 1, 2, 1 / mean 4/3 -> diffs .25, 0, .25 -> huber .03125
    distance = build_loss("rkd", distance_weight=1.0, angle_weight=0.0)
    assert distance(emb_out(s), emb_out(t), {}).item() == pytest.approx(2 * 0.03125 / 3, rel=1e-5)

    s2 = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)]
    t2 = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0)]

    def cos(p, i, j, k):
        a = (p[i][0] - p[j][0], p[i][1] - p[j][1])
        b = (p[k][0] - p[j][0], p[k][1] - p[j][1])
        return (a[0] * b[0] + a[1] * b[1]) / math.hypot(*a) / math.hypot(*b)

    triplets = [(i, j, k) for i in range(3) for j in range(3) for k in range(3) if len({i, j, k}) == 3]
    diffs = [cos(s2, *tr) - cos(t2, *tr) for tr in triplets]
    huber = [0.5 * d * d if abs(d) < 1 else abs(d) - 0.5 for d in diffs]
    angle = build_loss("rkd", distance_weight=0.0, angle_weight=2.0)
    got = angle(emb_out(torch.tensor(s2)), emb_out(torch.tensor(t2)), {}).item()
    assert len(triplets) == 6 and got > 0
    assert got == pytest.approx(2.0 * sum(huber) / 6, rel=1e-5)


def test_rkd_falls_back_to_logits_without_a_teacher_embedding():
    torch.manual_seed(0)
    s_logits, t_logits = torch.randn(5, 4), torch.randn(5, 4)
    loss = build_loss("rkd")
    with_emb = Outputs(s_logits, embedding=torch.randn(5, 8))
    cached_teacher = Outputs(t_logits)
    expected = loss(Outputs(s_logits), Outputs(t_logits), {}).item()
    assert loss(with_emb, cached_teacher, {}).item() == pytest.approx(expected)
    assert loss.needs_embedding


# ---------------------------------------------------------------- dkd


def dkd_hand(s, t, target, alpha, beta, T):
    ps, pt = softmax(s, T), softmax(t, T)
    tckd = kl([pt[target], 1 - pt[target]], [ps[target], 1 - ps[target]])
    rest = [k for k in range(len(s)) if k != target]
    nckd = kl(softmax([t[k] for k in rest], T), softmax([s[k] for k in rest], T))
    return T * T * (alpha * tckd + beta * nckd)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_dkd_matches_hand_computation(T):
    s = S + [[9.0, 9.0, 9.0]]
    t = T_ + [[0.0, 0.0, 5.0]]
    y = torch.tensor([2, 0, -1])  # the unlabelled row is ignored
    loss = build_loss("dkd", alpha=0.5, beta=2.0, temperature=T)
    expected = (dkd_hand(S[0], T_[0], 2, 0.5, 2.0, T) + dkd_hand(S[1], T_[1], 0, 0.5, 2.0, T)) / 2
    assert loss(out(s), out(t), {"y": y}).item() == pytest.approx(expected, rel=1e-5)
    # the paper's identity: KD = TCKD + (1 − p_t^T)·NCKD (per row)
    row_kd = T * T * kl(softmax(T_[0], T), softmax(S[0], T))
    pt = softmax(T_[0], T)[2]
    tckd = dkd_hand(S[0], T_[0], 2, 1.0, 0.0, T)
    nckd = dkd_hand(S[0], T_[0], 2, 0.0, 1.0, T)
    assert row_kd == pytest.approx(tckd + (1 - pt) * nckd, rel=1e-9)


def test_dkd_unlabelled_batch_is_zero():
    s = out(S)
    value = build_loss("dkd")(s, out(T_), {"y": torch.tensor([-1, -1])})
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(s.logits.grad, torch.zeros(2, 3))
