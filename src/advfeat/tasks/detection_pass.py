"""Faster R-CNN's training pass run stage by stage, so that later passes start at the site.

torchvision's ``GeneralizedRCNN.forward`` is transform → backbone → RPN → ROI heads
(sample proposals, pool, box head, box predictor, losses). :class:`DetectionPass` runs the same
calls in the same order for the clean pass, keeping what each stage produced, and then runs the
part after a feature site alone:

* a ROI-head site (``roi_heads.box_head``): only the box predictor and the Fast R-CNN loss, on
  the clean pass's sampled proposals and their targets; the RPN terms are the clean pass's
  (the same values the full pass recomputes; with ``prefix_grad=False`` constants);
* a backbone site: what follows the site in the backbone (the FPN when the site is the body's
  last stage — the body's other outputs are the clean ones — else
  :class:`advfeat.sites.SiteSplit`), then the RPN and the ROI heads, replaying the clean pass's
  random stream from the RPN on (anchor and proposal sampling) — the image transform and the
  layers before the site never run again.

Losses and gradients equal those of :class:`advfeat.tasks.base.HookPass` (the whole detector
with the site replaced), which ``tests/test_tasks_detection.py`` checks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from advfeat.sites import SiteSplit, capture_features, unwrap_model
from advfeat.tasks.base import RngReplay, Task, TaskPass

__all__ = ["BOX_HEAD", "DetectionPass"]

BOX_HEAD = "roi_heads.box_head"


def _device(images: Sequence[Tensor]) -> torch.device:
    return images[0].device


class DetectionPass(TaskPass):
    """The clean pass of a torchvision Faster R-CNN, stage by stage (module docstring)."""

    @staticmethod
    def supports(model: nn.Module, sites: Sequence[str]) -> bool:
        """An unwrapped Faster R-CNN with a plain ROI head, sites in the backbone or box head."""
        if unwrap_model(model) is not model or not isinstance(model, GeneralizedRCNN):
            return False
        heads = model.roi_heads
        if type(heads) is not RoIHeads or heads.has_mask() or heads.has_keypoint():
            return False
        return all(s == BOX_HEAD or s.startswith("backbone.") for s in sites)

    def __init__(
        self, task: Task, model: nn.Module, images: Any, targets: Any, sites: Sequence[str]
    ) -> None:
        self.task, self.model = task, model
        device = _device(images)
        detector: Any = model
        if not model.training:
            task.forward_output(model, images, targets)  # raises the clear error
        body = "backbone.body" if hasattr(detector.backbone, "body") else None
        watched = list(sites) + ([body] if body and body not in sites else [])
        # copies: the rest of the forward may write into a site's output (a MobileNetV3 block's
        # `result += input`, an in-place activation after a BN site); the live outputs only
        # tell which of the body's outputs a site produced
        with (
            capture_features(model, watched, clone=True) as captured,
            capture_features(model, watched) as live,
        ):
            self.images, self.targets = detector.transform(list(images), list(targets))
            self.rng = RngReplay(device)  # the stream the backbone, RPN and ROI heads draw from
            features = detector.backbone(self.images.tensors)
            if isinstance(features, Tensor):
                features = OrderedDict([("0", features)])
            proposals, self.rpn_losses = detector.rpn(self.images, features, self.targets)
            heads = detector.roi_heads
            proposals, _, self.labels, self.box_targets = heads.select_training_samples(
                proposals, self.targets
            )
            pooled = heads.box_roi_pool(features, proposals, self.images.image_sizes)
            roi_losses = self._box_losses(heads.box_head(pooled))
        self.output = {**roi_losses, **self.rpn_losses}
        self.loss, self.parts = task.output_loss(self.output, targets)
        self.features = {s: captured[s] for s in sites}
        self.body_out = captured.get(body) if body else None
        live_body = live.get(body) if body else None
        self.body_keys = {
            s: [k for k, v in live_body.items() if v is live[s]]
            for s in sites
            if isinstance(live_body, dict)
        }

    def _box_losses(self, box_features: Tensor) -> dict[str, Tensor]:
        heads: Any = self.model.roi_heads  # type: ignore[union-attr]
        class_logits, box_regression = heads.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits, box_regression, self.labels, self.box_targets
        )
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

    def tail(self, site: str, feature: Tensor, *, prefix_grad: bool) -> Any:
        if site == BOX_HEAD:
            rpn = {k: v if prefix_grad else v.detach() for k, v in self.rpn_losses.items()}
            return {**self._box_losses(feature), **rpn}
        detector: Any = self.model
        with self.rng.replay():
            features = self._backbone_tail(site, feature, prefix_grad)
            if isinstance(features, Tensor):
                features = OrderedDict([("0", features)])
            proposals, rpn_losses = detector.rpn(self.images, features, self.targets)
            _, roi_losses = detector.roi_heads(
                features, proposals, self.images.image_sizes, self.targets
            )
        return {**roi_losses, **rpn_losses}

    def _backbone_tail(self, site: str, feature: Tensor, prefix_grad: bool) -> Any:
        """The backbone's output with ``feature`` at ``site`` (a site inside the backbone)."""
        backbone: Any = self.model.backbone  # type: ignore[union-attr]
        relative = site.removeprefix("backbone.")
        keys = self.body_keys.get(site)
        if (
            isinstance(self.body_out, dict)
            and keys
            and relative == f"body.{list(backbone.body.named_children())[-1][0]}"
        ):
            # the site is the body's last stage: its other outputs (the FPN's other levels)
            # are the clean pass's; only the FPN runs again
            body_out = OrderedDict(
                (k, feature if k in keys else v if prefix_grad else v.detach())
                for k, v in self.body_out.items()
            )
            return backbone.fpn(body_out)
        split = SiteSplit(backbone, relative, prefix_grad=prefix_grad)
        return split.tail(feature, x=self.images.tensors)
