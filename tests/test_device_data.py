"""Training images held on the device (``device_data``): the batched crop and flip equal the CPU
augmentation pixel for pixel and in distribution, every epoch visits each item once, a resumed
epoch continues with the same batches, and a run trains with them."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import Tensor

from advfeat.cli import main
from advfeat.data import build_dataset
from advfeat.data.bundle import ArrayDataset, LabelTargets, train_val_views
from advfeat.data.device import CropFlip, DeviceImages, crop_flip, device_data_refusal
from advfeat.data.real import ImageFiles
from advfeat.data.transforms import CifarAugment, random_crop_flip
from advfeat.errors import AdvfeatError
from advfeat.train import TrainConfig, Trainer, load_checkpoint
from advfeat.train.config import apply_overrides
from advfeat.train.device_data import DeviceEpoch, device_images
from advfeat.train.distributed import DistInfo, EpochSampler
from advfeat.train.trainer import Preempted
from helpers import tiny_train_config

CPU = torch.device("cpu")
CHI2_999 = {24: 51.18, 49: 85.35}
"""0.999 quantiles of the chi-square distribution by degrees of freedom (scipy.stats.chi2.ppf)."""


def coded_images(n: int, size: int = 8) -> Tensor:
    """``n`` copies of one 1-channel image whose pixels all differ, so that a crop's content
    tells its offset and flip."""
    image = torch.arange(1, size * size + 1, dtype=torch.uint8).view(1, 1, size, size)
    return image.expand(n, 1, size, size).contiguous()


def combos(padding: int, flip: bool) -> list[tuple[int, int, int]]:
    offsets = range(-padding, padding + 1)
    return [(dy, dx, f) for dy in offsets for dx in offsets for f in ((0, 1) if flip else (0,))]


def chi_square(observed: list[int], expected: list[float]) -> float:
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))


def to_uint8(x: Tensor) -> Tensor:
    return (x * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------ the crop
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_crop_flip_equals_the_cpu_augmentation_pixel_for_pixel(padding_mode: str) -> None:
    """For the draws ``random_crop_flip`` makes from a seed (dy, dx, then the coin),
    ``crop_flip`` gives the same float image, over every offset and flip."""
    padding = 3
    images = torch.randint(0, 256, (7, 3, 8, 6), generator=torch.Generator().manual_seed(0))
    images = images.to(torch.uint8)
    expected, draws = [], []
    for seed in range(1500):
        item = seed % len(images)
        g = torch.Generator().manual_seed(seed)
        image = images[item].float().div(255)
        expected.append(
            random_crop_flip(image, padding=padding, padding_mode=padding_mode, generator=g)
        )
        g = torch.Generator().manual_seed(seed)  # the same draws, in random_crop_flip's order
        dy, dx = (int(torch.randint(-padding, padding + 1, (), generator=g)) for _ in range(2))
        draws.append((item, dy, dx, int(torch.rand((), generator=g) < 0.5)))
    plan = torch.tensor(draws).T
    out = crop_flip(images, plan[0], plan[1:], padding_mode=padding_mode)
    assert out.dtype == torch.uint8
    assert torch.equal(out.float().div(255), torch.stack(expected))
    assert {d[1:] for d in draws} == set(combos(padding, flip=True))  # every case was compared


def plan_draws(images: DeviceImages, n: int, seed: int) -> Tensor:
    return images.plan(torch.arange(n), slice(None), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("padding_mode", "flip"), [("zeros", True), ("reflect", True), ("zeros", False)]
)
def test_crops_and_flips_follow_the_cpu_distribution(padding_mode: str, flip: bool) -> None:
    """Offsets uniform over the same range, flips at rate 1/2 (none for SVHN's ``flip=False``):
    the device batches and the CPU dataset items fall into the same (dy, dx, flip) cells with
    the same frequencies (chi-square, 0.999 level)."""
    n, padding = 5000, 2
    augment = CifarAugment(padding=padding, flip=flip, padding_mode=padding_mode)
    dataset = ArrayDataset(coded_images(n), LabelTargets(torch.zeros(n)), transform=augment)
    cells = combos(padding, flip)
    one = coded_images(len(cells))
    plan = torch.tensor(cells).T
    lookup = {
        bytes(image.flatten().tolist()): cell
        for image, cell in zip(
            crop_flip(one, torch.arange(len(cells)), plan, padding_mode=padding_mode),
            cells,
            strict=True,
        )
    }
    assert len(lookup) == len(cells)  # each cell's crop is recognisable

    torch.manual_seed(0)
    cpu = Counter(lookup[bytes(to_uint8(dataset[i][0]).flatten().tolist())] for i in range(n))
    device = DeviceImages(dataset, CPU)
    batches = torch.cat([x for x, _ in device.batches(plan_draws(device, n, seed=1), 500)])
    dev = Counter(lookup[bytes(to_uint8(x).flatten().tolist())] for x in batches)

    assert set(cpu) == set(dev) == set(cells)  # the same support: every offset, no other
    dof = len(cells) - 1
    assert chi_square([dev[c] for c in cells], [n / len(cells)] * len(cells)) < CHI2_999[dof]
    pooled = [(cpu[c] + dev[c]) / 2 for c in cells]  # the two samples have the same size
    homogeneity = chi_square([cpu[c] for c in cells], pooled)
    homogeneity += chi_square([dev[c] for c in cells], pooled)
    assert homogeneity < CHI2_999[dof]
    flipped = sum(count for (_, _, f), count in dev.items() if f)
    if flip:
        assert abs(flipped / n - 0.5) < 4 * (0.25 / n) ** 0.5
    else:
        assert flipped == 0


def test_draws_are_uniform_offsets_and_fair_flips() -> None:
    draws = CropFlip(padding=4, padding_mode="reflect", flip=True).draw(
        90_000, torch.Generator().manual_seed(0)
    )
    assert draws.shape == (3, 90_000) and draws.dtype == torch.int64
    for offsets in draws[:2]:
        counts = torch.bincount(offsets + 4, minlength=9).tolist()
        assert len(counts) == 9 and chi_square(counts, [10_000.0] * 9) < 27.88  # 8 dof, 0.999
    assert abs(draws[2].float().mean().item() - 0.5) < 4 * (0.25 / 90_000) ** 0.5
    # vertical and horizontal offsets are drawn independently
    joint = torch.bincount((draws[0] + 4) * 9 + draws[1] + 4, minlength=81).tolist()
    assert chi_square(joint, [90_000 / 81] * 81) < 124.84  # 80 dof, 0.999


# ------------------------------------------------------------------------------ an epoch
def labelled_split(n: int, *, augment: bool, val_fraction: float = 0.2) -> ArrayDataset:
    """A training view whose labels are the items' storage indices (the epoch's order)."""
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    full = ArrayDataset(images.to(torch.uint8), LabelTargets(torch.arange(n)))
    transform = CifarAugment(padding=2, padding_mode="reflect") if augment else None
    train, _ = train_val_views(full, val_fraction=val_fraction, seed=0, train_transform=transform)
    return train


def epoch_batches(
    split: ArrayDataset, epoch: int, info: DistInfo, batch: int, skip: int = 0
) -> list[tuple[Tensor, Tensor]]:
    sampler = EpochSampler(len(split), seed=3, info=info)
    sampler.set_epoch(epoch)
    sampler.skip = skip
    return list(DeviceEpoch(DeviceImages(split, CPU), sampler, batch, seed=11 + epoch))


@pytest.mark.parametrize("epoch", [0, 1])
def test_an_epoch_visits_every_training_item_once_in_the_samplers_order(epoch: int) -> None:
    split = labelled_split(131, augment=False)  # 105 training items: 10 full batches of 10
    assert split.indices is not None
    batches = epoch_batches(split, epoch, DistInfo(), 10)
    sampler = EpochSampler(len(split), seed=3)
    sampler.set_epoch(epoch)
    visited = torch.cat([y for _, y in batches])
    assert len(batches) == 10 and len(visited) == 100
    # the DataLoader's order over the same sampler, the 5 left over dropped
    assert visited.tolist() == [int(split.indices[i]) for i in list(sampler)[:100]]
    assert len(set(visited.tolist())) == 100 and set(visited.tolist()) <= set(
        split.indices.tolist()
    )
    for x, y in batches:  # without augmentation: the stored images, as floats in [0, 1]
        assert torch.equal(x, split.images[y].float().div(255))


def test_each_process_takes_its_share_with_the_single_process_crops() -> None:
    """Two ranks: step k's two batches hold exactly the items of single-process batch k, each
    cropped and flipped as in the single process (draws follow the item's epoch position)."""
    split = labelled_split(131, augment=True)
    single = epoch_batches(split, 0, DistInfo(), 10)
    ranks = [epoch_batches(split, 0, DistInfo(r, 2, r), 5) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 10
    for k, (x, y) in enumerate(single):
        shares = [ranks[r][k] for r in range(2)]
        assert set(y.tolist()) == set(shares[0][1].tolist()) | set(shares[1][1].tolist())
        crops = {
            int(label): image for xs, ys in shares for image, label in zip(xs, ys, strict=True)
        }
        for image, label in zip(x, y, strict=True):
            assert torch.equal(image, crops[int(label)])


def test_skipping_the_first_batches_gives_the_same_later_batches() -> None:
    split = labelled_split(131, augment=True)
    whole = epoch_batches(split, 2, DistInfo(), 10)
    resumed = epoch_batches(split, 2, DistInfo(), 10, skip=4 * 10)
    assert len(resumed) == len(whole) - 4
    for (x1, y1), (x2, y2) in zip(whole[4:], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other_epoch = epoch_batches(split, 3, DistInfo(), 10)
    assert not torch.equal(whole[0][0], other_epoch[0][0])


# ------------------------------------------------------------------------------ the choice
def test_device_data_choice_and_refusals() -> None:
    shapes = build_dataset("shapes", n_train=32, n_test=8, image_size=16)
    detection = build_dataset("shapes-det", n_train=8, n_test=4, image_size=32, max_objects=1)
    assert device_images("auto", shapes.train, CPU, name="shapes") is None  # auto: CUDA only
    assert device_images("false", shapes.train, CPU, name="shapes") is None
    held = device_images("true", shapes.train, CPU, name="shapes")
    assert held is not None and len(held) == 32
    assert held.augment == CropFlip(padding=2, padding_mode="zeros", flip=True)
    assert device_images("auto", detection.train, CPU, name="shapes-det") is None
    with pytest.raises(AdvfeatError) as refused:
        device_images("true", detection.train, CPU, name="shapes-det")
    message = str(refused.value)
    assert "\n" not in message and "device_data=true" in message and "'shapes-det'" in message
    assert "BoxTargets" in message
    files = ImageFiles([("a.png", 0)], transform=None)
    assert "read item by item (ImageFiles)" in (device_data_refusal(files) or "")


def test_device_data_true_on_a_dense_dataset_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "train", "--method", "standard", "--model", "deeplabv3plus_tiny", "--dataset", "shapes-seg",
        "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--out", str(tmp_path / "run"), "--quiet",
        "--set", "dataset_options={n_train: 16, n_test: 8, image_size: 32, max_objects: 1}",
        "--set", "device_data=true",
    ]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("advfeat: error:") and "Traceback" not in err
    assert "device_data=true" in err and "'shapes-seg'" in err and "MaskTargets" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_device_data_values_from_the_command_line() -> None:
    cfg = apply_overrides(TrainConfig(), {"device_data": True})  # YAML reads `true` as a bool
    assert cfg.device_data == "true"
    assert apply_overrides(TrainConfig(), {"device_data": False}).device_data == "false"
    cfg.validate()
    with pytest.raises(AdvfeatError, match="device_data"):
        apply_overrides(TrainConfig(), {"device_data": "sometimes"}).validate()


# ------------------------------------------------------------------------------ training
def tiny_config(**overrides: object) -> TrainConfig:
    """3 epochs in batches of 32 on 192 images held on the device."""
    schedule = dict(epochs=3, batch_size=32, eval_batch_size=64, lr=0.05, device_data="true")
    return tiny_train_config(n_train=192, n_test=64, **(schedule | overrides))


def weights(run: Path) -> dict[str, Tensor]:
    return load_checkpoint(run / "checkpoint.pt")["model"]


def test_a_run_trains_on_device_held_images(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(), tmp_path / "run")
    assert trainer.device_images is not None
    assert isinstance(trainer._loader(0), DeviceEpoch)
    metrics = trainer.fit()
    losses = [row["train_loss"] for row in metrics["history"]]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert losses[2] < losses[0]
    assert all(0 <= row["train_acc"] <= 1 for row in metrics["history"])


def test_without_augmentation_device_data_trains_exactly_as_the_dataloader(tmp_path: Path) -> None:
    """Same order, same float images, same global RNG: bit-identical weights and history."""
    runs = {}
    for choice in ("true", "false"):
        cfg = tiny_config(device_data=choice, augment=False, epochs=2)
        runs[choice] = Trainer(cfg, tmp_path / choice).fit()["history"]
    a, b = weights(tmp_path / "true"), weights(tmp_path / "false")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in runs["true"]] == [r["train_loss"] for r in runs["false"]]


def test_preempted_mid_epoch_then_resumed_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(max_steps_per_epoch=4, epochs=2)
    Trainer(tiny_config(max_steps_per_epoch=4, epochs=2), tmp_path / "straight").fit()
    original = Trainer.set_lr
    sent = {"done": False}

    def signal_in_epoch_two(self: Trainer, progress: float, *rest: int) -> float:
        if progress > 1.25 and not sent["done"]:  # the third step of the second epoch
            sent["done"] = True
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, progress, *rest)

    monkeypatch.setattr(Trainer, "set_lr", signal_in_epoch_two)
    with pytest.raises(Preempted):
        Trainer(cfg, tmp_path / "run").fit()
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["partial"]["step"] == 3
    Trainer(cfg, tmp_path / "run", resume=True).fit()
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
    h1, h2 = (
        json.loads((tmp_path / r / "metrics.json").read_text())["history"]
        for r in ("straight", "run")
    )
    assert [(r["train_loss"], r["train_acc"]) for r in h1] == [
        (r["train_loss"], r["train_acc"]) for r in h2
    ]
