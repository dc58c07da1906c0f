"""Datasets: the shapes generator (determinism, boxes/masks, shifted domains), splits,
augmentation, collate, JPEG CIFAR-10 loading and every user error."""

from __future__ import annotations

import colorsys
import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from advfeat.data import DATASETS, ArrayDataset, DatasetBundle, build_dataset, detection_collate
from advfeat.data.real import CIFAR10_CLASSES, load_cifar10_jpeg
from advfeat.data.shapes import (
    SHAPE_NAMES,
    SHIFTED_HUES,
    TRAIN_HUES,
    boxes_from_instances,
    render_scenes,
    sample_scenes,
)
from advfeat.data.transforms import CifarAugment, HorizontalFlip, flip_boxes, random_crop_flip
from advfeat.errors import AdvfeatError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
JPEG_ZIP = SHARED_DATA / "cifar10-jpeg.zip"
TINY = {"n_train": 60, "n_test": 24, "image_size": 16}
TINY_DET = {"n_train": 24, "n_test": 24, "image_size": 48}


def storage(ds: object) -> torch.Tensor:
    assert isinstance(ds, ArrayDataset)
    return ds.images


@pytest.fixture(scope="module")
def seg() -> DatasetBundle:
    return build_dataset("shapes-seg", augment=False, **TINY_DET)


@pytest.fixture(scope="module")
def det() -> DatasetBundle:
    return build_dataset("shapes-det", augment=False, **TINY_DET)


# ----------------------------------------------------------------------------- registry


def test_registered_names() -> None:
    expected = {"shapes", "shapes-det", "shapes-seg", "cifar10", "cifar100", "svhn"}
    assert expected | {"imagefolder", "cifar10-jpeg"} <= set(DATASETS.names())


# ----------------------------------------------------------------------------- shapes


def test_default_shapes_bundle_is_fast_and_complete() -> None:
    # CPU time of this process, so that other jobs sharing the machine do not count
    start = time.process_time()
    bundle = build_dataset("shapes")
    elapsed = time.process_time() - start
    assert elapsed < 5.0, f"building the default shapes bundle took {elapsed:.1f} s of CPU"
    assert (len(bundle.train), len(bundle.test), bundle.val) == (5000, 1000, None)
    assert (bundle.num_classes, bundle.image_size, bundle.task) == (8, 32, "classification")
    assert bundle.class_names == list(SHAPE_NAMES)
    assert set(bundle.shifted) == {"colour", "fog", "noise", "style"}
    assert storage(bundle.train).dtype == torch.uint8
    labels = torch.tensor([bundle.test[i][1] for i in range(len(bundle.test))])
    assert torch.bincount(labels, minlength=8).tolist() == [125] * 8  # balanced
    image, label = bundle.test[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert isinstance(label, int)
    # the statistics are those of the training pixels
    pixels = storage(bundle.train).float().div(255)
    mean = pixels.mean(dim=(0, 2, 3))
    std = pixels.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(bundle.mean), atol=1e-3)
    assert torch.allclose(std, torch.tensor(bundle.std), atol=1e-3)


@pytest.mark.parametrize("name", ["shapes", "shapes-det", "shapes-seg"])
def test_same_seed_same_data_other_seed_other_data(name: str) -> None:
    opts = TINY if name == "shapes" else TINY_DET
    a = build_dataset(name, seed=3, augment=False, **opts)
    b = build_dataset(name, seed=3, augment=False, **opts)
    c = build_dataset(name, seed=4, augment=False, **opts)
    assert torch.equal(storage(a.train), storage(b.train))
    assert torch.equal(storage(a.test), storage(b.test))
    for domain in a.shifted:
        assert torch.equal(storage(a.shifted[domain]), storage(b.shifted[domain]))
    assert not torch.equal(storage(a.train), storage(c.train))
    assert not torch.equal(storage(a.train), storage(a.test))
    for i in range(5):
        ta, tb = a.train[i][1], b.train[i][1]
        if isinstance(ta, dict):
            assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
        elif isinstance(ta, torch.Tensor):
            assert torch.equal(ta, tb)
        else:
            assert ta == tb


def test_rendered_shapes_follow_their_scene() -> None:
    scenes = sample_scenes(60, np.random.default_rng(0), image_size=24)
    images, instances = render_scenes(scenes)
    assert images.shape == (60, 3, 24, 24) and instances.shape == (60, 24, 24)
    covered = (instances == 1).flatten(1).float().mean(dim=1)
    assert bool((covered > 0.05).all()), "every image shows its shape"
    assert torch.bincount(torch.from_numpy(scenes.classes[:, 0]), minlength=8).tolist() == [
        8,
        8,
        8,
        8,
        7,
        7,
        7,
        7,
    ]
    for i in range(60):
        shape = SHAPE_NAMES[scenes.classes[i, 0]]
        cx, cy = scenes.centers[i, 0]
        centre = int(instances[i, int(cy), int(cx)])
        # a ring and a crescent leave the centre empty, the filled shapes cover it
        if shape in ("ring", "crescent"):
            assert centre == 0, shape
        elif shape in ("circle", "square", "cross", "star"):
            assert centre == 1, shape
        # every object pixel lies within its radius of the centre
        ys, xs = torch.nonzero(instances[i] == 1, as_tuple=True)
        dist = torch.hypot(xs + 0.5 - cx, ys + 0.5 - cy)
        assert float(dist.max()) <= scenes.radii[i, 0] + 1e-6


def _reference_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_boxes_are_tight_boxes_of_object_pixels() -> None:
    scenes = sample_scenes(30, np.random.default_rng(5), image_size=48, max_objects=4)
    _, instances = render_scenes(scenes)
    boxes, present = boxes_from_instances(instances, 4)
    for i in range(30):
        for slot in range(4):
            mask = instances[i].numpy() == slot + 1
            assert bool(present[i, slot]) == bool(mask.any())
            if mask.any():
                assert boxes[i, slot].tolist() == _reference_box(mask)
                assert scenes.classes[i, slot] >= 0


def test_detection_targets_match_segmentation_masks(det: DatasetBundle, seg: DatasetBundle) -> None:
    assert det.task == "detection" and seg.task == "segmentation"
    assert det.num_classes == seg.num_classes == 9 and det.class_names[0] == "background"
    assert torch.equal(storage(det.train), storage(seg.train))  # same scenes
    counts = []
    for i in range(len(det.train)):
        image, target = det.train[i]
        _, mask = seg.train[i]
        boxes, labels = target["boxes"], target["labels"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert mask.dtype == torch.int64 and mask.shape == image.shape[1:]
        assert int(labels.min()) >= 1 and int(labels.max()) <= 8
        assert set(labels.tolist()) == set(mask.unique().tolist()) - {0}
        counts.append(len(labels))
        for label in labels.unique():
            # the union of this class's boxes is the box of its mask pixels
            mine = boxes[labels == label]
            union = [*mine[:, :2].amin(0).tolist(), *mine[:, 2:].amax(0).tolist()]
            assert union == _reference_box((mask == label).numpy())
        for box, label in zip(boxes.long(), labels, strict=True):
            inside = mask[box[1] : box[3], box[0] : box[2]]
            assert bool((inside == label).any())
    assert max(counts) > 1, "several objects per image"


def test_segmentation_ignore_boundary() -> None:
    plain = build_dataset("shapes-seg", augment=False, **TINY_DET)
    ringed = build_dataset("shapes-seg", augment=False, ignore_boundary=True, **TINY_DET)
    for i in range(6):
        a, b = plain.train[i][1], ringed.train[i][1]
        ignored = b == 255
        assert bool(ignored.any())
        assert bool((a[ignored] > 0).all()), "only object pixels are marked"
        assert torch.equal(a[~ignored], b[~ignored])
        # every marked pixel touches a pixel of another label
        padded = F.pad(a[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0]
        neighbours = torch.stack(
            [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        touches = (neighbours != a.float()).any(dim=0)
        assert torch.equal(ignored, touches & (a > 0))


# ----------------------------------------------------------------------------- shifted domains


def _hue(rgb: torch.Tensor) -> np.ndarray:
    return np.array([colorsys.rgb_to_hsv(*px)[0] for px in rgb.tolist()])


def test_shifted_domains_keep_labels_and_move_statistics(seg: DatasetBundle) -> None:
    clean = storage(seg.test).float() / 255
    masks = torch.stack([seg.test[i][1] for i in range(len(seg.test))])
    fg = (masks > 0)[:, None].expand_as(clean)
    for name, shifted in seg.shifted.items():
        assert len(shifted) == len(seg.test)
        for i in range(len(seg.test)):
            assert torch.equal(shifted[i][1], seg.test[i][1]), name
        assert not torch.equal(storage(shifted), storage(seg.test)), name

    def contrast(x: torch.Tensor) -> float:
        return float(x.flatten(1).std(dim=1).mean())

    fog = storage(seg.shifted["fog"]).float() / 255
    assert contrast(fog) < 0.6 * contrast(clean)
    assert float(fog.mean()) > float(clean.mean())

    noisy = storage(seg.shifted["noise"]).float() / 255
    assert 0.05 < float((noisy - clean).abs().mean()) < 0.1

    def roughness(x: torch.Tensor) -> float:
        return float((x[..., 1:] - x[..., :-1]).square().mean())

    assert roughness(noisy) > 3 * roughness(clean)

    style = storage(seg.shifted["style"]).float() / 255
    assert torch.equal(style[fg], clean[fg]), "style keeps the shapes"
    assert float((style[~fg] - clean[~fg]).abs().mean()) > 0.02, "but changes the background"

    colour = storage(seg.shifted["colour"]).float() / 255
    pick = torch.arange(0, int(fg[:, 0].sum()), 97)
    clean_fg = clean.permute(0, 2, 3, 1)[fg[:, 0]][pick]
    colour_fg = colour.permute(0, 2, 3, 1)[fg[:, 0]][pick]
    tol = 0.02
    assert (_hue(clean_fg) < TRAIN_HUES[1] + tol).all()
    hues = _hue(colour_fg)
    assert ((hues > SHIFTED_HUES[0] - tol) & (hues < SHIFTED_HUES[1] + tol)).all()


# ----------------------------------------------------------------------------- splits


def test_validation_split_is_disjoint_deterministic_and_unaugmented() -> None:
    opts = {"n_train": 200, "n_test": 10, "image_size": 16}
    a = build_dataset("shapes", seed=1, val_fraction=0.1, **opts)
    b = build_dataset("shapes", seed=1, val_fraction=0.1, **opts)
    c = build_dataset("shapes", seed=2, val_fraction=0.1, **opts)
    assert isinstance(a.train, ArrayDataset) and isinstance(a.val, ArrayDataset)
    assert (len(a.train), len(a.val)) == (180, 20)
    train_ids = {a.train.source_index(i) for i in range(len(a.train))}
    val_ids = {a.val.source_index(i) for i in range(len(a.val))}
    assert not train_ids & val_ids and train_ids | val_ids == set(range(200))
    assert isinstance(b.val, ArrayDataset) and isinstance(c.val, ArrayDataset)
    assert torch.equal(a.val.indices, b.val.indices)  # type: ignore[arg-type]
    assert not torch.equal(a.val.indices, c.val.indices)  # type: ignore[arg-type]
    # validation items are the stored images, never augmented
    j = a.val.source_index(0)
    assert torch.equal(a.val[0][0], storage(a.val)[j].float() / 255)
    assert a.val.transform is None and a.train.transform is not None
    with torch.random.fork_rng():
        torch.manual_seed(0)
        draws = [a.train[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:]), "train is augmented"


def test_no_augmentation_gives_stored_images() -> None:
    bundle = build_dataset("shapes", augment=False, **TINY)
    assert torch.equal(bundle.train[3][0], storage(bundle.train)[3].float() / 255)


# ----------------------------------------------------------------------------- augmentation


def test_random_crop_flip_matches_pad_then_crop() -> None:
    image = torch.rand(3, 10, 12)
    for seed in range(20):
        out = random_crop_flip(image, padding=4, generator=torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed)
        dy = int(torch.randint(-4, 5, (), generator=g))
        dx = int(torch.randint(-4, 5, (), generator=g))
        flip = bool(torch.rand((), generator=g) < 0.5)
        ref = F.pad(image, (4, 4, 4, 4))[:, 4 + dy : 14 + dy, 4 + dx : 16 + dx]
        if flip:
            ref = ref.flip(-1)
        assert out.shape == image.shape and torch.equal(out, ref)
    assert torch.equal(random_crop_flip(image, padding=0, flip=False), image)


def test_cifar_augment_keeps_shape_range_and_uses_torch_rng() -> None:
    image = torch.rand(3, 32, 32)
    aug = CifarAugment()
    with torch.random.fork_rng():
        torch.manual_seed(7)
        first = [aug(image, 3)[0] for _ in range(5)]
        torch.manual_seed(7)
        second = [aug(image, 3)[0] for _ in range(5)]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
        assert a.shape == image.shape and a.dtype == image.dtype
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert aug(image, 3)[1] == 3


def test_flip_moves_boxes_and_masks_consistently(det: DatasetBundle, seg: DatasetBundle) -> None:
    flip = HorizontalFlip(p=1.0)
    image, target = det.test[0]
    _, mask = seg.test[0]
    f_image, f_target = flip(image, target)
    _, f_mask = flip(image, mask)
    assert torch.equal(f_image, image.flip(-1)) and torch.equal(f_mask, mask.flip(-1))
    assert torch.equal(f_target["labels"], target["labels"])
    for label in f_target["labels"].unique():
        mine = f_target["boxes"][f_target["labels"] == label]
        union = [*mine[:, :2].amin(0).tolist(), *mine[:, 2:].amax(0).tolist()]
        assert union == _reference_box((f_mask == label).numpy())
    boxes = torch.tensor([[1.0, 2.0, 5.0, 7.0]])
    assert flip_boxes(flip_boxes(boxes, 20), 20).tolist() == boxes.tolist()
    assert flip_boxes(boxes, 20).tolist() == [[15.0, 2.0, 19.0, 7.0]]
    assert HorizontalFlip(p=0.0)(image, target)[0] is image


def test_detection_collate_in_a_loader(det: DatasetBundle) -> None:
    loader = DataLoader(det.train, batch_size=3, collate_fn=detection_collate)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list)
    assert len(images) == len(targets) == 3
    assert all(img.shape == (3, 48, 48) for img in images)
    assert all(set(t) == {"boxes", "labels"} for t in targets)


# ----------------------------------------------------------------------------- real data


def _fake_jpeg_zip(
    path: Path, per_class: int = 2, classes: tuple[str, ...] = CIFAR10_CLASSES
) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for split in ("train", "test"):
            for c, name in enumerate(classes):
                for k in range(per_class):
                    buffer = io.BytesIO()
                    Image.new("RGB", (32, 32), (20 * c, 100, 10 * k)).save(buffer, "JPEG")
                    archive.writestr(f"{split}/{name}/{k:04d}.jpg", buffer.getvalue())


@pytest.mark.skipif(not JPEG_ZIP.is_file(), reason=f"{JPEG_ZIP} is not present on this machine")
def test_cifar10_jpeg_subset_from_the_shared_zip(tmp_path: Path) -> None:
    bundle = build_dataset(
        "cifar10-jpeg", JPEG_ZIP, max_per_class=3, cache_dir=tmp_path, val_fraction=0.1
    )
    assert (len(bundle.train), len(bundle.val or []), len(bundle.test)) == (27, 3, 30)
    assert bundle.class_names == list(CIFAR10_CLASSES) and bundle.num_classes == 10
    test_labels = [bundle.test[i][1] for i in range(30)]
    assert test_labels == [c for c in range(10) for _ in range(3)]
    image = bundle.test[0][0]
    assert image.shape == (3, 32, 32) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert float(image.std()) > 0.02, "a real photograph, not a blank"
    assert not any(tmp_path.iterdir()), "subsets are not cached"
    # the folder holding the zip works as root too
    same = build_dataset("cifar10-jpeg", SHARED_DATA, max_per_class=3, cache_dir=tmp_path)
    assert torch.equal(storage(same.test), storage(bundle.test))


def test_cifar10_jpeg_decodes_once_then_reads_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = tmp_path / "cifar10-jpeg.zip"
    _fake_jpeg_zip(archive)
    cache = tmp_path / "cache"
    first = load_cifar10_jpeg(tmp_path, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 4
    images, labels = first["train"]
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]

    def no_zip(*args: object, **kwargs: object) -> None:
        raise AssertionError("the zip was opened although the cache exists")

    monkeypatch.setattr(zipfile, "ZipFile", no_zip)
    second = load_cifar10_jpeg(archive, cache_dir=cache)
    for split in ("train", "test"):
        assert torch.equal(first[split][0], second[split][0])
        assert torch.equal(first[split][1], second[split][1])
    subset = load_cifar10_jpeg(archive, ["test"], max_per_class=1, cache_dir=cache)["test"]
    assert subset[1].tolist() == list(range(10))
    assert torch.equal(subset[0], first["test"][0][::2])


def test_max_per_class_can_spare_the_test_split(tmp_path: Path) -> None:
    _fake_jpeg_zip(tmp_path / "cifar10-jpeg.zip", per_class=3)
    both = build_dataset("cifar10-jpeg", tmp_path, max_per_class=1, cache_dir=tmp_path / "c")
    train_only = build_dataset(
        "cifar10-jpeg", tmp_path, max_per_class=1, limit_test=False, cache_dir=tmp_path / "c"
    )
    assert (len(both.train), len(both.test)) == (10, 10)
    assert (len(train_only.train), len(train_only.test)) == (10, 30)
    assert torch.equal(storage(both.train), storage(train_only.train))


def test_cifar10_jpeg_wrong_zip_is_explained(tmp_path: Path) -> None:
    bad = tmp_path / "cifar10-jpeg.zip"
    _fake_jpeg_zip(bad, per_class=1, classes=("cats", "dogs"))
    with pytest.raises(AdvfeatError, match="JPEG CIFAR-10 zip"):
        build_dataset("cifar10-jpeg", bad, max_per_class=1)
    (tmp_path / "not-a-zip").mkdir()
    (tmp_path / "not-a-zip" / "cifar10-jpeg.zip").write_text("hello")
    with pytest.raises(AdvfeatError, match="not a readable zip"):
        build_dataset("cifar10-jpeg", tmp_path / "not-a-zip")
    with pytest.raises(AdvfeatError, match=r"does not exist.*JPEG CIFAR-10 zip"):
        build_dataset("cifar10-jpeg", tmp_path / "missing.zip")
    with pytest.raises(AdvfeatError, match="needs root"):
        build_dataset("cifar10-jpeg")


def test_imagefolder_layout_and_transforms(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c, name in enumerate(("ant", "bee")):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for k in range(5):
                Image.new("RGB", (40, 30), (100 * c, 50, 10 * k)).save(folder / f"{k}.png")
    bundle = build_dataset("imagefolder", tmp_path, image_size=16, val_fraction=0.2)
    assert bundle.class_names == ["ant", "bee"] and bundle.num_classes == 2
    assert (len(bundle.train), len(bundle.val or []), len(bundle.test)) == (8, 2, 10)
    for ds in (bundle.train, bundle.test):
        image, label = ds[0]
        assert image.shape == (3, 16, 16) and label in (0, 1)
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    small = build_dataset("imagefolder", tmp_path, image_size=16, max_per_class=2)
    assert len(small.train) == 4 and len(small.test) == 4
    (tmp_path / "val" / "bee").rename(tmp_path / "val" / "wasp")
    with pytest.raises(AdvfeatError, match="class folders"):
        build_dataset("imagefolder", tmp_path, image_size=16)


# ----------------------------------------------------------------------------- user errors


def test_unknown_dataset_names_close_matches() -> None:
    with pytest.raises(AdvfeatError, match="did you mean 'shapes'"):
        build_dataset("shape")
    with pytest.raises(AdvfeatError, match="'cifar10'"):
        build_dataset("cifar-10")


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("cifar10", "cifar-10-batches-py.*download=True"),
        ("cifar100", "cifar-100-python.*download=True"),
        ("svhn", "train_32x32.mat.*download=True"),
        ("imagefolder", "root/train/<class>"),
        ("cifar10-jpeg", "does not exist.*JPEG CIFAR-10"),
    ],
)
def test_missing_root_is_explained(name: str, pattern: str, tmp_path: Path) -> None:
    with pytest.raises(AdvfeatError, match=pattern):
        build_dataset(name, tmp_path / "nowhere")


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, "0.1", True])
def test_bad_val_fraction(fraction: object) -> None:
    with pytest.raises(AdvfeatError, match="val_fraction"):
        build_dataset("shapes", val_fraction=fraction, **TINY)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        {"n_train": 0},
        {"n_train": -5},
        {"n_train": 2.5},
        {"n_test": 0},
        {"image_size": 4},
        {"colour": "red"},
    ],
)
def test_bad_options(options: dict[str, object]) -> None:
    with pytest.raises(AdvfeatError, match=next(iter(options))):
        build_dataset("shapes", **{**TINY, **options})


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "imagefolder", "cifar10-jpeg"])
def test_bad_subset_size_is_caught_before_reading(name: str, tmp_path: Path) -> None:
    with pytest.raises(AdvfeatError, match="max_per_class must be an integer >= 1"):
        build_dataset(name, tmp_path, max_per_class=0)


def test_validation_split_needs_training_items() -> None:
    with pytest.raises(AdvfeatError, match="leaves no training items"):
        build_dataset("shapes", val_fraction=0.9, n_train=1, n_test=4, image_size=16)


# ----------------------------------------------------------------- Pascal VOC, read offline


def _write_voc(root: Path) -> None:
    """A two-image VOC2007 folder in the released layout: boxes 1-based and inclusive, one
    difficult object, one annotation with a single object (parsed as a dict, not a list)."""
    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main",
                "ImageSets/Segmentation"):  # fmt: skip
        (voc / sub).mkdir(parents=True)
    objects = {
        "000001": [("dog", (10, 20, 40, 50), 0), ("person", (1, 1, 60, 30), 1)],
        "000002": [("car", (5, 6, 7, 8), 0)],
    }
    for i, (name, objs) in enumerate(objects.items()):
        Image.new("RGB", (64, 48), (40 * i, 80, 120)).save(voc / "JPEGImages" / f"{name}.jpg")
        xml = "".join(
            f"<object><name>{cls}</name><difficult>{hard}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for cls, b, hard in objs
        )
        (voc / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename>{xml}</annotation>"
        )
        mask = np.zeros((48, 64), dtype=np.uint8)
        mask[10:20, 5:30] = 12  # dog
        mask[9, 5:30] = 255  # the object's boundary, ignored by the metric
        Image.fromarray(mask, mode="L").save(voc / "SegmentationClass" / f"{name}.png")
    for split in ("trainval", "test"):
        for sets in ("Main", "Segmentation"):
            (voc / "ImageSets" / sets / f"{split}.txt").write_text("000001\n000002\n")


def test_voc_detection_boxes_are_zero_based_and_difficult_objects_dropped(tmp_path: Path) -> None:
    from advfeat.data.dense import VOC_CLASSES

    _write_voc(tmp_path)
    bundle = build_dataset("voc-det", tmp_path, augment=False)
    assert bundle.task == "detection" and bundle.num_classes == 21
    assert bundle.class_names[VOC_CLASSES.index("dog") + 1] == "dog"
    image, target = bundle.test[0]
    assert image.shape == (3, 48, 64) and float(image.max()) <= 1.0
    # VOC's (xmin, ymin, xmax, ymax) = (10, 20, 40, 50), 1-based inclusive -> [9, 19, 40, 50)
    assert target["boxes"].tolist() == [[9.0, 19.0, 40.0, 50.0]]
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog") + 1]
    _, single = bundle.test[1]
    assert single["boxes"].tolist() == [[4.0, 5.0, 7.0, 8.0]]
    assert single["labels"].tolist() == [VOC_CLASSES.index("car") + 1]
    keep = build_dataset("voc-det", tmp_path, augment=False, keep_difficult=True)
    assert keep.test[0][1]["labels"].tolist() == [
        VOC_CLASSES.index("dog") + 1,
        VOC_CLASSES.index("person") + 1,
    ]
    flipped = build_dataset("voc-det", tmp_path, augment=True, seed=0)
    seen = {tuple(flipped.train[0][1]["boxes"][0].tolist()) for _ in range(20)}
    assert seen == {(9.0, 19.0, 40.0, 50.0), (64 - 40.0, 19.0, 64 - 9.0, 50.0)}


def test_voc_segmentation_keeps_labels_and_pads_with_the_ignore_index(tmp_path: Path) -> None:
    _write_voc(tmp_path)
    bundle = build_dataset("voc-seg", tmp_path, year="2007", eval_size=80, crop_size=32)
    assert bundle.task == "segmentation" and bundle.num_classes == 21
    image, mask = bundle.test[0]
    assert image.shape == (3, 80, 80) and mask.shape == (80, 80) and mask.dtype == torch.int64
    assert (mask[10:20, 5:30] == 12).all() and (mask[9, 5:30] == 255).all()
    assert (mask[:48, :64] == torch.from_numpy(_mask_of(tmp_path))).all()
    assert (mask[48:] == 255).all() and (mask[:, 64:] == 255).all()
    assert float(image[:, 48:].abs().max()) == 0.0
    crop, crop_mask = bundle.train[0]
    assert crop.shape == (3, 32, 32) and crop_mask.shape == (32, 32)
    assert set(crop_mask.unique().tolist()) <= {0, 12, 255}
    with pytest.raises(AdvfeatError, match="does not fit the 40 px evaluation canvas"):
        build_dataset("voc-seg", tmp_path, year="2007", eval_size=40).test[0]


def _mask_of(root: Path) -> np.ndarray:
    path = root / "VOCdevkit" / "VOC2007" / "SegmentationClass" / "000001.png"
    return np.array(Image.open(path), dtype=np.int64)
