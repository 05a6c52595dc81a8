"""``run.channels_last``: convolutional networks train in channels_last, and one that cannot keeps its layout."""

from __future__ import annotations

import torch
import torch.nn as nn

from kdray.contracts.method import Method
from kdray.engine.loop import channels_last
from kdray.models import create_model


class ViewNet(nn.Module):
    """A classic small CNN that flattens with ``.view``: it cannot run on a channels_last activation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


def test_a_registry_cnn_and_its_frozen_teacher_go_channels_last_and_an_mlp_is_left_alone(capsys):
    method = Method(create_model("cnn_small", num_classes=10, in_channels=1, image_size=28))
    method.keep_frozen("teacher", create_model("resnet_small", num_classes=10, in_channels=1, image_size=28))
    method.keep_frozen("mlp", create_model("mlp_32", num_classes=10, in_channels=1, image_size=28))
    sample = torch.randn(2, 1, 28, 28)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    assert channels_last(method, sample) == ["model", "teacher"]
    conv = [m for m in method.model.modules() if isinstance(m, nn.Conv2d)][-1]  # the first has 1 input channel
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert method.model.training, "the trial forward leaves the training mode as it was"
    assert all(torch.equal(before[k], v) for k, v in method.model.state_dict().items()), "same values"
    assert channels_last(method, torch.randn(2, 12)) == [], "not an image batch: nothing changes"
    assert capsys.readouterr().err == ""


def test_a_network_that_views_a_conv_output_keeps_the_default_layout_and_says_why(capsys):
    method = Method(ViewNet())
    x = torch.randn(5, 1, 8, 8)
    expected = method.model(x)
    assert channels_last(method, x[:2]) == []
    assert method.model.conv.weight.is_contiguous()
    assert "run.channels_last: the model keeps the default memory layout" in capsys.readouterr().err
    assert torch.allclose(method.model(x), expected), "it still runs, as before"
