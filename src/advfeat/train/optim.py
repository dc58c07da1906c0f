"""The optimiser of a run: SGD with momentum (the papers' recipes) or AdamW (Loshchilov & Hutter,
ICLR 2019: weight decay decoupled from the adaptive step)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from advfeat.errors import AdvfeatError, unknown_name

__all__ = ["OPTIMIZERS", "build_optimizer"]

OPTIMIZERS = ("sgd", "adamw")


def build_optimizer(
    name: str,
    groups: Iterable[Any],
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    betas: tuple[float, float] | list[float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """``sgd`` (momentum, optional Nesterov) or ``adamw`` (``betas``) over parameter ``groups``."""
    if name == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
        )
    if name == "adamw":
        groups = list(groups)
        sgd_only = sorted(
            {k for g in groups if isinstance(g, dict) for k in g} & {"momentum", "nesterov"}
        )
        if sgd_only:
            raise AdvfeatError(
                f"a parameter group sets {', '.join(sgd_only)} (e.g. l-alfa's "
                f"method_options.eta_momentum), which only optimizer=sgd has; use optimizer=sgd "
                f"or leave that option unset"
            )
        b = tuple(float(v) for v in betas)
        if len(b) != 2 or not all(0 <= v < 1 for v in b):
            raise AdvfeatError(f"adam_betas must be two numbers in [0, 1), got {list(betas)!r}")
        return torch.optim.AdamW(groups, lr=lr, betas=(b[0], b[1]), weight_decay=weight_decay)
    raise unknown_name("optimizer", name, OPTIMIZERS)
