"""Train with any advfeat method under PyTorch Lightning (``pip install "advfeat[lightning]"``).

::

    import lightning as L
    from advfeat.integrations.lightning import MethodModule

    module = MethodModule(model, "afan", lr=0.1, epochs=200)
    L.Trainer(max_epochs=200).fit(module, train_loader, val_loader)
    model = module.eval_model()          # e.g. the main BN branch of a multi-branch model

The method does exactly what it does in ``advfeat train``: ``prepare`` once, its loss and logs
each step, ``on_epoch_end`` after each epoch (logged as ``epoch/<key>``), its parameter groups
in SGD with the papers' CIFAR recipe and a per-step cosine or multistep schedule
(:func:`advfeat.train.schedule.lr_factor`). Validation reports ``val_acc`` of ``eval_model``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from advfeat.errors import AdvfeatError
from advfeat.methods import Method, build_method
from advfeat.train.schedule import lr_factor

try:
    import lightning as L
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise AdvfeatError(
        'advfeat.integrations.lightning needs Lightning: pip install "advfeat[lightning]"'
    ) from err

__all__ = ["MethodModule"]


class MethodModule(L.LightningModule):
    """A LightningModule that trains ``model`` with an advfeat method.

    Args:
        model: a classifier taking images in [0, 1] (normalization inside the model).
        method: a method name (see ``advfeat methods``) or a built :class:`Method`.
        method_options: options for a method given by name.
        lr, momentum, weight_decay, nesterov: SGD settings (defaults: the papers' CIFAR recipe).
        epochs: length of the run for the schedule; ``None`` keeps the learning rate constant.
        schedule, milestones, gamma, warmup_epochs: as in ``advfeat train``'s config.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | Method = "standard",
        *,
        method_options: dict[str, Any] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        epochs: int | None = None,
        schedule: str = "cosine",
        milestones: tuple[float, ...] = (0.5, 0.75),
        gamma: float = 0.1,
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(method, Method):
            if method_options:
                raise AdvfeatError("method_options are for a method given by name")
            self.method = method
        else:
            self.method = build_method(method, **(method_options or {}))
        self.model = self.method.prepare(model)
        self.lr = lr
        self.sgd: dict[str, Any] = {
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        self.schedule: dict[str, Any] = {
            "total_epochs": epochs,
            "schedule": schedule if epochs is not None else "constant",
            "milestones": list(milestones),
            "gamma": gamma,
            "warmup_epochs": warmup_epochs,
        }

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def eval_model(self) -> nn.Module:
        """The model to evaluate or deploy (the method's choice, e.g. the main BN branch)."""
        return self.method.eval_model(self.model)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self.method(self.model, x, y)
        self.log("train_loss", out.loss.detach(), prog_bar=True)
        if out.logits is not None:
            acc = (out.logits.argmax(1) == y).float().mean()
            self.log("train_acc", acc, prog_bar=True)
        for key, value in out.log_values.items():  # tensors: Lightning reads them when it logs
            self.log(f"train/{key}", value)
        return out.loss

    def on_train_epoch_end(self) -> None:
        for key, value in self.method.on_epoch_end(self.model, self.current_epoch).items():
            self.log(f"epoch/{key}", float(value))

    @torch.no_grad()
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        acc = (self.eval_model()(x).argmax(1) == y).float().mean()
        self.log("val_acc", acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        groups = self.method.parameter_groups(self.model, lr=self.lr)  # keeps per-group lr scales
        opt = torch.optim.SGD(groups, lr=self.lr, **self.sgd)
        if self.schedule["total_epochs"] is None:
            return opt
        steps = self.trainer.estimated_stepping_batches
        epochs = self.schedule["total_epochs"]

        def factor(step: int) -> float:
            return lr_factor(step * epochs / max(steps, 1), **self.schedule)

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
