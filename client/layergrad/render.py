"""Heat maps as pictures: a perceptual colormap, sign handling, outlier clipping, blending, grids.

Needs Pillow. :func:`overlay` follows Captum's ``visualize_image_attr`` conventions:
``sign`` picks what is shown (``absolute``: |map|; ``positive``/``negative``: one side,
the other set to 0; ``all``: both, on a diverging colormap), and the map is scaled by
its ``percentile``-th percentile of |value| and clipped, so a few outliers do not wash
out the rest. The sequential colormap is an inferno-like ramp (black, purple, red,
orange, pale yellow) interpolated from a small table of anchors chosen to increase in
lightness; the diverging one runs blue - white - red.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

# (position, R, G, B) anchors; lightness increases monotonically along the ramp.
_INFERNO_ANCHORS = (
    (0.00, 0, 0, 4),
    (0.13, 31, 12, 72),
    (0.25, 85, 15, 109),
    (0.38, 136, 34, 106),
    (0.50, 186, 54, 85),
    (0.63, 227, 89, 51),
    (0.75, 249, 140, 10),
    (0.88, 249, 201, 50),
    (1.00, 252, 255, 164),
)
_DIVERGING_ANCHORS = (
    (0.00, 33, 102, 172),
    (0.25, 103, 169, 207),
    (0.50, 247, 247, 247),
    (0.75, 239, 138, 98),
    (1.00, 178, 24, 43),
)
SIGNS = ("absolute", "positive", "negative", "all")


def _lut(anchors: Sequence[tuple[float, int, int, int]]) -> np.ndarray:
    """A (256, 3) uint8 table interpolated linearly between ``anchors``."""
    table = np.asarray(anchors, dtype=np.float64)
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(x, table[:, 0], table[:, i]) for i in (1, 2, 3)]
    return np.clip(np.rint(np.stack(channels, axis=1)), 0, 255).astype(np.uint8)


INFERNO = _lut(_INFERNO_ANCHORS)
DIVERGING = _lut(_DIVERGING_ANCHORS)


def normalize(heat: np.ndarray, sign: str = "absolute", percentile: float = 99.0) -> np.ndarray:
    """``heat`` scaled to [0, 1] (``all``: [-1, 1]) after sign handling, dividing by the
    ``percentile``-th percentile of its absolute values and clipping."""
    if sign not in SIGNS:
        raise ValueError(f"sign must be one of {', '.join(SIGNS)}, got {sign!r}")
    if not 0 < percentile <= 100:
        raise ValueError("percentile must be in (0, 100]")
    values = np.asarray(heat, dtype=np.float64)
    if sign == "absolute":
        values = np.abs(values)
    elif sign == "positive":
        values = np.maximum(values, 0.0)
    elif sign == "negative":
        values = np.maximum(-values, 0.0)
    scale = np.percentile(np.abs(values), percentile)
    if not np.isfinite(scale) or scale <= 0:
        scale = np.abs(values).max() or 1.0
    low = -1.0 if sign == "all" else 0.0
    return np.clip(values / scale, low, 1.0)


def colorize(heat: np.ndarray, sign: str = "absolute", percentile: float = 99.0) -> np.ndarray:
    """An (H, W, 3) uint8 RGB picture of a 2-D map."""
    scaled = normalize(heat, sign, percentile)
    if sign == "all":
        return DIVERGING[np.rint((scaled + 1.0) * 127.5).astype(np.int64)]
    return INFERNO[np.rint(scaled * 255.0).astype(np.int64)]


def load_rgb(image: Any, mean: Sequence[float] = (103.939, 116.779, 123.68)) -> np.ndarray:
    """An (H, W, 3) uint8 RGB array from a path, encoded bytes, a PIL image, an RGB uint8 array,
    or a prepared (3, H, W) BGR float array (``mean``, in BGR order, added back)."""
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB"))
    if isinstance(image, bytes | bytearray):
        with Image.open(io.BytesIO(image)) as opened:
            return np.asarray(opened.convert("RGB"))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3:
        return array
    if array.ndim == 3 and array.shape[0] == 3:
        bgr = array.astype(np.float64) + np.asarray(mean)[:, None, None]
        return np.clip(np.rint(bgr[::-1].transpose(1, 2, 0)), 0, 255).astype(np.uint8)
    raise TypeError(f"cannot show an image of type {type(image).__name__} and shape {np.shape(image)}")


def overlay(
    image: np.ndarray,
    heat: np.ndarray,
    *,
    sign: str = "absolute",
    percentile: float = 99.0,
    alpha: float = 0.55,
) -> Any:
    """The colourised ``heat`` (resized bilinearly to the image if needed) blended over the RGB
    ``image`` with weight ``alpha``, as a PIL image."""
    from PIL import Image

    height, width = image.shape[:2]
    heat = np.asarray(heat, dtype=np.float32)
    if heat.shape != (height, width):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    colours = colorize(heat, sign, percentile).astype(np.float64)
    blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colours
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def labelled(picture: Any, text: str, band: int = 18) -> Any:
    """``picture`` with ``text`` written in a dark band below it."""
    from PIL import Image, ImageDraw

    out = Image.new("RGB", (picture.width, picture.height + band), (20, 20, 20))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    limit = max(picture.width // 6, 8)
    draw.text(
        (4, picture.height + 3), text if len(text) <= limit else text[: limit - 1] + "~", fill=(240, 240, 240)
    )
    return out


def grid(pictures: Sequence[Any], columns: int | None = None, gap: int = 4) -> Any:
    """Pictures side by side (``columns`` per row, default all in one row) on a dark background."""
    from PIL import Image

    if not pictures:
        raise ValueError("no pictures to lay out")
    columns = columns or len(pictures)
    rows = -(-len(pictures) // columns)
    cell_w = max(p.width for p in pictures)
    cell_h = max(p.height for p in pictures)
    sheet = Image.new(
        "RGB", (columns * cell_w + (columns + 1) * gap, rows * cell_h + (rows + 1) * gap), (20, 20, 20)
    )
    for index, picture in enumerate(pictures):
        r, c = divmod(index, columns)
        sheet.paste(picture, (gap + c * (cell_w + gap), gap + r * (cell_h + gap)))
    return sheet
