"""Real datasets: CIFAR-10/100 and SVHN (torchvision), an ImageNet-style folder, JPEG CIFAR-10.

Small datasets are kept in memory as ``uint8`` tensors and converted per item; the training
split gets the standard CIFAR augmentation (4-pixel padded random crop, horizontal flip; no flip
for SVHN digits). ``max_per_class`` keeps the first ``m`` items of each class in each split, for
quick experiments (``limit_test=False``: in the training split only). Without ``root`` the torchvision datasets live in ``~/.cache/advfeat/data``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from advfeat.checkpoint import atomic_write_bytes
from advfeat.data.bundle import (
    DATASET_CHECKS,
    DATASETS,
    ArrayDataset,
    DatasetBundle,
    LabelTargets,
    check_positive_int,
    train_val_views,
)
from advfeat.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CifarAugment
from advfeat.errors import AdvfeatError

__all__ = [
    "CIFAR10_CLASSES",
    "ImageFiles",
    "array_bundle",
    "default_root",
    "first_per_class",
    "load_cifar10_jpeg",
]

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# per-channel statistics over all training pixels
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
CIFAR10_JPEG_ZIP = "cifar10-jpeg.zip"


def default_root() -> Path:
    """Where datasets are looked for (and downloaded to) when no ``root`` is given."""
    return Path.home() / ".cache" / "advfeat" / "data"


def first_per_class(labels: Tensor, max_per_class: int | None) -> Tensor | None:
    """Sorted indices of the first ``max_per_class`` items of each class, or ``None`` for all."""
    if max_per_class is None:
        return None
    m = check_positive_int("max_per_class", max_per_class)
    values = labels.numpy()
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    rank = np.arange(len(values)) - np.searchsorted(ordered, ordered, side="left")
    return torch.from_numpy(np.sort(order[rank < m]))


def _check_limit(max_per_class: int | None) -> None:
    if max_per_class is not None:
        check_positive_int("max_per_class", max_per_class)


def array_bundle(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    class_names: Sequence[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    seed: int,
    val_fraction: float,
    augment: bool,
    flip: bool = True,
    max_per_class: int | None = None,
    limit_test: bool = True,
    padding_mode: str = "zeros",
) -> DatasetBundle:
    """Bundle in-memory ``(uint8 images [N, C, H, W], int labels [N])`` train and test splits.

    ``max_per_class`` limits the training split, and the test split too unless ``limit_test``
    is false (quick training runs that are still scored on the full test set). ``padding_mode``
    is the random crop's padding (``"zeros"`` or ``"reflect"``).
    """
    splits = []
    for split, (images, labels) in (("train", train), ("test", test)):
        limit = max_per_class if split == "train" or limit_test else None
        keep = first_per_class(labels, limit)
        if keep is not None:
            images, labels = images[keep], labels[keep]
        splits.append(ArrayDataset(images.contiguous(), LabelTargets(labels)))
    augmentation = (
        CifarAugment(padding=4, flip=flip, padding_mode=padding_mode) if augment else None
    )
    train_set, val_set = train_val_views(
        splits[0], val_fraction=val_fraction, seed=seed, train_transform=augmentation
    )
    return DatasetBundle(
        train=train_set,
        val=val_set,
        test=splits[1],
        num_classes=len(class_names),
        image_size=int(train[0].shape[-1]),
        mean=mean,
        std=std,
        task="classification",
        class_names=list(class_names),
    )


def _resolve_root(root: str | Path | None, name: str) -> Path:
    return Path(root).expanduser() if root is not None else default_root() / name


def _hwc(data: Any) -> Tensor:
    return torch.from_numpy(np.asarray(data)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- torchvision


def _cifar_root(version: int, root: str | Path | None, download: bool) -> Path:
    """The folder torchvision reads CIFAR-``version`` from (it holds the extracted folder);
    refused when the data is not there and not to be downloaded."""
    from torchvision.datasets import CIFAR10, CIFAR100

    folder = (CIFAR10 if version == 10 else CIFAR100).base_folder
    path = _resolve_root(root, f"cifar{version}")
    if path.name == folder:  # the user pointed at the extracted folder itself
        path = path.parent
    if not download and not (path / folder).is_dir():
        raise AdvfeatError(
            f"CIFAR-{version} not found: expected the folder {str(path / folder)!r} (the python "
            f"version that torchvision downloads). Point root / --data-dir at the folder that "
            f"contains {folder!r}, or pass download=True (--set dataset_options.download=true) "
            f"to fetch it."
        )
    return path


def _cifar(
    version: int,
    root: str | Path | None,
    download: bool,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[str]]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if version == 10 else CIFAR100
    path = _cifar_root(version, root, download)
    try:
        train = cls(str(path), train=True, download=download)
        test = cls(str(path), train=False, download=download)
    except RuntimeError as err:
        raise AdvfeatError(
            f"CIFAR-{version} in {str(path)!r} could not be read ({err}); delete it and pass "
            f"download=True to fetch a fresh copy"
        ) from err
    pairs = tuple(
        (_hwc(ds.data), torch.as_tensor(ds.targets, dtype=torch.int64)) for ds in (train, test)
    )
    return pairs[0], pairs[1], list(train.classes)


def _register_cifar(
    version: int, mean: tuple[float, ...], std: tuple[float, ...], summary: str
) -> Callable[..., DatasetBundle]:
    """Register dataset ``cifar{version}`` and its check: CIFAR-10 and CIFAR-100 differ only in
    their classes and channel statistics. Returns the factory (its options are its signature)."""
    name = f"cifar{version}"

    def check(
        *, root: str | Path | None, download: bool, max_per_class: int | None, **_: Any
    ) -> None:
        _check_limit(max_per_class)
        _cifar_root(version, root, download)

    def factory(
        root: str | Path | None = None,
        *,
        seed: int = 0,
        val_fraction: float = 0.0,
        augment: bool = True,
        download: bool = False,
        max_per_class: int | None = None,
        limit_test: bool = True,
        padding_mode: str = "reflect",  # docs/results.md: +3.3 points over zeros
    ) -> DatasetBundle:
        _check_limit(max_per_class)
        train, test, names = _cifar(version, root, download)
        return array_bundle(
            train,
            test,
            class_names=names,
            mean=mean,
            std=std,
            seed=seed,
            val_fraction=val_fraction,
            augment=augment,
            max_per_class=max_per_class,
            limit_test=limit_test,
            padding_mode=padding_mode,
        )

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = summary
    DATASET_CHECKS.add(name, check)
    DATASETS.add(name, factory)
    return factory


cifar10 = _register_cifar(
    10,
    CIFAR10_MEAN,
    CIFAR10_STD,
    "CIFAR-10 (Krizhevsky 2009): 50,000 train / 10,000 test 32x32 images of 10 classes.",
)
cifar100 = _register_cifar(
    100,
    CIFAR100_MEAN,
    CIFAR100_STD,
    "CIFAR-100: 50,000 train / 10,000 test 32x32 images of 100 classes.",
)


def _svhn_root(root: str | Path | None, download: bool) -> Path:
    """The folder holding SVHN's ``.mat`` files; refused when they are not there and not to be
    downloaded."""
    path = _resolve_root(root, "svhn")
    files = [path / "train_32x32.mat", path / "test_32x32.mat"]
    if not download and not all(f.is_file() for f in files):
        raise AdvfeatError(
            f"SVHN not found: expected {str(files[0])!r} and {str(files[1])!r}. Point root / "
            f"--data-dir at the folder holding them, or pass download=True to fetch them."
        )
    return path


@DATASET_CHECKS.register("svhn")
def _check_svhn(
    *, root: str | Path | None, download: bool, max_per_class: int | None, **_: Any
) -> None:
    _check_limit(max_per_class)
    _svhn_root(root, download)


@DATASETS.register("svhn")
def svhn(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: bool = True,
    download: bool = False,
    max_per_class: int | None = None,
    limit_test: bool = True,
    padding_mode: str = "zeros",
) -> DatasetBundle:
    """SVHN cropped digits (Netzer et al. 2011), train and test splits; no flip augmentation."""
    from torchvision.datasets import SVHN

    _check_limit(max_per_class)
    path = _svhn_root(root, download)
    try:
        sets = [SVHN(str(path), split=s, download=download) for s in ("train", "test")]
    except ImportError as err:
        raise AdvfeatError(f"reading SVHN's .mat files needs scipy ({err})") from err
    except RuntimeError as err:
        raise AdvfeatError(f"SVHN in {str(path)!r} could not be read ({err})") from err
    train, test = (
        (torch.from_numpy(ds.data).contiguous(), torch.as_tensor(ds.labels, dtype=torch.int64))
        for ds in sets
    )
    return array_bundle(
        train,
        test,
        class_names=[str(d) for d in range(10)],
        mean=SVHN_MEAN,
        std=SVHN_STD,
        seed=seed,
        val_fraction=val_fraction,
        augment=augment,
        flip=False,
        max_per_class=max_per_class,
        limit_test=limit_test,
        padding_mode=padding_mode,
    )


# ----------------------------------------------------------------------------- image folder


class ImageFiles(Dataset):
    """Image files ``(path, label)`` decoded with Pillow and passed through ``transform``."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Any) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[i]
        return self.transform(default_loader(path)), label


def _scan_folder(folder: Path) -> tuple[list[tuple[str, int]], list[str]]:
    from torchvision.datasets import ImageFolder

    try:
        scanned = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as err:
        raise AdvfeatError(
            f"no images found in {str(folder)!r} ({err}); expected one sub-folder per class "
            f"holding image files (.jpg, .png, ...)"
        ) from err
    return list(scanned.samples), list(scanned.classes)


def _imagefolder_root(root: str | Path | None) -> Path:
    """``root``, refused unless it has the ``train/`` and ``val/`` folders of the layout."""
    path = Path(root).expanduser() if root is not None else None
    layout = "root/train/<class>/<image> and root/val/<class>/<image> (the ImageNet layout)"
    if path is None or not (path / "train").is_dir() or not (path / "val").is_dir():
        where = "no root was given" if path is None else f"{str(path)!r} lacks train/ or val/"
        raise AdvfeatError(f"imagefolder needs {layout}; {where}")
    return path


@DATASET_CHECKS.register("imagefolder")
def _check_imagefolder(
    *, root: str | Path | None, image_size: int, max_per_class: int | None, **_: Any
) -> None:
    check_positive_int("image_size", image_size)
    _check_limit(max_per_class)
    _imagefolder_root(root)


@DATASETS.register("imagefolder")
def imagefolder(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: bool = True,
    download: bool = False,
    image_size: int = 224,
    max_per_class: int | None = None,
) -> DatasetBundle:
    """An ImageNet-style folder: ``root/train/<class>/*`` and ``root/val/<class>/*``.

    Train: ``RandomResizedCrop(image_size)`` and horizontal flip; val/test: resize to
    ``image_size / 0.875`` and centre crop (the standard ImageNet recipe). ``val_fraction``
    holds out part of ``train``; the ``val`` folder is the test split.
    """
    from torchvision import transforms as T

    image_size = check_positive_int("image_size", image_size)
    _check_limit(max_per_class)
    path = _imagefolder_root(root)
    train_samples, classes = _scan_folder(path / "train")
    test_samples, test_classes = _scan_folder(path / "val")
    if test_classes != classes:
        missing = sorted(set(classes) ^ set(test_classes))[:5]
        raise AdvfeatError(
            f"the class folders of {str(path / 'train')!r} and {str(path / 'val')!r} differ "
            f"(e.g. {', '.join(missing)}); both need the same class sub-folders"
        )
    if max_per_class is not None:
        kept = []
        for samples in (train_samples, test_samples):
            labels = torch.as_tensor([label for _, label in samples], dtype=torch.int64)
            keep = first_per_class(labels, max_per_class)
            kept.append([samples[int(i)] for i in keep] if keep is not None else samples)
        train_samples, test_samples = kept
    train_tf = T.Compose(
        [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor()]
        if augment
        else [T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor()]
    )
    test_tf = T.Compose(
        [T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor()]
    )
    train_set: Dataset = ImageFiles(train_samples, train_tf)
    val_set: Dataset | None = None
    if val_fraction > 0:
        from advfeat.data.bundle import split_indices

        train_idx, val_idx = split_indices(len(train_samples), val_fraction, seed)
        train_set = ImageFiles([train_samples[int(i)] for i in train_idx], train_tf)
        val_set = ImageFiles([train_samples[int(i)] for i in val_idx], test_tf)
    return DatasetBundle(
        train=train_set,
        val=val_set,
        test=ImageFiles(test_samples, test_tf),
        num_classes=len(classes),
        image_size=image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        task="classification",
        class_names=classes,
    )


# ----------------------------------------------------------------------------- JPEG CIFAR-10

_ENTRY = re.compile(r"^(train|test)/([^/]+)/[^/]+\.jpe?g$", re.IGNORECASE)
_JPEG_EXPECTED = (
    f"the JPEG CIFAR-10 zip ({CIFAR10_JPEG_ZIP}: train/<class>/NNNN.jpg and "
    f"test/<class>/NNNN.jpg, 32x32 RGB, classes {', '.join(CIFAR10_CLASSES)})"
)


def _locate_zip(root: str | Path | None) -> Path:
    if root is None:
        raise AdvfeatError(
            f"cifar10-jpeg needs root / --data-dir: the path of {_JPEG_EXPECTED} or of a folder "
            f"containing it; it cannot be downloaded by advfeat"
        )
    path = Path(root).expanduser()
    if path.is_dir():
        path = path / CIFAR10_JPEG_ZIP
    if not path.is_file():
        raise AdvfeatError(
            f"cifar10-jpeg: {str(path)!r} does not exist; root must be the path of "
            f"{_JPEG_EXPECTED} or of a folder containing it"
        )
    return path


def _zip_entries(archive: zipfile.ZipFile, path: Path) -> dict[str, list[tuple[str, int]]]:
    """Verify the zip layout; return ``split -> [(entry name, label)]`` sorted by class, name."""
    entries: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    for name in archive.namelist():
        if name.endswith("/") or name.startswith("__MACOSX/"):
            continue
        match = _ENTRY.match(name)
        if match is None or match.group(2) not in CIFAR10_CLASSES:
            raise AdvfeatError(f"{str(path)!r} is not {_JPEG_EXPECTED}: unexpected entry {name!r}")
        entries[match.group(1)].append((name, CIFAR10_CLASSES.index(match.group(2))))
    for split, items in entries.items():
        found = {label for _, label in items}
        if len(found) != len(CIFAR10_CLASSES):
            missing = [CIFAR10_CLASSES[c] for c in range(10) if c not in found]
            raise AdvfeatError(
                f"{str(path)!r} is not {_JPEG_EXPECTED}: {split}/ lacks the classes "
                f"{', '.join(missing)}"
            )
        items.sort(key=lambda item: (item[1], item[0]))
    return entries


def _decode(
    archive: zipfile.ZipFile, items: Sequence[tuple[str, int]], path: Path
) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
    for i, (name, _) in enumerate(items):
        try:
            with Image.open(io.BytesIO(archive.read(name))) as img:
                array = np.asarray(img.convert("RGB"))
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AdvfeatError(
                f"{str(path)!r}: entry {name!r} cannot be read ({first[:120]}); the zip is "
                f"damaged: replace it with an intact copy of {_JPEG_EXPECTED}"
            ) from None
        if array.shape != (32, 32, 3):
            raise AdvfeatError(
                f"{str(path)!r}: {name!r} is {array.shape[1]}x{array.shape[0]}, expected 32x32 "
                f"RGB ({_JPEG_EXPECTED})"
            )
        images[i] = array
    return images, np.array([label for _, label in items], dtype=np.int64)


def _cache_dir(cache_dir: str | Path | None) -> Path:
    """``cache_dir``, else ``$XDG_CACHE_HOME/advfeat`` (``~/.cache/advfeat``): never the data's
    own folder, which may be shared or read-only."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "advfeat"


def _save_atomic(target: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(target, buffer.getvalue())  # temp file + rename, mode from the umask


def _from_cache(files: Sequence[Path], max_per_class: int | None) -> tuple[Tensor, Tensor] | None:
    """The cached split, or ``None`` (the damaged cache files removed) when they cannot be read:
    the split is then decoded from the zip again."""
    try:
        images = np.load(files[0], mmap_mode="r")
        labels = torch.from_numpy(np.load(files[1]))
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(images) != len(labels):
            raise ValueError(f"shapes {images.shape} and {tuple(labels.shape)}")
    except (OSError, ValueError, EOFError) as err:
        warnings.warn(
            f"the decoded cifar10-jpeg cache {str(files[0])!r} is damaged ({err}); decoding "
            "the zip again",
            stacklevel=3,
        )
        for f in files:
            f.unlink(missing_ok=True)
        return None
    keep = first_per_class(labels, max_per_class)
    if keep is not None:
        images, labels = images[keep.numpy()], labels[keep]
    return _hwc(np.array(images)), labels


def load_cifar10_jpeg(
    root: str | Path | None,
    splits: Sequence[str] = ("train", "test"),
    *,
    max_per_class: int | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Images ``uint8 [N, 3, 32, 32]`` and labels of the ``splits`` of the JPEG CIFAR-10 zip.

    Each split is decoded once with Pillow and cached as ``.npy`` in ``cache_dir`` (default:
    ``~/.cache/advfeat``), keyed by the zip's size and
    modification time. With ``max_per_class`` only the first ``m`` images of each class are
    read (from the cache when it exists, else decoded directly, without writing a cache).
    """
    for split in splits:
        if split not in ("train", "test"):
            raise AdvfeatError(f"cifar10-jpeg splits are 'train' and 'test', got {split!r}")
    path = _locate_zip(root)
    stat = path.stat()
    key = hashlib.sha1(f"{stat.st_size}-{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = _cache_dir(cache_dir)
    caches = {
        split: [folder / f"{path.stem}-{key}-{split}-{part}.npy" for part in ("images", "labels")]
        for split in splits
    }
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for split, files in caches.items():
        if all(f.is_file() for f in files):
            cached = _from_cache(files, max_per_class)
            if cached is not None:
                out[split] = cached
    missing = [split for split in splits if split not in out]
    if not missing:
        return out
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise AdvfeatError(
            f"{str(path)!r} is not a readable zip; expected {_JPEG_EXPECTED}"
        ) from err
    with archive:
        entries = _zip_entries(archive, path)
        for split in missing:
            items = entries[split]
            keep = first_per_class(torch.as_tensor([lab for _, lab in items]), max_per_class)
            if keep is not None:
                items = [items[int(i)] for i in keep]
            images, labels = _decode(archive, items, path)
            if max_per_class is None:
                _try_cache(caches[split], images, labels)
            out[split] = (_hwc(images), torch.from_numpy(labels))
    return out


def _try_cache(files: Sequence[Path], images: np.ndarray, labels: np.ndarray) -> None:
    try:
        _save_atomic(files[1], labels)
        _save_atomic(files[0], images)
    except OSError as err:
        warnings.warn(
            f"could not cache the decoded cifar10-jpeg in {str(files[0].parent)!r}: {err}",
            stacklevel=3,
        )


@DATASET_CHECKS.register("cifar10-jpeg")
def _check_cifar10_jpeg(*, root: str | Path | None, max_per_class: int | None, **_: Any) -> None:
    _check_limit(max_per_class)
    _locate_zip(root)


@DATASETS.register("cifar10-jpeg")
def cifar10_jpeg(
    root: str | Path | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.0,
    augment: bool = True,
    download: bool = False,
    max_per_class: int | None = None,
    limit_test: bool = True,
    cache_dir: str | Path | None = None,
    padding_mode: str = "reflect",  # docs/results.md: +3.3 points over zeros
) -> DatasetBundle:
    """CIFAR-10 re-encoded as JPEG (quality 75) in one zip: same split and labels as CIFAR-10.

    ``root`` is the zip or a folder containing ``cifar10-jpeg.zip``; see
    :func:`load_cifar10_jpeg` for decoding and caching. Accuracies come out somewhat below raw
    CIFAR-10, so compare only against baselines trained on this same data.
    """
    _check_limit(max_per_class)
    splits = load_cifar10_jpeg(root, ("train",), max_per_class=max_per_class, cache_dir=cache_dir)
    test_limit = max_per_class if limit_test else None
    splits |= load_cifar10_jpeg(root, ("test",), max_per_class=test_limit, cache_dir=cache_dir)
    return array_bundle(
        splits["train"],
        splits["test"],
        class_names=CIFAR10_CLASSES,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        seed=seed,
        val_fraction=val_fraction,
        augment=augment,
        padding_mode=padding_mode,
    )
