"""Reading one image file as RGB, the same way for every layout and the plain folder source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cdfsl.errors import DataError

__all__ = ["open_rgb"]


def open_rgb(path: Path, read_size: tuple[int, int] | None = None) -> Image.Image:
    """The image file ``path`` as RGB; 16-bit grayscale is scaled to 8 bits first.

    ``read_size`` (width, height): resize in the file's own mode with PIL's default filter
    (bicubic for L, RGB and RGBA) before the RGB conversion, as the Mind reference reads ChestX
    (``Image.open(path).resize((256, 256)).convert('RGB')``). Raises ``DataError`` naming the
    file when PIL cannot read it.
    """
    try:
        with Image.open(path) as image:
            if image.mode.startswith("I"):
                # convert("RGB") clips 16-bit values at 255 (a white image); rescale instead.
                pixels = np.asarray(image, dtype=np.float64)
                if pixels.max(initial=0) > 255:
                    pixels = pixels / 257.0
                gray = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                return (gray if read_size is None else gray.resize(read_size)).convert("RGB")
            if read_size is not None:
                image = image.resize(read_size)
            if image.mode == "P" and "transparency" in image.info:
                return image.convert("RGBA").convert("RGB")
            return image.convert("RGB")
    # PIL reports bad files with several unrelated types; all mean "this file cannot be used".
    except Exception as err:
        reason = str(err).replace("\n", " ") or type(err).__name__
        raise DataError(
            f"cannot read image {path} ({reason}); expected a readable image file; remove or "
            "replace the file"
        ) from err
