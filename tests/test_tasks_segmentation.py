"""DeepLab task: pixel loss with ignore index, A-FAN/ALFA objectives, mIoU, image PGD, checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from advfeat.data import build_dataset
from advfeat.errors import AdvfeatError
from advfeat.methods.registry import build_task_method
from advfeat.norm.stats import frozen_bn_statistics
from advfeat.tasks import (
    DensePGD,
    SegmentationMeter,
    SegmentationTask,
    build_segmenter,
    confusion_matrix,
    iou_from_confusion,
)
from advfeat.tasks.base import HookPass, TaskPass

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def seg_data() -> tuple[SegmentationTask, Tensor, Tensor, tuple[float, ...], tuple[float, ...]]:
    bundle = build_dataset("shapes-seg", n_train=8, n_test=4, image_size=32, max_objects=1,
                           ignore_boundary=True, augment=False)  # fmt: skip
    task = SegmentationTask(bundle.num_classes)
    images, masks = task.collate([bundle.train[i] for i in range(4)])
    return task, images, masks, bundle.mean, bundle.std


def tiny_segmenter(num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_segmenter("deeplabv3plus_tiny", num_classes, mean=mean, std=std).train()


def clean_loss(task: SegmentationTask, model: nn.Module, images: Tensor, masks: Tensor) -> float:
    """Training-mode loss (batch statistics, fixed dropout), moving no running statistic."""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), frozen_bn_statistics(model.train()):
        torch.manual_seed(7)
        return float(task.loss(model, images, masks)[0])


@pytest.mark.parametrize(
    ("method", "options"), [("standard", {}), ("afan", {"alpha": 0.05}), ("alfa", {"steps": 1})]
)
def test_training_lowers_the_segmentation_loss(seg_data, method: str, options: dict) -> None:
    task, images, masks, mean, std = seg_data
    model = tiny_segmenter(task.num_classes, mean, std)
    objective = build_task_method(method, task, **options)
    if method != "standard":
        assert objective.resolve_sites(model) == ["backbone.layer4", "decoder"]
    before = clean_loss(task, model, images, masks)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(8):
        out = objective(model.train(), images, masks)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert clean_loss(task, model, images, masks) < 0.7 * before


def test_miou_matches_a_hand_computation_with_ignore_index() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    m = confusion_matrix(pred, target, num_classes=3, ignore_index=255)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 → 1/3; class 1: TP 3, FP 1, FN 0 → 3/4;
    # class 2: TP 1, FP 0 (the ignored pixel does not count), FN 1 → 1/2
    miou, iou = iou_from_confusion(m)
    assert iou.tolist() == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert miou == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    meter = SegmentationMeter(4)
    meter.update(pred[None], target[None])
    result = meter.compute()
    assert math.isnan(result["iou_per_class"][3])  # absent class left out of the mean
    assert result["miou"] == pytest.approx(miou) and result["pixel_acc"] == pytest.approx(5 / 7)


def test_miou_equals_torchmetrics_macro_jaccard_to_float32_precision() -> None:
    """Classes absent from both masks (4, 5), from the prediction only, from the target only,
    and 20 % ignored pixels: the same mean as torchmetrics, which divides in float32."""
    classification = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        target = torch.randint(0, 4, (3, 9, 11), generator=g)
        pred = torch.randint(0, 4, (3, 9, 11), generator=g)
        if trial % 2:
            pred[pred == 3] = 2
        else:
            target[target == 1] = 0
        target[torch.rand(target.shape, generator=g) < 0.2] = 255
        ours = SegmentationMeter(6, ignore_index=255)
        ours.update(pred, target)
        result = ours.compute()
        theirs = classification.MulticlassJaccardIndex(6, average="macro", ignore_index=255)
        theirs.update(pred, target)
        assert result["miou"] == pytest.approx(float(theirs.compute()), abs=1e-7)
        per_class = classification.MulticlassJaccardIndex(6, average="none", ignore_index=255)
        per_class.update(pred, target)
        expected = [0.0 if math.isnan(v) else v for v in result["iou_per_class"]]
        assert per_class.compute().tolist() == pytest.approx(expected, abs=1e-7)
        assert math.isnan(result["iou_per_class"][4]) and math.isnan(result["iou_per_class"][5])


def test_decoder_perturbation_reaches_the_loss_and_keeps_bn(seg_data) -> None:
    task, images, masks, mean, std = seg_data
    model = tiny_segmenter(task.num_classes, mean, std)
    alfa = build_task_method("alfa", task, steps=1, alpha=0.1, sites=["decoder"])
    with torch.no_grad():
        clean = alfa.clean_pass(model, images, masks, ["decoder"])  # moves BN statistics
    bn = {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k
    }
    delta = alfa.feature_attack(model, clean, "decoder", clean.features["decoder"], masks, 0.1)
    assert delta.abs().max() == pytest.approx(0.1)
    assert (delta != 0).float().mean() > 0.5  # gradient reached most of the feature
    assert all(torch.equal(model.state_dict()[k], v) for k, v in bn.items())
    assert model.training and all(p.grad is None for p in model.parameters())
    pgd = DensePGD(task, eps=8 / 255, alpha=2 / 255, steps=2)
    adv = pgd(model, images, masks)
    assert (adv - images).abs().max() <= 8 / 255 + 1e-6 and adv.min() >= 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in bn.items())
    with torch.no_grad():
        assert task.loss(model.eval(), adv, masks)[0] > task.loss(model.eval(), images, masks)[0]


def test_afn_feeds_the_adversarial_channel_statistics(seg_data) -> None:
    task, images, masks, mean, std = seg_data
    model = tiny_segmenter(task.num_classes, mean, std)
    afan = build_task_method("afan", task, k=1, alpha=0.5, sites=["decoder"])
    fed: list[Tensor] = []
    handle = model.classifier.register_forward_pre_hook(lambda _m, a: fed.append(a[0].detach()))
    try:
        afan(model, images, masks)
    finally:
        handle.remove()
    clean, mixed = fed[0], fed[-1]
    dims = (0, 2, 3)
    # AFN keeps the clean feature's normalised content: the per-channel z-scores agree
    z = lambda f: (f - f.mean(dims, keepdim=True)) / f.std(dims, keepdim=True)  # noqa: E731
    assert torch.allclose(z(clean), z(mixed), atol=1e-3)
    assert not torch.allclose(clean.mean(dims), mixed.mean(dims), atol=1e-4)


def test_bad_segmentation_input_raises_clear_errors(seg_data) -> None:
    task, images, masks, mean, std = seg_data
    model = tiny_segmenter(task.num_classes, mean, std)
    standard = build_task_method("standard", task)
    with pytest.raises(AdvfeatError, match="same height and width"):
        standard(model, images, masks[:, :16, :16])
    with pytest.raises(AdvfeatError, match="classes"):
        standard(model, images, torch.full_like(masks, task.num_classes))
    with pytest.raises(AdvfeatError, match="integer"):
        standard(model, images, masks.float())
    with pytest.raises(AdvfeatError, match="model has 3 classes"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3)
    with pytest.raises(AdvfeatError, match="deeplabv3plus_tiny"):
        build_segmenter("deeplabv3plus_tiyn", 3)
    all_ignored = torch.full_like(masks, 255)
    assert standard(model, images, all_ignored).loss.item() == 0.0


def test_torchvision_deeplab_and_deeplabv3plus_have_the_afan_sites() -> None:
    task = SegmentationTask(5)
    for name, sites in (
        ("deeplabv3_resnet50", ["backbone.layer4", "classifier.3"]),
        ("deeplabv3plus_resnet50", ["backbone.layer4", "decoder"]),
    ):
        model = build_segmenter(name, 5)
        assert task.default_sites(model) == sites
        assert hasattr(model, "normalize")


class WholeModelSegmentation(SegmentationTask):
    """The reference: every attack and adversarial pass runs the whole segmenter."""

    def clean_pass(self, model: nn.Module, x: Any, y: Any, sites: Sequence[str]) -> TaskPass:
        return HookPass(self, model, x, y, sites)


def _deeplab_afan_step(
    task: SegmentationTask, images: Tensor, masks: Tensor
) -> tuple[Tensor, dict[str, Tensor], dict[str, int]]:
    """One A-FAN step (k = 3, PGD-1 rescaled: one attack and 3 adversarial passes per site) on
    torchvision's DeepLabV3-MobileNetV3 (the benchmark's segmenter): loss, gradients and the
    forward calls of the modules before, at and after the sites."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_segmenter("deeplabv3_mobilenet_v3_large", task.num_classes).train()
        afan = build_task_method("afan", task, k=3, alpha=0.05)
        watched = ["normalize", "backbone.0", "backbone.16", "classifier.0", "classifier.4"]
        calls = dict.fromkeys(watched, 0)
        handles = [
            model.get_submodule(name).register_forward_hook(
                lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
            )
            for name in watched
        ]
        try:
            out = afan(model, images, masks)
        finally:
            for handle in handles:
                handle.remove()
    model.zero_grad()
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, calls


def test_deeplab_afan_runs_the_prefix_once_and_equals_the_whole_model(seg_data) -> None:
    task, images, masks, _, _ = seg_data
    fast = SegmentationTask(task.num_classes)
    afan = build_task_method("afan", fast)
    model = build_segmenter("deeplabv3_mobilenet_v3_large", task.num_classes)
    assert afan.resolve_sites(model) == ["backbone.16", "classifier.3"]
    loss, grads, calls = _deeplab_afan_step(fast, images[:2], masks[:2])
    # the normalization and the backbone run once (clean pass); the ASPP once more for each of
    # the 4 tails after the backbone site, the last 1x1 conv for the 4 + 4 tails of both sites
    assert calls == {
        "normalize": 1,
        "backbone.0": 1,
        "backbone.16": 1,
        "classifier.0": 1 + 4,
        "classifier.4": 1 + 4 + 4,
    }
    ref_loss, ref_grads, ref_calls = _deeplab_afan_step(
        WholeModelSegmentation(task.num_classes), images[:2], masks[:2]
    )
    assert ref_calls["backbone.0"] == 1 + 4 + 4  # the reference re-runs the prefix every pass
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("name", "site"),
    [
        ("deeplabv3_mobilenet_v3_large", "backbone.15.block"),  # then `result += input` on it
        ("deeplabv3_mobilenet_v3_large", "backbone.16.1"),  # BN, then Hardswish(inplace=True)
        ("deeplabv3plus_tiny", "decoder.1.1"),  # BN, then ReLU(inplace=True)
    ],
)
def test_in_place_site_feature_is_the_site_output_and_zero_delta_tail_is_clean(
    seg_data, name: str, site: str
) -> None:
    """The clean pass records the site's output as the site returned it, before the rest of the
    segmenter writes into it; the tail from that feature (δ = 0) runs only after the site and
    gives the clean losses."""
    task, images, masks, mean, std = seg_data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_segmenter(name, task.num_classes, mean=mean, std=std).train()
    returned: dict[str, Tensor] = {}

    def record(_m: nn.Module, _a: Any, output: Tensor) -> None:
        returned["copy"], returned["live"] = output.detach().clone(), output

    handle = model.get_submodule(site).register_forward_hook(record)
    try:
        clean = task.clean_pass(model, images[:2], masks[:2], [site])
    finally:
        handle.remove()
    assert not torch.equal(returned["live"], returned["copy"])  # written into after the site
    torch.testing.assert_close(clean.features[site].detach(), returned["copy"], rtol=0, atol=0)
    first = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    calls: list[int] = []
    stem = model.get_submodule(first).register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            tail = clean.tail(site, clean.features[site].detach(), prefix_grad=False)
    finally:
        stem.remove()
    assert not calls  # tail-only: the layers before the site do not run again
    loss, parts = task.output_loss(tail, masks[:2])
    assert parts.keys() == clean.parts.keys()
    torch.testing.assert_close(loss, clean.loss.detach(), rtol=1e-6, atol=1e-7)
