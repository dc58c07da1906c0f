"""Several seeds of one arm as one model (``benchmarks/gpu_check_packing.py``): stacked weights
and a vectorised forward pass train exactly the models that separate steps train."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check_packing as packing


def test_packed_seeds_train_like_separate_models_in_float64() -> None:
    args = argparse.Namespace(model="resnet20", batch_size=8, image_size=8)
    device = torch.device("cpu")
    models = [m.double() for m in packing._models(3, args, device)]
    packed = packing.Packed(copy.deepcopy(models), device, amp=False)
    separate = packing.Separate(models, device, amp=False)
    x, y = packing._batches(3, args, device)
    x = x.double()
    start = [separate.weights(s).clone() for s in range(3)]
    for _ in range(2):
        packed.step(x, y)
        separate.step(x, y)
    for seed in range(3):
        moved = (separate.weights(seed) - start[seed]).norm()
        assert moved > 1e-3  # the steps trained the model
        torch.testing.assert_close(packed.weights(seed), separate.weights(seed), rtol=0, atol=1e-12)
    # each seed's BN statistics follow its own batches only
    name = "bn1.running_mean"
    for seed, model in enumerate(models):
        torch.testing.assert_close(packed.buffers[name][seed], dict(model.named_buffers())[name])
    # seeds differ: a packed model is S models, not one model S times
    assert (packed.weights(0) - packed.weights(1)).norm() > 1e-2
