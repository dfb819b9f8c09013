"""Synthetic image-folder trees for tests: small coloured images, no downloads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_image_folder"]


def make_image_folder(
    root: str | Path,
    classes: dict[str, int],
    size: int = 16,
    seed: int = 0,
    formats: tuple[str, ...] = ("png", "jpg"),
) -> Path:
    """Write ``root/<class>/<class>_<j>.<format>`` for ``classes`` {folder name: image count}.

    Each class has its own base colour and each image its own noise, so images differ; formats
    cycle through ``formats`` image by image. Same arguments, same images. Returns ``root``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(40, 216, size=3)
        for j in range(count):
            noise = rng.integers(-40, 41, size=(size, size, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            fmt = formats[j % len(formats)]
            Image.fromarray(pixels).save(folder / f"{name}_{j}.{fmt}")
    return root
