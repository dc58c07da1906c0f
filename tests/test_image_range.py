"""Images in [0, 1]: checked by every attack, on the host outside training and, inside the
trainer's steps, on the device (:class:`ImageRange`), read after the first step and at the end of
each epoch, so that a captured step of a pixel method reads nothing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from advfeat.attacks.base import ImageRange, check_image_range, deferred_image_checks
from advfeat.errors import AdvfeatError
from advfeat.train import Trainer
from test_captured_steps import ReplayByCalling
from test_train_step_sync import counted_host_reads, tiny_config

CPU = torch.device("cpu")


def test_the_range_is_noted_on_the_device_and_reported_as_the_host_check_would() -> None:
    seen = ImageRange(CPU)
    seen.check()  # nothing seen: nothing to say
    with deferred_image_checks(seen), counted_host_reads() as reads:
        check_image_range(torch.full((2, 3), 0.25))
        check_image_range(torch.tensor([[0.0, 1.0]]))
    assert sum(reads.values()) == 0
    assert seen.bounds.tolist() == [0.0, 1.0]
    seen.check()
    with deferred_image_checks(seen):
        check_image_range(torch.tensor([-0.5, 2.0]))
    with pytest.raises(AdvfeatError) as deferred:
        seen.check()
    with pytest.raises(AdvfeatError) as direct:
        check_image_range(torch.tensor([-0.5, 1.0, 2.0]))
    assert str(deferred.value) == str(direct.value)
    assert "[-0.5, 2]" in str(deferred.value) and "Normalize" in str(deferred.value)
    with deferred_image_checks(seen):
        check_image_range(torch.tensor([0.5, math.nan]))
    with pytest.raises(AdvfeatError, match="NaN or infinite"):
        seen.check()
    with deferred_image_checks(seen), pytest.raises(AdvfeatError, match="floating-point"):
        check_image_range(torch.zeros(2, dtype=torch.uint8))  # the dtype is still checked at once


@pytest.mark.parametrize("cuda_graph", ["false", "true"])
@pytest.mark.parametrize("method", ["pgd-at", "trades"])
def test_normalized_images_stop_a_pixel_method_after_its_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, cuda_graph: str
) -> None:
    """Images in [-1, 1] (normalized outside the model) are refused after the first step of
    the run, eager or captured, in the words of the attack's own check."""
    from advfeat.train import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "CudaGraphs", lambda device: ReplayByCalling())
    monkeypatch.setattr(trainer_module, "run_refusal", lambda cfg, device, refusal, **kw: refusal)
    cfg = tiny_config(method=method, device_data="true", cuda_graph=cuda_graph)
    trainer = Trainer(cfg, tmp_path / "run")
    forward = trainer.method.forward
    steps: list[int] = []

    def normalized(model: Any, x: Tensor, y: Tensor) -> Any:
        steps.append(1)
        return forward(model, x * 2 - 1, y)

    trainer.method.forward = normalized  # type: ignore[method-assign]
    with pytest.raises(AdvfeatError, match=r"images must lie in \[0, 1\].*Normalize"):
        trainer.fit()
    assert len(steps) == 1
