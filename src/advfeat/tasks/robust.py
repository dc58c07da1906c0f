"""Image-space PGD against detectors and segmenters: robust AP / robust mIoU (A-FAN Tables 5-6).

A-FAN evaluates robustness with PGD-10 on the images: α = 0.3/255, ε = 2/255 for detection
(following Xie et al. 2017 and Li et al.), α = 1/255, ε = 8/255 for segmentation. The loss
ascended is the task's training loss against the ground truth (:meth:`DenseTask.attack_loss`);
detectors run in training mode so that they return losses, with batch norm in eval mode
(running statistics) unless ``bn_mode="train"``; running statistics never move, and the model's
flags, ``requires_grad`` and ``.grad`` are restored (:func:`advfeat.attacks.base.attack_guard`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from advfeat.attacks.base import Attack, attack_guard
from advfeat.attacks.engine import IterativeAscent, Variable
from advfeat.attacks.threat import Linf
from advfeat.errors import AdvfeatError
from advfeat.tasks.base import DenseTask, Task, check_images

__all__ = ["DETECTION_PGD", "SEGMENTATION_PGD", "DensePGD", "robust_evaluate"]

DETECTION_PGD = {"eps": 2 / 255, "alpha": 0.3 / 255, "steps": 10}
"""A-FAN §5: PGD-10, α = 0.3/255, ε = 2/255."""
SEGMENTATION_PGD = {"eps": 8 / 255, "alpha": 1 / 255, "steps": 10}
"""A-FAN §6: PGD-10, α = 1/255, ε = 8/255."""


class DensePGD(Attack):
    """L∞ PGD on the images of a dense task (A-FAN Tables 5-6), an :class:`Attack`.

    ``attack(images, targets)`` for the ``model`` given here, or ``attack(model, images,
    targets)`` (what :meth:`DenseTask.evaluate` calls). Images are a list of ``[3, H, W]``
    tensors (detection) or ``[N, 3, H, W]`` (segmentation), in [0, 1]; the result has the same
    structure, lies in the ε-ball and in [0, 1], and the input is not modified. The ascent is
    :class:`~advfeat.attacks.engine.IterativeAscent` (one variable per image tensor) on the
    task's attack loss (:meth:`Task.attack_loss`): a :class:`DenseTask`'s, or that of any task
    evaluated by its :meth:`Task.evaluate` (one of one's own). ``random_start`` starts from a uniform point
    of the ball, drawn from a generator seeded with ``seed`` at every call; the global RNG is
    left as it was (the attack's passes fork it). The attack guarantees of :class:`Attack` hold
    (flags, ``requires_grad``, ``.grad`` and BN running statistics restored).
    """

    def __init__(
        self,
        task: Task,
        *,
        eps: float,
        alpha: float,
        steps: int = 10,
        random_start: bool = False,
        bn_mode: str = "eval",
        seed: int = 0,
        model: nn.Module | None = None,
    ) -> None:
        if not eps >= 0 or not alpha > 0:
            raise AdvfeatError(
                f"PGD needs eps >= 0 and alpha > 0, got eps={eps!r}, alpha={alpha!r}"
            )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise AdvfeatError(f"steps must be an integer >= 1, got {steps!r}")
        if bn_mode not in ("eval", "train"):
            raise AdvfeatError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
        super().__init__(model if model is not None else nn.Module(), bn_mode="train", seed=seed)
        self.task, self.eps, self.alpha, self.steps = task, float(eps), float(alpha), steps
        self.random_start, self.task_bn_mode = random_start, bn_mode
        self.threat = Linf()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) not in (2, 3):
            raise AdvfeatError(
                "call DensePGD as attack(images, targets) or (model, images, targets)"
            )
        model, images, targets = (self.model, *args) if len(args) == 2 else args
        return self.perturb(images, targets, model=model)

    def perturb(self, x: Any, y: Any, **kwargs: Any) -> Any:
        """The attacked images (``model=`` overrides the attack's model)."""
        model, images, targets = kwargs.get("model", self.model), x, y
        stacked = isinstance(images, Tensor)
        check_images(images, stacked=stacked)
        xs = [images.detach()] if stacked else [x.detach() for x in images]
        engine = IterativeAscent(
            self.threat,
            alpha=self.alpha,
            eps=self.eps,
            steps=self.steps,
            random_start=self.random_start,
            generator=torch.Generator(device=xs[0].device).manual_seed(int(self.seed or 0)),
            constrain=lambda name, d: (xs[int(name)] + d).clamp(0, 1) - xs[int(name)],
        )

        def objective(var: Variable) -> Tensor:
            adv = [x + var(str(i), x) for i, x in enumerate(xs)]
            return self.task.attack_objective(model, adv[0] if stacked else adv, targets)

        devices = [xs[0].device] if xs[0].device.type == "cuda" else []
        with (
            attack_guard(model, bn_mode="train"),
            torch.enable_grad(),
            self.task.attack_mode(model, self.task_bn_mode),
            torch.random.fork_rng(devices=devices),
        ):
            deltas = engine.run(objective)
        out = [(x + deltas[str(i)]).clamp(0, 1).detach() for i, x in enumerate(xs)]
        return out[0] if stacked else out


def robust_evaluate(
    task: DenseTask,
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device | str = "cpu",
    **pgd: Any,
) -> dict[str, Any]:
    """Metrics under PGD (defaults: A-FAN's setting for the task); keys prefixed ``robust_``."""
    defaults = DETECTION_PGD if task.name == "detection" else SEGMENTATION_PGD
    attack = DensePGD(task, **{**defaults, **pgd})
    metrics = task.evaluate(model, loader, device=device, attack=attack)
    return {f"robust_{k}": v for k, v in metrics.items()}
