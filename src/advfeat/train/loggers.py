"""Where a run's per-epoch metrics go besides ``history.csv`` (always written): TensorBoard
(``pip install 'advfeat[tensorboard]'``) and Weights & Biases (``pip install 'advfeat[wandb]'``;
``WANDB_MODE=offline`` keeps it local). Chosen with ``--set loggers=[tensorboard,wandb]``; a
missing package is reported before training starts."""

from __future__ import annotations

import importlib
import importlib.util
import numbers
from pathlib import Path
from typing import Any, Protocol

from advfeat.errors import AdvfeatError, unknown_name

__all__ = [
    "LOGGERS",
    "EpochLogger",
    "InstalledLoggers",
    "Loggers",
    "TensorBoardLogger",
    "WandbLogger",
    "check_loggers",
]


class EpochLogger(Protocol):
    def log(self, row: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and k != "epoch"
    }


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise AdvfeatError(
            f"the {extra} logger needs an optional package: pip install 'advfeat[{extra}]'"
        ) from None


class TensorBoardLogger:
    """Scalars per epoch into ``RUN/tensorboard`` (``tensorboard --logdir RUN/tensorboard``)."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", f"```\n{config}\n```", 0)

    def log(self, row: dict[str, Any], step: int) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run (project ``advfeat``, named after the run folder) with the config."""

    def __init__(self, out: Path, config: dict[str, Any]) -> None:
        wandb = _require("wandb", "wandb")
        self.run = wandb.init(
            project="advfeat", name=out.name, dir=str(out), config=config, reinit=True
        )

    def log(self, row: dict[str, Any], step: int) -> None:
        self.run.log(_scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


LOGGERS: dict[str, type] = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


def check_loggers(names: object) -> None:
    """Known names whose packages are installed (checked before a run writes anything)."""
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise AdvfeatError(f"loggers is a list such as [tensorboard, wandb], got {names!r}")
    for name in names:
        if name not in (*LOGGERS, "csv"):
            raise unknown_name("logger", name, [*LOGGERS, "csv"])
        if name != "csv" and importlib.util.find_spec(name) is None:
            raise AdvfeatError(
                f"the {name} logger needs an optional package: pip install 'advfeat[{name}]'"
            )


class InstalledLoggers:
    """The check of the ``loggers`` option (:func:`check_loggers`), declared on
    :class:`~advfeat.train.config.TrainConfig`'s field."""

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        check_loggers(value)
        return value


class Loggers:
    """The chosen loggers, fed every finished epoch's row (as ``history.csv`` gets it)."""

    def __init__(self, names: list[str], out: Path, config: dict[str, Any]) -> None:
        check_loggers(names)
        self.items: list[EpochLogger] = [LOGGERS[n](out, config) for n in names if n != "csv"]

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("epoch", 0))
        for logger in self.items:
            logger.log(row, step)

    def close(self) -> None:
        for logger in self.items:
            logger.close()
