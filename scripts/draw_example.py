"""Draws the picture the README's explanation example is made from: ``docs/images/shapes.png``.

A small deterministic scene (sky, sun, hills, a house) drawn with Pillow, so the repository ships
its own input image. Regenerate the example with a server running::

    python scripts/draw_example.py
    layergrad explain docs/images/shapes.png --method gradcam,saliency,smoothgrad,integrated_gradients \\
        --samples 8 --steps 16 --panel 160 --out docs/images/explain-grid.png
"""

from __future__ import annotations

import pathlib
import sys

from PIL import Image, ImageDraw


def draw(width: int = 240, height: int = 180) -> Image.Image:
    image = Image.new("RGB", (width, height))
    pixels = ImageDraw.Draw(image)
    for y in range(height):  # sky: a vertical gradient
        shade = int(200 - 90 * y / height)
        pixels.line([(0, y), (width, y)], fill=(shade // 2, shade, 235))
    pixels.ellipse([170, 18, 214, 62], fill=(255, 214, 64))  # sun
    pixels.ellipse([-60, 110, 150, 260], fill=(64, 150, 64))  # hills
    pixels.ellipse([90, 120, 320, 280], fill=(40, 120, 48))
    pixels.rectangle([60, 92, 130, 150], fill=(178, 58, 48))  # house
    pixels.polygon([(52, 94), (95, 58), (138, 94)], fill=(92, 52, 40))
    pixels.rectangle([86, 118, 104, 150], fill=(70, 44, 30))
    pixels.rectangle([68, 102, 82, 114], fill=(200, 230, 255))
    return image


def main() -> int:
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/shapes.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    draw().save(out, optimize=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
