"""Faster R-CNN task: losses, A-FAN/ALFA objectives, metrics, image PGD and input checks."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

from advfeat.data import build_dataset
from advfeat.errors import AdvfeatError
from advfeat.methods.registry import build_task_method
from advfeat.tasks import (
    DensePGD,
    DetectionMeter,
    DetectionTask,
    build_detector,
)
from advfeat.tasks.base import HookPass, RngReplay
from advfeat.tasks.detection_pass import DetectionPass

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def det_data() -> tuple[
    DetectionTask, list[Tensor], list[dict[str, Tensor]], tuple[float, ...], tuple[float, ...]
]:
    bundle = build_dataset(
        "shapes-det", n_train=8, n_test=4, image_size=64, max_objects=2, augment=False
    )
    task = DetectionTask(bundle.num_classes)
    images, targets = task.collate([bundle.train[i] for i in range(2)])
    return task, images, targets, bundle.mean, bundle.std


def tiny_detector(
    num_classes: int, mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0
) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_detector(
            "fasterrcnn_tiny", num_classes, image_size=64, mean=mean, std=std
        ).train()


def clean_loss(task: DetectionTask, model: nn.Module, images: list[Tensor], targets: list) -> float:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(123)
        return float(task.loss(model.train(), images, targets)[0])


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("standard", {}),
        ("afan", {"k": 2, "alpha": 0.05, "sites": ["backbone.body.layer4", "roi_heads.box_head"]}),
    ],
)
def test_training_lowers_the_detection_loss(det_data, method: str, options: dict) -> None:
    task, images, targets, mean, std = det_data
    model = tiny_detector(task.num_classes, mean, std)
    objective = build_task_method(method, task, **options)
    before = clean_loss(task, model, images, targets)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(6):
        out = objective(model.train(), images, targets)
        assert torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    if method == "afan":
        assert out.logs["loss_adv"] > 0 and out.logs["delta_l2"] > 0
    assert clean_loss(task, model, images, targets) < 0.8 * before


@pytest.mark.parametrize("weighting", ["sum", "mean"])
def test_afan_loss_is_clean_plus_lambda_times_adversarial(det_data, weighting: str) -> None:
    task, images, targets, mean, std = det_data
    model = tiny_detector(task.num_classes, mean, std)
    afan = build_task_method(
        "afan", task, k=2, lam=0.5, sites=["roi_heads.box_head"], loss_weighting=weighting
    )
    torch.manual_seed(1)
    out = afan(model, images, targets)
    total = out.logs["loss_clean"] + 0.5 * out.logs["loss_adv"]
    if weighting == "mean":  # convex combination: 2 adversarial terms of weight λ = 0.5
        total /= 1 + 0.5 * 2
    assert out.loss.item() == pytest.approx(total, rel=1e-5)


def test_dense_tail_only_reading_gives_the_backbone_no_adversarial_gradient(det_data) -> None:
    task, images, targets, mean, std = det_data
    model = tiny_detector(task.num_classes, mean, std).train()
    site = "roi_heads.box_head"
    afan = build_task_method(
        "afan", task, k=2, sites=[site], adv_grad="tail", lam=1.0, loss_weighting="mean"
    )
    torch.manual_seed(1)
    out = afan(model, images, targets)
    model.zero_grad()
    out.loss.backward()
    with_adv = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # the clean loss alone, same weighting factor (mean of 1 + k terms)
    model.zero_grad()
    torch.manual_seed(1)
    clean, _ = task.loss(model, images, targets)
    (clean / 3).backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone") and p.grad is not None:
            torch.testing.assert_close(with_adv[name], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("site", ["backbone.body.layer2", "roi_heads.box_head"])
def test_site_perturbation_reaches_the_loss_and_attack_keeps_bn(det_data, site: str) -> None:
    task, images, targets, mean, std = det_data
    model = tiny_detector(task.num_classes, mean, std)
    alfa = build_task_method("alfa", task, steps=2, alpha=0.1, sites=[site])
    rng = RngReplay(torch.device("cpu"))
    with torch.no_grad():
        clean = alfa.clean_pass(model, images, targets, [site])  # moves BN statistics
    bn = {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k
    }
    flags = [p.requires_grad for p in model.parameters()]
    delta = alfa.feature_attack(model, clean, site, clean.features[site], targets, 0.1)
    assert delta.abs().max() > 0  # nonzero gradient w.r.t. the perturbation reached the site
    assert delta.abs().max() <= 0.2 + 1e-6  # two unbounded sign steps of 0.1
    for k, v in model.state_dict().items():
        if k in bn:
            assert torch.equal(v, bn[k]), k
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert all(p.grad is None for p in model.parameters())
    # the perturbation increases the attacked loss (sign ascent)
    with rng.replay(), torch.no_grad():
        base = float(task.attack_objective(model, images, targets))
    with rng.replay(), torch.no_grad():
        attacked = float(task.attack_objective(model, images, targets, {site: lambda f: f + delta}))
    assert attacked > base


def test_image_pgd_stays_in_the_ball_and_raises_the_loss(det_data) -> None:
    task, images, targets, mean, std = det_data
    model = tiny_detector(task.num_classes, mean, std)
    originals = [x.clone() for x in images]
    bn = copy.deepcopy(model.state_dict())
    attack = DensePGD(task, eps=8 / 255, alpha=2 / 255, steps=3)
    adv = attack(model, images, targets)
    for x, x0, a in zip(images, originals, adv, strict=True):
        assert torch.equal(x, x0)
        assert (a - x).abs().max() <= 8 / 255 + 1e-6 and a.min() >= 0 and a.max() <= 1
    assert all(torch.equal(v, bn[k]) for k, v in model.state_dict().items())

    def objective(xs: list[Tensor]) -> float:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), task.attack_mode(model, "eval"):
            torch.manual_seed(5)
            return float(task.attack_objective(model, xs, targets))

    assert objective(adv) > objective(images)
    model.train()


def test_map_of_perfect_shuffled_and_hand_computed_predictions() -> None:
    gt = [
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40]]),
            "labels": torch.tensor([1, 2]),
        },
        {"boxes": torch.tensor([[5.0, 5, 30, 30]]), "labels": torch.tensor([1])},
    ]
    perfect = [{**t, "scores": torch.ones(len(t["labels"]))} for t in gt]
    meter = DetectionMeter()
    meter.update(perfect, gt)
    assert meter.compute() == {"ap": 1.0, "ap50": 1.0, "ap75": 1.0}
    shuffled = [{**p, "labels": p["labels"].flip(0)} for p in perfect]
    meter = DetectionMeter()
    meter.update(shuffled, gt)
    assert meter.compute()["ap50"] < 1.0
    # one class, two objects: one found (score 0.9), one false positive (0.8), one missed.
    # precision 1 up to recall 0.5, then 0: COCO's 101-point AP = 51/101.
    one = [
        {
            "boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]),
            "labels": torch.tensor([1, 1]),
        }
    ]
    pred = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [80, 80, 90, 90]]), "labels": torch.tensor([1, 1]),
             "scores": torch.tensor([0.9, 0.8])}]  # fmt: skip
    meter = DetectionMeter()
    meter.update(pred, one)
    assert meter.compute()["ap50"] == pytest.approx(51 / 101, abs=1e-4)


def test_bad_detection_input_raises_clear_errors(det_data) -> None:
    task, images, targets, mean, std = det_data
    afan = build_task_method("afan", task, k=1)
    model = tiny_detector(task.num_classes, mean, std)
    degenerate = [{"boxes": torch.tensor([[10.0, 10, 10, 20]]), "labels": torch.tensor([1])}] * 2
    with pytest.raises(AdvfeatError, match="degenerate"):
        afan(model, images, degenerate)
    beyond = [
        {"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([task.num_classes])}
    ] * 2
    with pytest.raises(AdvfeatError, match="out of range"):
        afan(model, images, beyond)
    with pytest.raises(AdvfeatError, match="one target dict per image"):
        afan(model, images, targets[:1])
    with pytest.raises(AdvfeatError, match=r"\[0, 1\]"):
        afan(model, [x * 255 for x in images], targets)
    with pytest.raises(AdvfeatError, match=r"roi_heads\.box_head"):
        build_task_method("afan", task, sites=["roi_heads.box_heda"])(model, images, targets)
    with pytest.raises(AdvfeatError, match="k"):
        build_task_method("afan", task, k=0)
    with pytest.raises(AdvfeatError, match="standard"):
        build_task_method("standrd", task)


def _afan_step(
    task: DetectionTask, model: nn.Module, images: list[Tensor], targets: list, **options: Any
) -> tuple[Tensor, dict[str, Tensor]]:
    afan = build_task_method("afan", task, k=2, alpha=0.05, strength_spacing="grid", **options)
    torch.manual_seed(3)
    out = afan(model, images, targets)
    model.zero_grad()
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


@pytest.mark.parametrize(
    "site", ["backbone.body.layer4", "backbone.body.layer2", "roi_heads.box_head"]
)
@pytest.mark.parametrize("adv_grad", ["full", "tail"])
def test_stage_by_stage_tails_equal_the_whole_detector(det_data, site: str, adv_grad: str) -> None:
    """Losses and gradients of A-FAN with the fast tails (transform and prefix once, ROI-head
    sites from the clean proposals) equal those of the reference: the whole detector per pass."""
    task, images, targets, mean, std = det_data
    fast = DetectionTask(task.num_classes)
    slow = DetectionTask(task.num_classes, fast_tails=False)
    model = tiny_detector(task.num_classes, mean, std)
    assert isinstance(fast.clean_pass(model, images, targets, [site]), DetectionPass)
    assert isinstance(slow.clean_pass(model, images, targets, [site]), HookPass)
    model = tiny_detector(task.num_classes, mean, std)
    loss_fast, grads_fast = _afan_step(
        fast, model, images, targets, sites=[site], adv_grad=adv_grad
    )
    model = tiny_detector(task.num_classes, mean, std)
    loss_slow, grads_slow = _afan_step(
        slow, model, images, targets, sites=[site], adv_grad=adv_grad
    )
    torch.testing.assert_close(loss_fast, loss_slow, rtol=1e-5, atol=1e-6)
    assert grads_fast.keys() == grads_slow.keys()
    for name, g in grads_fast.items():
        torch.testing.assert_close(g, grads_slow[name], rtol=1e-4, atol=1e-6, msg=name)


def test_stage_by_stage_clean_pass_is_the_detector_forward(det_data) -> None:
    task, images, targets, mean, std = det_data
    model = tiny_detector(task.num_classes, mean, std)
    torch.manual_seed(11)
    staged = DetectionPass(task, model, images, targets, ["roi_heads.box_head"])
    torch.manual_seed(11)
    reference = model(images, targets)
    assert list(staged.parts) == list(reference)
    for key, value in reference.items():
        torch.testing.assert_close(staged.parts[key], value, rtol=0, atol=0)
    # a ROI-head tail runs the box predictor alone: the box head never runs again
    calls: list[int] = []
    handle = model.roi_heads.box_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        feature = staged.features["roi_heads.box_head"]
        tail = staged.tail("roi_heads.box_head", feature.detach(), prefix_grad=False)
    finally:
        handle.remove()
    assert not calls
    for key, value in reference.items():
        torch.testing.assert_close(tail[key], value.detach(), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def mobilenet_detector(det_data) -> nn.Module:
    """torchvision's Faster R-CNN MobileNetV3-Large FPN, random weights, 64-pixel inputs."""
    task = det_data[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return fasterrcnn_mobilenet_v3_large_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=task.num_classes,
            min_size=64,
            max_size=64,
        ).train()


@pytest.mark.parametrize(
    ("site", "in_place"),
    [
        ("backbone.body.15.block", True),  # the block then runs `result += input` on it
        ("backbone.body.16.1", True),  # batch norm followed by Hardswish(inplace=True)
        ("backbone.body.16", False),  # the body's last stage: the tail is the FPN onwards
    ],
)
def test_mobilenet_detector_site_feature_is_the_site_output_and_zero_delta_tail_is_clean(
    det_data, mobilenet_detector: nn.Module, site: str, in_place: bool
) -> None:
    """The clean pass records the site's output as the site returned it, before the rest of the
    detector writes into it; the tail from that feature (δ = 0) gives the clean losses."""
    task, images, targets, _, _ = det_data
    model = mobilenet_detector
    returned: dict[str, Tensor] = {}

    def record(_m: nn.Module, _a: Any, output: Tensor) -> None:
        returned["copy"], returned["live"] = output.detach().clone(), output

    handle = model.get_submodule(site).register_forward_hook(record)
    try:
        torch.manual_seed(4)
        clean = task.clean_pass(model, images, targets, [site])
    finally:
        handle.remove()
    assert isinstance(clean, DetectionPass)
    # the site is (or is not) written into later in the forward pass
    assert torch.equal(returned["live"], returned["copy"]) is not in_place
    torch.testing.assert_close(clean.features[site].detach(), returned["copy"], rtol=0, atol=0)
    calls: list[int] = []
    stem = model.get_submodule("backbone.body.0").register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            tail = clean.tail(site, clean.features[site].detach(), prefix_grad=False)
    finally:
        stem.remove()
    if site == "backbone.body.16":
        assert not calls  # the last stage's tail starts at the FPN
    assert sorted(tail) == sorted(clean.parts)
    for key, value in clean.parts.items():
        torch.testing.assert_close(tail[key], value.detach(), rtol=1e-5, atol=1e-6, msg=key)
