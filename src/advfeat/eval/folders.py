"""A test domain read from an image folder (``ROOT/<class name>/<image>``), for the shift suites.

Folder names must be class names of the evaluated model (as saved with its run), so that a
folder maps to the class index the model was trained with; images are resized to the model's
input size and scaled to [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from advfeat.errors import AdvfeatError, unknown_name

__all__ = ["IMAGE_SUFFIXES", "ImageFolderDomain", "parse_domain"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def parse_domain(text: str) -> tuple[str, str]:
    """``"NAME=PATH"`` (or a bare ``PATH``, named after its folder) → ``(name, path)``."""
    name, sep, path = text.partition("=")
    if not sep:
        path = text
        name = Path(text).name
    if not name or not path:
        raise AdvfeatError(f"a domain is NAME=PATH (an image folder), got {text!r}")
    return name, path


class ImageFolderDomain(Dataset):
    """Images of ``root/<class name>/*`` as ``(float CHW image in [0, 1], class index)``."""

    def __init__(self, root: str | Path, class_names: list[str], image_size: int | None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise AdvfeatError(f"image-folder domain {str(self.root)!r} does not exist")
        if not class_names:
            raise AdvfeatError("an image-folder domain needs the model's class names")
        index = {name: i for i, name in enumerate(class_names)}
        self.items: list[tuple[Path, int]] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if folder.name not in index:
                raise unknown_name(f"class folder in {str(self.root)!r}", folder.name, class_names)
            files = sorted(
                f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
            )
            self.items += [(f, index[folder.name]) for f in files]
        if not self.items:
            raise AdvfeatError(
                f"no images found in {str(self.root)!r} (expected ROOT/<class name>/<image>, "
                f"suffixes {', '.join(IMAGE_SUFFIXES)})"
            )
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.items[i]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
                data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
                image = data.view(rgb.height, rgb.width, 3).permute(2, 0, 1).float() / 255
        except OSError as err:
            raise AdvfeatError(f"cannot read image {str(path)!r} ({err})") from None
        if self.image_size is not None and image.shape[-2:] != (self.image_size, self.image_size):
            image = F.interpolate(
                image[None],
                size=(self.image_size, self.image_size),
                mode="bilinear",
                antialias=True,
            )[0].clamp(0, 1)
        return image, label
