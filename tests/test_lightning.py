"""The Lightning adapter trains exactly what the method's own loop trains."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from advfeat.errors import AdvfeatError
from advfeat.models import build_model
from advfeat.norm import branch_names

L = pytest.importorskip("lightning")
from advfeat.integrations.lightning import MethodModule  # noqa: E402


def _loader(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _trainer(**kw: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def test_lightning_step_equals_the_plain_loop_step() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=4, image_size=16)
    reference = copy.deepcopy(model)
    module = MethodModule(model, "standard", lr=0.05, weight_decay=0.0)
    _trainer(max_steps=1).fit(module, _loader())

    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    x, y = next(iter(_loader()))
    loss = torch.nn.functional.cross_entropy(reference(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    trained = module.model.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_lightning_runs_a_multibranch_method_and_logs_it() -> None:
    torch.manual_seed(0)
    module = MethodModule(
        build_model("resnet20", num_classes=4, image_size=16),
        "advprop",
        method_options={"eps": 1},
        epochs=2,
    )
    assert len(branch_names(module.model)) == 2
    trainer = _trainer(max_epochs=2)
    trainer.fit(module, _loader(), _loader(16))
    logged = trainer.callback_metrics
    assert math.isfinite(float(logged["train_loss"]))
    assert {"train/loss_clean", "train/loss_adv", "val_acc"} <= set(logged)
    # cosine over the whole run: the last step's learning rate is close to 0
    assert trainer.optimizers[0].param_groups[0]["lr"] < 0.1 * 0.05
    with pytest.raises(AdvfeatError, match="no multi-branch BN"):
        branch_names(module.eval_model())  # the aux BNs are dropped for evaluation (Sec. 4.3)
