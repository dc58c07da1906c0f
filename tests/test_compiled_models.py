"""Feature methods on a ``torch.compile``-d model: a compiled graph skips forward hooks added
after it was traced, so the passes that capture a site's output run the eager module."""

from __future__ import annotations

import copy

import pytest
import torch

from advfeat.methods import build_method
from advfeat.models import build_model
from advfeat.sites import capture_features, uncompiled


def test_a_compiled_graph_skips_hooks_added_after_tracing() -> None:
    """The premise: on a traced compiled model a capture sees nothing."""
    model = build_model("resnet20", num_classes=3, image_size=8).eval()
    compiled = torch.compile(model, backend="eager")
    x = torch.rand(2, 3, 8, 8)
    compiled(x)  # traced without hooks
    with capture_features(model, ["layer3"]) as got:
        compiled(x)
    assert got.get("layer3") is None
    assert uncompiled(compiled) is model


@pytest.mark.parametrize("name", ["alfa", "afan"])
def test_feature_methods_give_the_eager_loss_and_gradients_on_a_compiled_model(name: str) -> None:
    torch.manual_seed(0)
    base = build_model("resnet20", num_classes=3, image_size=8).train()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    results = []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        run = torch.compile(model, backend="eager") if compiled else model
        if compiled:
            run(x)  # traced before the method's hooks exist, as in the trainer
        method = build_method(name, site="layer3", alpha=0.01)
        torch.manual_seed(1)
        out = method(run, x, y)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
