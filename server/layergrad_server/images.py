"""Image decoding with limits checked before any pixel is decoded.

The pixel limit is ours (``--max-image-pixels``), checked on the header's
dimensions; Pillow's own process-wide decompression-bomb limit
(``Image.MAX_IMAGE_PIXELS``, which warns above 89M pixels and refuses above
179M) is turned off here, so that one limit applies, with one error
(``IMAGE_TOO_LARGE``).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from layergrad_server.errors import InvalidArgument

Image.MAX_IMAGE_PIXELS = None


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Accepted encoded formats and the largest image, in pixels."""

    formats: tuple[str, ...] = ("JPEG", "PNG")
    max_pixels: int = 40_000_000


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
    return Image.fromarray(np.ascontiguousarray(array))


def _check_pixels(width: int, height: int, field: str, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            f"image of {width}x{height} pixels exceeds the limit of {limits.max_pixels} pixels",
            field=field,
            reason="IMAGE_TOO_LARGE",
        )
