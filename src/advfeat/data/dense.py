"""Real detection and segmentation datasets through ``torchvision.datasets``, as task items.

The dataset names ``voc-det``, ``coco``, ``voc-seg`` and ``cityscapes`` (:data:`advfeat.data.DATASETS`)
bundle them with ImageNet mean/std and the paper's augmentation (A-FAN §5-6).

Each class yields ``(image [3, H, W] float in [0, 1], target)`` like advfeat's embedded
``shapes-det`` / ``shapes-seg``: detection targets ``{"boxes": float32 [n, 4] xyxy,
"labels": int64 [n]}`` with labels ``1..C`` (0 = background), segmentation targets ``int64
[H, W]`` masks with 255 = ignore. Datasets are read from ``root`` (``download=True`` lets
torchvision fetch VOC; COCO and Cityscapes must be on disk). Resizing/cropping for training is
the user's (or the trainer's) pair transform ``transform(image, target)``.

:class:`SegmentationCrop` and :class:`PadTo` are ours, not ``torchvision.transforms.v2`` (checked
with torchvision 0.29): v2 would change the training crops and break resume of runs trained so
far. v2 has no "scale by a factor of the image's own size": ``ScaleJitter`` scales relative to a
fixed target size and truncates (``int``) where ours rounds, and its ``Resize`` antialiases
down-scaled images by default (ours is plain bilinear, as DeepLab's); ``RandomCrop(pad_if_needed=
True)`` pads the missing ``diff`` on *both* sides (a larger canvas, other crop offsets), where
ours pads bottom/right only so that :class:`PadTo` leaves evaluated pixels where they were. So
even from the same generator state (v2 also draws one scale, two offsets and one flip
from torch's global generator) a re-run or resumed training would see other crops.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision.transforms.functional import pil_to_tensor

from advfeat.data.bundle import DATASET_CHECKS, DATASETS, DatasetBundle, Task, split_indices
from advfeat.data.transforms import IMAGENET_MEAN, IMAGENET_STD, HorizontalFlip
from advfeat.errors import AdvfeatError

__all__ = [
    "CITYSCAPES_TRAIN_IDS",
    "VOC_CLASSES",
    "CityscapesSegmentation",
    "CocoDetection",
    "PadTo",
    "SegmentationCrop",
    "VOCDetection",
    "VOCSegmentation",
    "cityscapes",
    "coco",
    "voc_det",
    "voc_seg",
]

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

# Cityscapes label id -> train id (19 evaluated classes); every other id is ignored (255).
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

PairTransform = Callable[[Tensor, Any], tuple[Tensor, Any]]


def _image(pil: Any) -> Tensor:
    return pil_to_tensor(pil.convert("RGB")).float().div_(255.0)


def _root(root: str | Path, what: str) -> str:
    path = Path(root).expanduser()
    if not path.exists():
        raise AdvfeatError(f"{what} root {str(path)!r} does not exist")
    return str(path)


def _voc(reader: Any, root: str | Path, year: str, image_set: str, download: bool) -> Any:
    """torchvision's VOC ``reader`` (boxes or masks) over ``root/VOCdevkit/VOC<year>``."""
    where = str(root) if download else _root(root, "VOC")
    return reader(where, year=year, image_set=image_set, download=download)


class _Wrapped(Dataset):
    def __init__(self, base: Any, transform: PairTransform | None) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def convert(self, image: Any, target: Any) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        image, target = self.convert(*self.base[i])
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


class VOCDetection(_Wrapped):
    """Pascal VOC boxes (``year`` 2007/2012, ``image_set`` train/val/trainval/test).

    ``keep_difficult=False`` drops objects marked difficult, as VOC training usually does (the
    VOC07 protocol ignores them at test time).
    """

    def __init__(
        self, root: str | Path, *, year: str = "2007", image_set: str = "trainval",
        download: bool = False, keep_difficult: bool = False, transform: PairTransform | None = None,
    ) -> None:  # fmt: skip
        from torchvision.datasets import VOCDetection as TV

        super().__init__(_voc(TV, root, year, image_set, download), transform)
        self.keep_difficult = keep_difficult

    def convert(self, image: Any, target: Any) -> tuple[Tensor, Any]:
        objects = target["annotation"].get("object", [])
        objects = objects if isinstance(objects, list) else [objects]
        boxes, labels = [], []
        for obj in objects:
            if not self.keep_difficult and str(obj.get("difficult", "0")) == "1":
                continue
            b = obj["bndbox"]
            x1, y1, x2, y2 = (float(b[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([x1 - 1, y1 - 1, x2, y2])  # VOC is 1-based and inclusive
            labels.append(VOC_CLASSES.index(obj["name"]) + 1)
        return _image(image), {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }


class VOCSegmentation(_Wrapped):
    """Pascal VOC masks (21 classes with background; 255 on object boundaries)."""

    def __init__(
        self, root: str | Path, *, year: str = "2012", image_set: str = "train",
        download: bool = False, transform: PairTransform | None = None,
    ) -> None:  # fmt: skip
        from torchvision.datasets import VOCSegmentation as TV

        super().__init__(_voc(TV, root, year, image_set, download), transform)

    def convert(self, image: Any, target: Any) -> tuple[Tensor, Any]:
        return _image(image), torch.from_numpy(np.array(target, dtype=np.int64))


class CocoDetection(_Wrapped):
    """COCO boxes: ``images`` folder + ``annotations`` json (needs pycocotools).

    Category ids (1..90 with gaps) map to contiguous labels 1..80; crowd regions and boxes
    without area are dropped; ``[x, y, w, h]`` becomes ``[x1, y1, x2, y2]``.
    """

    def __init__(
        self, images: str | Path, annotations: str | Path, *, transform: PairTransform | None = None
    ) -> None:
        from torchvision.datasets import CocoDetection as TV

        base = TV(_root(images, "COCO images"), _root(annotations, "COCO annotations"))
        super().__init__(base, transform)
        ids = sorted(base.coco.getCatIds())
        self.label_of = {cat: i + 1 for i, cat in enumerate(ids)}
        self.class_names = ["background", *(base.coco.cats[c]["name"] for c in ids)]

    def convert(self, image: Any, target: Any) -> tuple[Tensor, Any]:
        boxes, labels = [], []
        for obj in target:
            x, y, w, h = obj["bbox"]
            if obj.get("iscrowd", 0) or w <= 1e-3 or h <= 1e-3:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[obj["category_id"]])
        return _image(image), {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }


class CityscapesSegmentation(_Wrapped):
    """Cityscapes fine annotations with the 19 train ids (others → 255); ``split`` train/val."""

    def __init__(
        self, root: str | Path, *, split: str = "train", transform: PairTransform | None = None
    ) -> None:
        from torchvision.datasets import Cityscapes

        base = Cityscapes(
            _root(root, "Cityscapes"), split=split, mode="fine", target_type="semantic"
        )
        super().__init__(base, transform)
        lut = np.full(256, 255, dtype=np.int64)
        for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
            lut[label_id] = train_id
        self.lut = lut

    def convert(self, image: Any, target: Any) -> tuple[Tensor, Any]:
        return _image(image), torch.from_numpy(self.lut[np.array(target, dtype=np.uint8)])


# --------------------------------------------------------------------------- pair transforms
class SegmentationCrop:
    """Training augmentation of DeepLab: random scale, pad (image 0, mask 255), random crop, flip.

    ``scale`` is the range of the random rescaling (DeepLab: 0.5-2.0); the crop is
    ``crop_size`` square (VOC 513, Cityscapes 768). Draws from torch's global generator.
    """

    def __init__(
        self,
        crop_size: int,
        *,
        scale: tuple[float, float] = (0.5, 2.0),
        ignore_index: int = 255,
        flip: bool = True,
    ) -> None:
        self.crop_size = int(crop_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ignore_index = ignore_index
        self.flip = flip

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = self.scale
        s = lo + (hi - lo) * float(torch.rand(()))
        h, w = image.shape[-2:]
        size = [max(1, round(h * s)), max(1, round(w * s))]
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
        image, mask = pad_pair(image, mask, self.crop_size, self.ignore_index)
        h, w = image.shape[-2:]
        top = int(torch.randint(0, h - self.crop_size + 1, ()))
        left = int(torch.randint(0, w - self.crop_size + 1, ()))
        image = image[:, top : top + self.crop_size, left : left + self.crop_size]
        mask = mask[top : top + self.crop_size, left : left + self.crop_size]
        if self.flip and bool(torch.rand(()) < 0.5):
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()


class PadTo:
    """Pad ``(image, mask)`` at the bottom/right to ``size`` (mask padding ignored), so that test
    images of different sizes stack into one batch without changing the evaluated pixels."""

    def __init__(self, size: int, ignore_index: int = 255) -> None:
        self.size = int(size)
        self.ignore_index = ignore_index

    def __call__(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h, w = image.shape[-2:]
        if h > self.size or w > self.size:
            raise AdvfeatError(
                f"a {h}x{w} test image does not fit the {self.size} px evaluation canvas; "
                f"set dataset_options.eval_size to at least {max(h, w)}"
            )
        return pad_pair(image, mask, self.size, self.ignore_index)


def pad_pair(image: Tensor, mask: Tensor, size: int, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Pad bottom/right to at least ``size`` × ``size``: image with 0, mask with ``ignore_index``."""
    h, w = image.shape[-2:]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        mask = F.pad(mask, (0, pw, 0, ph), value=ignore_index)
    return image, mask


# ------------------------------------------------------------------------- dataset registry
def _data_root(root: str | Path | None, name: str) -> Path:
    from advfeat.data.real import default_root

    return Path(root).expanduser() if root is not None else default_root() / name


def _split(
    make: Callable[[PairTransform | None], Dataset],
    *,
    val_fraction: float,
    seed: int,
    train_transform: PairTransform | None,
    val_transform: PairTransform | None = None,
) -> tuple[Dataset, Dataset | None]:
    """Train view (augmented) and, with ``val_fraction > 0``, a held-out validation view."""
    train = make(train_transform)
    if val_fraction == 0:
        return train, None
    train_idx, val_idx = split_indices(len(train), val_fraction, seed)  # type: ignore[arg-type]
    return Subset(train, train_idx.tolist()), Subset(make(val_transform), val_idx.tolist())


def _bundle(
    train: Dataset,
    val: Dataset | None,
    test: Dataset,
    *,
    task: Task,
    class_names: list[str],
    image_size: int,
) -> DatasetBundle:
    return DatasetBundle(
        train=train,
        val=val,
        test=test,
        num_classes=len(class_names),
        image_size=image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        task=task,
        class_names=class_names,
    )


def _require_voc(path: Path, year: str, download: bool) -> None:
    folder = path / "VOCdevkit" / f"VOC{year}"
    if not download and not folder.is_dir():
        raise AdvfeatError(
            f"Pascal VOC{year} not found: expected {str(folder)!r} (JPEGImages, Annotations, "
            f"SegmentationClass, ImageSets). Point --data-dir at the folder that holds 'VOCdevkit', "
            f"or pass download=True (--set dataset_options.download=true) to let torchvision "
            f"fetch it into {str(path)!r}"
        )


@DATASET_CHECKS.register("voc-det")
@DATASET_CHECKS.register("voc-seg")
def _check_voc(*, root: str | Path | None, year: str, download: bool, **_: Any) -> None:
    _require_voc(_data_root(root, "voc"), str(year), download)


@DATASETS.register("voc-det")
def voc_det(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: bool = True,
    download: bool = False,
    year: str = "2007",
    train_split: str = "trainval",
    test_split: str = "test",
    image_size: int = 600,
    keep_difficult: bool = False,
) -> DatasetBundle:
    """Pascal VOC detection (21 classes with background; A-FAN §5: VOC2007 trainval → test).

    Images keep their size; the detector resizes the shorter side to ``image_size`` (600, the
    VOC convention). Training flips horizontally when ``augment``. ``download=True`` fetches VOC
    with torchvision.
    """
    path = _data_root(root, "voc")
    year = str(year)
    _require_voc(path, year, download)

    def make(split: str) -> Callable[[PairTransform | None], Dataset]:
        return lambda t: VOCDetection(
            path, year=year, image_set=split, download=download,
            keep_difficult=keep_difficult, transform=t,
        )  # fmt: skip

    train, val = _split(
        make(train_split),
        val_fraction=val_fraction,
        seed=seed,
        train_transform=HorizontalFlip() if augment else None,
    )
    return _bundle(
        train, val, make(test_split)(None),
        task="detection", class_names=["background", *VOC_CLASSES], image_size=int(image_size),
    )  # fmt: skip


def _coco_root(root: str | Path | None, year: str, download: bool) -> Path:
    """The COCO folder, refused unless it holds the images and annotations of ``year`` and
    pycocotools is installed (COCO cannot be downloaded)."""
    path = _data_root(root, "coco")
    need = [
        path / f"train{year}",
        path / f"val{year}",
        path / "annotations" / f"instances_train{year}.json",
        path / "annotations" / f"instances_val{year}.json",
    ]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise AdvfeatError(
            f"COCO {year} not found under {str(path)!r} (missing {', '.join(missing)}). Download "
            f"train{year}.zip, val{year}.zip and annotations_trainval{year}.zip from "
            f"https://cocodataset.org/#download, unzip them into that folder and point "
            f"--data-dir at it (advfeat cannot download COCO)"
        )
    if download:
        raise AdvfeatError("COCO cannot be downloaded by torchvision; download it by hand")
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        raise AdvfeatError('COCO needs pycocotools: pip install "advfeat[detection]"') from None
    return path


@DATASET_CHECKS.register("coco")
def _check_coco(*, root: str | Path | None, year: str, download: bool, **_: Any) -> None:
    _coco_root(root, str(year), download)


@DATASETS.register("coco")
def coco(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: bool = True,
    download: bool = False,
    year: str = "2017",
    image_size: int = 800,
) -> DatasetBundle:
    """COCO detection (81 classes with background; A-FAN §5: train2017 → val2017).

    Expects ``root/train2017``, ``root/val2017`` and ``root/annotations/instances_*.json``
    (https://cocodataset.org/#download; torchvision cannot download COCO) and pycocotools
    (``pip install "advfeat[detection]"``). The detector resizes the shorter side to
    ``image_size`` (800, torchvision's default).
    """
    year = str(year)
    path = _coco_root(root, year, download)

    def make(split: str) -> Callable[[PairTransform | None], Dataset]:
        return lambda t: CocoDetection(
            path / f"{split}{year}",
            path / "annotations" / f"instances_{split}{year}.json",
            transform=t,
        )

    test = make("val")(None)
    train, val = _split(
        make("train"),
        val_fraction=val_fraction,
        seed=seed,
        train_transform=HorizontalFlip() if augment else None,
    )
    names = list(test.class_names)  # type: ignore[attr-defined]
    return _bundle(
        train, val, test, task="detection", class_names=names, image_size=int(image_size)
    )


@DATASETS.register("voc-seg")
def voc_seg(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: bool = True,
    download: bool = False,
    year: str = "2012",
    train_split: str | None = None,
    test_split: str | None = None,
    crop_size: int = 513,
    eval_size: int = 512,
) -> DatasetBundle:
    """Pascal VOC segmentation (21 classes; A-FAN §6: VOC2012 train → val, VOC2007 trainval → test).

    Training: random scale 0.5-2, ``crop_size`` crops (513), flips; test images are padded to
    ``eval_size`` (VOC images are at most 500 px; padding is ignored by the metric).
    """
    path = _data_root(root, "voc")
    year = str(year)
    _require_voc(path, year, download)
    train_split = train_split or ("trainval" if year == "2007" else "train")
    test_split = test_split or ("test" if year == "2007" else "val")

    def make(split: str) -> Callable[[PairTransform | None], Dataset]:
        return lambda t: VOCSegmentation(
            path, year=year, image_set=split, download=download, transform=t
        )

    train, val = _split(
        make(train_split),
        val_fraction=val_fraction,
        seed=seed,
        train_transform=SegmentationCrop(crop_size) if augment else PadTo(eval_size),
        val_transform=PadTo(eval_size),
    )
    return _bundle(
        train, val, make(test_split)(PadTo(eval_size)),
        task="segmentation", class_names=["background", *VOC_CLASSES], image_size=int(crop_size),
    )  # fmt: skip


def _cityscapes_root(root: str | Path | None, download: bool) -> Path:
    """The Cityscapes folder, refused unless it holds ``leftImg8bit`` and ``gtFine`` (Cityscapes
    cannot be downloaded)."""
    path = _data_root(root, "cityscapes")
    missing = [str(path / d) for d in ("leftImg8bit", "gtFine") if not (path / d).is_dir()]
    if missing or download:
        found = f"missing {', '.join(missing)}" if missing else "torchvision cannot download it"
        raise AdvfeatError(
            f"Cityscapes not found under {str(path)!r} ({found}). Download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
            f"https://www.cityscapes-dataset.com (free account), unzip them into that folder and "
            f"point --data-dir at it"
        )
    return path


@DATASET_CHECKS.register("cityscapes")
def _check_cityscapes(*, root: str | Path | None, download: bool, **_: Any) -> None:
    _cityscapes_root(root, download)


@DATASETS.register("cityscapes")
def cityscapes(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: bool = True,
    download: bool = False,
    crop_size: int = 768,
) -> DatasetBundle:
    """Cityscapes fine segmentation, 19 classes (A-FAN §6: train → val, 1024×2048 images).

    Expects ``root/leftImg8bit`` and ``root/gtFine`` (leftImg8bit_trainvaltest.zip and
    gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com, which needs an account;
    torchvision cannot download it). Training: random scale 0.5-2, ``crop_size`` crops, flips.
    """
    path = _cityscapes_root(root, download)

    def make(split: str) -> Callable[[PairTransform | None], Dataset]:
        return lambda t: CityscapesSegmentation(path, split=split, transform=t)

    train, val = _split(
        make("train"),
        val_fraction=val_fraction,
        seed=seed,
        train_transform=SegmentationCrop(crop_size) if augment else None,
    )
    names = [
        "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
        "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
        "motorcycle", "bicycle",
    ]  # fmt: skip
    return _bundle(
        train, val, make("val")(None),
        task="segmentation", class_names=names, image_size=int(crop_size),
    )  # fmt: skip
