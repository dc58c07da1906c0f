"""Training augmentations on float tensors, written as ``(image, target)`` pair transforms.

Randomness comes from torch's global generator (or an explicit ``generator``), so a run is
reproducible once the trainer seeds torch and its DataLoader workers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from advfeat.errors import AdvfeatError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PADDING_MODES",
    "CifarAugment",
    "HorizontalFlip",
    "flip_boxes",
    "random_crop_flip",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet, the normalization of ImageNet-pretrained models."""
IMAGENET_STD = (0.229, 0.224, 0.225)


def _coin(generator: torch.Generator | None) -> bool:
    return bool(torch.rand((), generator=generator) < 0.5)


PADDING_MODES = ("zeros", "reflect")


def random_crop_flip(
    image: Tensor,
    *,
    padding: int = 4,
    flip: bool = True,
    padding_mode: str = "zeros",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The standard CIFAR augmentation: pad by ``padding``, random crop back, random h-flip.

    Equivalent to ``RandomCrop(size, padding, padding_mode=...)`` followed by
    ``RandomHorizontalFlip()`` on a CHW float tensor. ``"zeros"`` (He et al. 2016) does not
    allocate the padded image; ``"reflect"`` mirrors the border (the fast CIFAR training scripts).
    """
    if image.ndim != 3:
        raise AdvfeatError(f"expected one CHW image, got shape {tuple(image.shape)}")
    if padding_mode not in PADDING_MODES:
        raise AdvfeatError(
            f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}"
        )
    _, h, w = image.shape
    dy = int(torch.randint(-padding, padding + 1, (), generator=generator))
    dx = int(torch.randint(-padding, padding + 1, (), generator=generator))
    if padding_mode == "reflect" and padding > 0:
        padded = torch.nn.functional.pad(image[None], (padding,) * 4, mode="reflect")[0]
        out = padded[:, padding + dy : padding + dy + h, padding + dx : padding + dx + w]
        out = out.contiguous()
        if flip and _coin(generator):
            out = out.flip(-1)
        return out
    out = torch.zeros_like(image)
    # the crop window starts at (dy, dx) relative to the original image
    y0, y1 = max(0, dy), min(h, h + dy)
    x0, x1 = max(0, dx), min(w, w + dx)
    if y0 < y1 and x0 < x1:
        out[:, y0 - dy : y1 - dy, x0 - dx : x1 - dx] = image[:, y0:y1, x0:x1]
    if flip and _coin(generator):
        out = out.flip(-1)
    return out


class CifarAugment:
    """Pair transform applying :func:`random_crop_flip` to the image (the target is unchanged).

    ``flip=False`` is the usual choice for digits (SVHN), where mirroring changes the meaning.
    """

    def __init__(self, padding: int = 4, flip: bool = True, padding_mode: str = "zeros") -> None:
        if padding_mode not in PADDING_MODES:
            raise AdvfeatError(
                f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}"
            )
        self.padding = padding
        self.flip = flip
        self.padding_mode = padding_mode

    def __call__(self, image: Tensor, target: Any) -> tuple[Tensor, Any]:
        out = random_crop_flip(
            image, padding=self.padding, flip=self.flip, padding_mode=self.padding_mode
        )
        return out, target

    def __repr__(self) -> str:
        return (
            f"CifarAugment(padding={self.padding}, flip={self.flip}, "
            f"padding_mode={self.padding_mode!r})"
        )


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror xyxy pixel boxes horizontally in an image ``width`` pixels wide."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


class HorizontalFlip:
    """Pair transform: with probability ``p`` mirror the image and its target consistently.

    The target may be a class label (unchanged), a detection dict (``boxes`` mirrored, and
    ``masks`` if present) or a segmentation mask ``[H, W]`` (mirrored).
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Tensor, target: Any) -> tuple[Tensor, Any]:
        if not bool(torch.rand(()) < self.p):
            return image, target
        image = image.flip(-1)
        if isinstance(target, Tensor):
            target = target.flip(-1)
        elif isinstance(target, dict):
            target = dict(target)
            if "boxes" in target:
                target["boxes"] = flip_boxes(target["boxes"], image.shape[-1])
            if "masks" in target:
                target["masks"] = target["masks"].flip(-1)
        return image, target

    def __repr__(self) -> str:
        return f"HorizontalFlip(p={self.p})"
