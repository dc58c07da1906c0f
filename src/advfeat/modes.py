"""Train/eval flags of a model's modules: change them for a block, restore each one afterwards.

One context manager for every place that switches modes temporarily (attacks, evaluation, the
methods' head passes), so that a module left in a mode of its own keeps it:

>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
>>> model[1].eval()
Dropout(p=0.5, inplace=False)
>>> with eval_mode(model):
...     model.training, model[0].training
(False, False)
>>> model.training, model[1].training
(True, False)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode", "restored_train_flags"]


@contextmanager
def restored_train_flags(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Record the ``training`` flag of each module in ``modules`` and restore it on exit."""
    flags = [(m, m.training) for m in modules]
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode and restore each one's flag afterwards."""
    with restored_train_flags(model.modules()):
        model.eval()
        yield model
