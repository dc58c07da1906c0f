"""One task registry: a dataset's task name builds its Task for training and evaluation alike;
classification is a Task there too, and every task's model is prepared with ``prepare_with``."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from advfeat.data import build_dataset
from advfeat.errors import AdvfeatError
from advfeat.eval.context import EvalData
from advfeat.eval.loading import eval_data
from advfeat.tasks import (
    TASKS,
    ClassificationTask,
    DetectionTask,
    SegmentationTask,
    build_task,
    model_task,
)
from advfeat.train.build import build_parts, check_config, input_shape
from advfeat.train.config import TrainConfig

SEGMENTATION = {"n_train": 4, "n_test": 2, "image_size": 32, "max_objects": 1}


def test_every_task_name_builds_its_class_with_its_classes() -> None:
    assert TASKS.names() == ["classification", "detection", "segmentation"]
    for name, cls in (
        ("classification", ClassificationTask),
        ("detection", DetectionTask),
        ("segmentation", SegmentationTask),
    ):
        task = build_task(name, 7)
        assert type(task) is cls and task.name == name and task.num_classes == 7
    with pytest.raises(AdvfeatError, match="did you mean 'detection'"):
        build_task("detektion", 3)


def test_a_model_name_says_its_task() -> None:
    assert model_task("fasterrcnn_tiny") == "detection"
    assert model_task("deeplabv3plus_tiny") == "segmentation"
    assert model_task("resnet20") == "classification"
    assert model_task("timm:resnet18") == "classification"


def test_check_config_refuses_a_method_without_the_model_task_version() -> None:
    cfg = TrainConfig(method="advprop", model="fasterrcnn_tiny", dataset="shapes-det")
    with pytest.raises(AdvfeatError, match="detection trains with: afan, alfa, standard"):
        check_config(cfg, check_device=False)


@pytest.mark.parametrize(
    ("dataset", "model", "options", "cls"),
    [
        ("shapes", "resnet20", {"n_train": 8, "n_test": 4}, ClassificationTask),
        ("shapes-seg", "deeplabv3plus_tiny", SEGMENTATION, SegmentationTask),
    ],
)
def test_every_run_carries_its_task_and_is_prepared_with_its_context(
    dataset: str, model: str, options: dict[str, int], cls: type
) -> None:
    cfg = TrainConfig(method="afan", model=model, dataset=dataset, dataset_options=options)
    parts = build_parts(cfg)
    assert type(parts.task) is cls and parts.method.task is parts.task
    assert parts.task.num_classes == parts.data.num_classes
    # prepare_with (not prepare) ran: the method kept the shape of a training image
    assert parts.method.context.input_shape == input_shape(parts.data)
    assert parts.method.context.input_shape == tuple(parts.data.train[0][0].shape)


def test_evaluation_data_carries_the_task_that_training_builds() -> None:
    shapes = build_dataset("shapes", n_train=4, n_test=4, augment=False)
    data = eval_data(shapes)
    assert type(data.task) is ClassificationTask and data.task.num_classes == shapes.num_classes
    assert data.task_name == "classification" and data.dense_task is None
    segments = build_dataset("shapes-seg", augment=False, **SEGMENTATION)
    dense = eval_data(segments)
    assert type(dense.task) is SegmentationTask and dense.dense_task is dense.task
    assert dense.task.num_classes == segments.num_classes and dense.task_name == "segmentation"
    with pytest.raises(AdvfeatError, match="a classification task cannot evaluate segmentation"):
        eval_data(segments, ClassificationTask(segments.num_classes))
    with pytest.raises(AdvfeatError, match="a detection task cannot evaluate classification"):
        eval_data(shapes, DetectionTask(3))


def test_plain_evaluation_data_is_classification_of_its_classes() -> None:
    data = EvalData(test=TensorDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2)), num_classes=3)
    assert type(data.task) is ClassificationTask and data.task.num_classes == 3
    given = ClassificationTask(3)
    assert EvalData(test=data.test, num_classes=3, task=given).task is given
