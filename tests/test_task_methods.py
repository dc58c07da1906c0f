"""One ALFA / A-FAN for every task: the options that behaved differently between the dense copy
and the classification classes now follow one rule, checked on a classifier and a detector."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from advfeat.data import build_dataset
from advfeat.errors import AdvfeatError
from advfeat.methods import build_method
from advfeat.methods.registry import build_task_method, task_methods
from advfeat.tasks import ClassificationTask, DetectionTask, Task, build_detector

torch.set_num_threads(1)

ROI = "roi_heads.box_head"


@pytest.fixture(scope="module")
def detection() -> tuple[DetectionTask, nn.Module, list[Tensor], list[dict[str, Tensor]]]:
    bundle = build_dataset(
        "shapes-det", n_train=4, n_test=1, image_size=64, max_objects=2, augment=False
    )
    task = DetectionTask(bundle.num_classes)
    images, targets = task.collate([bundle.train[i] for i in range(2)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_detector(
            "fasterrcnn_tiny", bundle.num_classes, image_size=64, mean=bundle.mean, std=bundle.std
        ).train()
    return task, model, images, targets


Case = tuple[Task, nn.Module, Any, Any, str]


@pytest.fixture(params=["classification", "detection"])
def case(request: pytest.FixtureRequest, tiny_bn_cnn: nn.Module) -> Case:
    """(task, model, inputs, targets, site) for each task."""
    if request.param == "classification":
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(6, 3, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)
        return ClassificationTask(3), tiny_bn_cnn.train(), x, y, "block1"
    task, model, images, targets = request.getfixturevalue("detection")
    return task, model, images, targets, ROI


def _count_attacks(method: nn.Module) -> list[Tensor]:
    """Record every feature attack's δ (monkeypatching the method instance)."""
    deltas: list[Tensor] = []
    original = method.feature_attack

    def counted(*args: Any, **kwargs: Any) -> Tensor:
        delta = original(*args, **kwargs)
        deltas.append(delta)
        return delta

    method.feature_attack = counted  # type: ignore[method-assign]
    return deltas


def test_afan_rescales_one_attack_only_when_exact(case: Case) -> None:
    """Dense A-FAN used to rescale one attack whenever ``steps == 1``; now, as for
    classification, only when every strength stays inside the ball (α ≤ ε): past ε it runs k
    attacks and every δ stays in the ball."""
    task, model, x, y, site = case
    bounded = build_task_method(
        "afan", task, site=site, k=3, alpha=0.05, eps=0.01, steps=1, strength_spacing="grid"
    )
    assert not bounded.uses_rescaling
    deltas = _count_attacks(bounded)
    torch.manual_seed(0)
    bounded(model, x, y)
    assert len(deltas) == 3
    assert all(float(d.abs().max()) <= 0.01 + 1e-7 for d in deltas)
    unbounded = build_task_method("afan", task, site=site, k=3, alpha=0.05, eps=None, steps=1)
    assert unbounded.uses_rescaling
    deltas = _count_attacks(unbounded)
    torch.manual_seed(0)
    unbounded(model, x, y)
    assert len(deltas) == 1


def test_afan_noise_ablation_has_std_alpha(case: Case) -> None:
    """Table 8's "Random Noise + AFN": noise from N(0, α²) for each of the k features (the
    dense copy used the sampled strength α_i instead of α)."""
    task, model, x, y, site = case
    alpha = 0.2
    afan = build_task_method(
        "afan", task, site=site, k=4, alpha=alpha, random_noise="gaussian", strength_spacing="grid"
    )
    clean = afan.clean_pass(model, x, y, [site])
    f = clean.features[site].detach()
    pairs = afan.perturbations(model, clean, site, f, y, torch.tensor([0.05, 0.1, 0.15, 0.2]))
    assert len(pairs) == 4
    for delta, scale in pairs:
        assert scale == 1.0
        assert float(delta.std()) == pytest.approx(alpha, rel=0.15)


def test_alfa_eps_bounds_every_step_for_every_task(case: Case) -> None:
    """ALFA's ``eps`` (the dense copy's option, now shared): δ stays in [-eps, eps]."""
    task, model, x, y, site = case
    alfa = build_task_method("alfa", task, site=site, steps=3, alpha=0.02, eps=0.03)
    clean = alfa.clean_pass(model, x, y, [site])
    f = clean.features[site]
    delta = alfa.feature_attack(model, clean, site, f, y, 0.02, 0.03)
    assert float(delta.abs().max()) == pytest.approx(0.03, abs=1e-7)
    free = alfa.feature_attack(model, clean, site, f, y, 0.02, None)
    assert float(free.abs().max()) == pytest.approx(0.06, abs=1e-6)


def test_site_option_and_dense_refusal_of_joint_sites(detection: Any) -> None:
    """``site`` (classification's option) names one site for every task; ``multi_site="joint"``
    needs a model that maps images to outputs and is refused for detection in one line."""
    task, model, _, _ = detection
    assert build_task_method("alfa", task, site=ROI).resolve_sites(model) == [ROI]
    assert build_task_method("alfa", task).resolve_sites(model) == task.default_sites(model)
    with pytest.raises(AdvfeatError, match=r"multi_site='joint'.*detection"):
        build_task_method("alfa", task, multi_site="joint")
    with pytest.raises(AdvfeatError, match="no detection version"):
        build_method("advprop", task=task)
    assert task_methods("detection") == ["afan", "alfa", "standard"]


def test_task_defaults_and_classification_defaults() -> None:
    """Dense defaults are A-FAN §5's setting with the papers' sum (docs/results.md §16); the
    user's options win; classification keeps its own defaults."""
    det = DetectionTask(3)
    afan = build_task_method("afan", det)
    assert (afan.opts.alpha, afan.opts.k, afan.opts.eps) == (0.3 / 255, 5, None)
    assert (afan.opts.loss_weighting, afan.opts.adv_bn_stats) == ("sum", "frozen")
    assert build_task_method("alfa", det).opts.loss_weighting == "sum"
    assert build_task_method("alfa", det, loss_weighting="mean").opts.loss_weighting == "mean"
    cls = build_method("afan")
    assert (cls.opts.alpha, cls.opts.k, cls.opts.eps) == (1.0 / 255, 3, 8 / 255)
    alfa = build_method("alfa")
    assert cls.opts.adv_bn_stats == "update" and alfa.opts.adv_bn_stats == "update"
    # classification: the papers' sum too (docs/results.md §10)
    assert alfa.opts.loss_weighting == "sum" and cls.opts.loss_weighting == "sum"
    assert build_method("l-alfa").opts.loss_weighting == "sum"
