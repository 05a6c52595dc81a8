"""Every registered model honours the contract: logits, embed + classifier, hookable feature layers."""

from __future__ import annotations

import pytest
import torch

from kdray.core.errors import KdrayError
from kdray.core.registry import Registry
from kdray.models import MODELS, count_parameters, create_model

# image classifiers: the causal LMs (family causal_lm) have their own contract in tests/models/test_lm.py
IMAGE_MODELS = [n for n in MODELS.names() if MODELS.meta(n).get("family") != "causal_lm"]


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize("size,channels", [(28, 1), (8, 3)])
def test_contract(name, size, channels):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=channels, image_size=size)
    x = torch.randn(5, channels, size, size)
    logits = model(x)
    assert logits.shape == (5, 7)
    model.eval()
    assert torch.allclose(model(x), model.classifier(model.embed(x)), atol=1e-5)
    assert isinstance(model.classifier, torch.nn.Linear)
    assert model.classifier_name == "classifier"

    modules = dict(model.named_modules())
    assert model.feature_layers, "a model must expose feature layers for hints"
    outputs = {}
    hooks = [
        modules[p].register_forward_hook(lambda m, i, o, p=p: outputs.__setitem__(p, o)) for p in model.feature_layers
    ]
    model(x)
    for h in hooks:
        h.remove()
    for path in model.feature_layers:
        assert isinstance(outputs[path], torch.Tensor) and outputs[path].shape[0] == 5, path


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_channels=1, image_size=8)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(6, 1, 8, 8)), torch.tensor([0, 1, 2, 3, 0, 1]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert MODELS.get(name).__doc__, "builders document their size"


def test_sizes_are_ordered_within_a_family():
    sizes = {n: count_parameters(create_model(n)) for n in MODELS.names()}
    assert sizes["mlp_64"] < sizes["mlp_128"] < sizes["mlp_512"] < sizes["mlp_1024"]
    convs = {
        n: sum(isinstance(m, torch.nn.Conv2d) for m in create_model(n).modules()) for n in ("cnn_small", "cnn_large")
    }
    assert convs["cnn_small"] < convs["cnn_large"], (
        "cnn_large is the deeper one (cnn_small's flat head has the parameters)"
    )
    assert sizes["gru_small"] < sizes["gru_large"]
    assert sizes["vit_tiny"] < sizes["vit_small"]


def test_unknown_model_suggests_close_names():
    with pytest.raises(KdrayError, match="did you mean 'cnn_small'"):
        create_model("cnn_smal")


def test_unknown_option_names_the_model():
    with pytest.raises(KdrayError, match="mlp_512"):
        create_model("mlp_512", widht=3)


def test_registry_basics():
    reg = Registry("widget")

    @reg.register("round_one", colour="red")
    def round_one():
        return 1

    assert "round_one" in reg and reg.names() == ["round_one"] and len(reg) == 1
    assert reg.build("round_one") == 1 and reg.meta("round_one") == {"colour": "red"}
    with pytest.raises(ValueError, match="twice"):
        reg.register("round_one")(round_one)
    with pytest.raises(KdrayError, match="unknown widget 'round_on'; did you mean 'round_one'"):
        reg.get("round_on")
