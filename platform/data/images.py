"""Image decoding with validation: every file becomes (H, W, 3) uint8 RGB or a reason.

Real datasets hold grayscale, palette, CMYK, 16-bit and EXIF-rotated files next to
ordinary RGB JPEGs, and a few truncated or corrupt ones. Pipelines must neither crash
deep inside a Ray task nor silently feed a wrong image, so :func:`read_image` returns
a :class:`DecodedImage` whose ``error`` names the file and the reason (the pipelines
record it in the store's ``failures`` table), and :func:`load_image` raises
:class:`ImageDecodeError` for callers that prefer exceptions.

Conversions (all to 8-bit RGB):

- ``1``, ``L``, ``P`` (without transparency), ``CMYK``, ``YCbCr``: PIL's ``convert("RGB")``.
- ``LA``, ``RGBA``, ``PA``, ``P`` with transparency: **alpha composited on black**
  (``rgb * alpha / 255``), i.e. what the image shows over a black canvas; dropping
  alpha would expose whatever colour the encoder left in transparent pixels.
- ``I;16*`` and ``I`` (16-bit data, as PIL opens 16-bit PNG/TIFF): values clipped to
  [0, 65535] and divided by 257, a fixed mapping (not per-image min-max) so one
  value means the same intensity in every image.
- EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), as COCO's and
  LVIS's annotations refer to the displayed (rotated) image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})


class ImageDecodeError(ValueError):
    """An image file that cannot be turned into an RGB array; names file and reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class DecodedImage:
    """Result of :func:`read_image`: exactly one of ``image`` and ``error`` is set."""

    path: str
    image: np.ndarray | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.image is not None


def _sixteen_bit_to_rgb(img: Image.Image) -> np.ndarray:
    values = np.asarray(img, dtype=np.float64)
    gray = np.clip(np.rint(np.clip(values, 0, 65535) / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def _alpha_to_rgb(img: Image.Image) -> np.ndarray:
    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
    rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255
    return rgb.astype(np.uint8)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_rgb(img)
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        return _alpha_to_rgb(img)
    if mode == "F":
        raise ValueError("unsupported pixel mode 'F' (32-bit float): its intensity range is undefined")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _decode(path: Path) -> np.ndarray:
    if not path.exists():
        raise ImageDecodeError(path, "file not found")
    if not path.is_file():
        raise ImageDecodeError(path, "not a regular file")
    try:
        with Image.open(path) as img:
            img.load()
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception as err:  # noqa: BLE001 - a broken EXIF block must not lose the pixels
                log.warning("%s: ignoring unreadable EXIF orientation (%s)", path, err)
                oriented = img
            array = _to_rgb_array(oriented)
    except ImageDecodeError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises many types for bad files
        raise ImageDecodeError(path, f"cannot decode image: {type(err).__name__}: {err}") from err
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageDecodeError(path, f"decoded to unusable shape {array.shape}")
    return np.ascontiguousarray(array)


def read_image(path: str | Path) -> DecodedImage:
    """Decode ``path`` to (H, W, 3) uint8 RGB; never raises (see ``DecodedImage.error``)."""
    try:
        return DecodedImage(path=str(path), image=_decode(Path(path)))
    except ImageDecodeError as err:
        return DecodedImage(path=str(path), error=str(err))


def load_image(path: str | Path) -> np.ndarray:
    """Decode ``path`` to (H, W, 3) uint8 RGB or raise :class:`ImageDecodeError`."""
    return _decode(Path(path))
