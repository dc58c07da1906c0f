"""Datasets: the embedded ``shapes`` generator, real datasets, splits and augmentation.

>>> from advfeat.data import build_dataset
>>> bundle = build_dataset("shapes", n_train=64, n_test=16, image_size=16)
>>> image, label = bundle.train[0]
>>> tuple(image.shape), bundle.num_classes
((3, 16, 16), 8)
"""

from advfeat.data import corruptions_released as _released  # noqa: F401  (registers cifar10-c, ...)
from advfeat.data import dense, real, shapes
from advfeat.data.bundle import (
    DATASETS,
    ArrayDataset,
    DatasetBundle,
    build_dataset,
    detection_collate,
    split_indices,
)
from advfeat.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CifarAugment,
    HorizontalFlip,
    random_crop_flip,
)

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayDataset",
    "CifarAugment",
    "DatasetBundle",
    "HorizontalFlip",
    "build_dataset",
    "dense",
    "detection_collate",
    "random_crop_flip",
    "real",
    "shapes",
    "split_indices",
]
