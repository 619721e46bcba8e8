"""Image decoding with limits checked before any pixel is decoded.

Two limits, both checked on the header's dimensions and mode before decoding:
the pixel limit (``--max-image-pixels``) and the memory that decoding and
preparing the image will take (``--max-image-memory``, see ``preparing_bytes``),
which the pixel limit alone does not bound: a 4.9 kB PNG of 40,000,000 x 1
one-bit pixels is within the pixel limit but takes 1.5 GB to resize. Pillow's
own process-wide decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, which
warns above 89M pixels and refuses above 179M) is turned off here, so that our
limits apply, with their own errors (``IMAGE_TOO_LARGE``, ``IMAGE_TOO_COSTLY``).

Inputs are decoded one at a time inside an admitted call, so at most
``compute slots + queue`` images are being prepared at once.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image

from layergrad_server.errors import InvalidArgument

Image.MAX_IMAGE_PIXELS = None


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Accepted encoded formats and the largest image, in pixels."""

    formats: tuple[str, ...] = ("JPEG", "PNG")
    max_pixels: int = 40_000_000
    # Memory that decoding and preparing one image may take (see ``preparing_bytes``).
    max_memory_bytes: int = 768 << 20


# Bytes per pixel of Pillow's storage by mode: one for single-band 8-bit modes, four for
# every multi-band mode (RGB included), two for 16-bit, four for 32-bit.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}
# Pillow's bicubic filter support (the default of ``Image.resize``).
_BICUBIC_SUPPORT = 2.0


def preparing_bytes(width: int, height: int, mode: str, size: tuple[int, int] = (224, 224)) -> int:
    """Peak memory of decoding a ``width`` x ``height`` image of ``mode`` and preparing it at
    ``size`` the way ``vgg.prepare`` does: the decoded image, two RGB copies (our conversion and
    prepare's own), the resampling coefficients of each axis (doubles, as many per output pixel
    as the filter spans input pixels: huge when one side is shrunk by a huge factor) and the
    intermediate image of the two-pass resize. Every Pillow image also keeps one row pointer
    per row. Measured on Pillow 13: 40,000,000 x 1 one-bit pixels take 1.52 GB (this estimate:
    1.64 GB); 1 x 40,000,000 take 2.14 GB (2.60 GB); a 6000 x 6600 RGB photo 0.31 GB (0.48 GB).
    """
    pixels = width * height
    rows = 3 * height * 8
    decoded = pixels * _PIXEL_BYTES.get(mode, 4)
    rgb = 2 * pixels * 4
    coefficients = 0
    for source, target in ((width, size[0]), (height, size[1])):
        scale = max(source / target, 1.0)
        coefficients += target * (2 * math.ceil(_BICUBIC_SUPPORT * scale) + 1) * 8
    intermediate = min(size[0] * height, width * size[1]) * 4
    return decoded + rgb + rows + coefficients + intermediate


def decode(data: bytes, field: str, limits: ImageLimits) -> Image.Image:
    """Decodes a JPEG or PNG into an RGB PIL image.

    The format and the header's dimensions are checked before decoding, so a
    small file that claims a huge image (a decompression bomb) is refused
    without allocating it.
    """
    if not data:
        raise InvalidArgument("encoded_image is empty", field=field, reason="EMPTY_IMAGE")
    try:
        image = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        claimed = _signature_format(data)
        if claimed in limits.formats:
            message = f"encoded_image is a corrupt or truncated {claimed}"
        else:
            message = (
                f"encoded_image is not a readable image of an accepted format ({', '.join(limits.formats)})"
            )
        raise InvalidArgument(message, field=field, reason="UNDECODABLE_IMAGE") from None
    _check_pixels(image.width, image.height, field, limits)
    _check_memory(image.width, image.height, image.mode, field, limits)
    try:
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError):
        raise InvalidArgument(
            f"encoded_image is a corrupt or truncated {image.format}", field=field, reason="UNDECODABLE_IMAGE"
        ) from None


_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}


def _signature_format(data: bytes) -> str | None:
    """The format the first bytes claim, or None."""
    for signature, name in _SIGNATURES.items():
        if data.startswith(signature):
            return name
    return None


def from_rgb_array(array: np.ndarray, field: str, limits: ImageLimits) -> Image.Image:
    """A uint8 HxWx3 RGB array as a PIL image."""
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidArgument(
            f"rgb_image must have shape [height, width, 3], got {list(array.shape)}",
            field=f"{field}.shape",
            reason="SHAPE_MISMATCH",
        )
    _check_pixels(array.shape[1], array.shape[0], field, limits)
    _check_memory(array.shape[1], array.shape[0], "RGB", field, limits)
    return Image.fromarray(np.ascontiguousarray(array))


def _check_pixels(width: int, height: int, field: str, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            f"image of {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels",
            field=field,
            reason="IMAGE_TOO_LARGE",
        )


def _check_memory(width: int, height: int, mode: str, field: str, limits: ImageLimits) -> None:
    needed = preparing_bytes(width, height, mode)
    if needed > limits.max_memory_bytes:
        raise InvalidArgument(
            f"image of {width}x{height} pixels (mode {mode}) would take about {needed >> 20} MiB to "
            f"decode and resize, above the limit of {limits.max_memory_bytes >> 20} MiB; send it "
            "resized closer to 224x224, or with a less extreme aspect ratio",
            field=field,
            reason="IMAGE_TOO_COSTLY",
        )
