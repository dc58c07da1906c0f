"""Training: configuration, the trainer, checkpoints, schedules and distributed set-up."""

from advfeat.checkpoint import load_checkpoint, save_checkpoint
from advfeat.train.config import TrainConfig
from advfeat.train.trainer import Trainer, TrainingDiverged

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "load_checkpoint", "save_checkpoint"]
