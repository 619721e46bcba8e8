"""Conversion of what users pass as images into ``layergrad.v1.Input`` messages.

Accepted, alone or in a list or tuple:

* ``str`` or ``os.PathLike``: the path of a JPEG or PNG file, sent as encoded bytes;
* ``bytes``, ``bytearray`` or ``memoryview``: an encoded JPEG or PNG image;
* a ``PIL.Image.Image``: sent losslessly as PNG (Pillow is optional and imported lazily);
* a ``uint8`` array of shape ``(H, W, 3)``: a raw RGB image, prepared by the server;
* a ``float32`` (or ``float64``, cast) array of shape ``(C, H, W)``: an already
  prepared image in the model's input format (VGG16: ``(3, 224, 224)``, BGR, mean
  subtracted; ``ModelInfo.input_spec``), used as is; the server checks its shape.

A 4-D array is a batch: ``(N, 3, 224, 224)`` float gives N prepared inputs and
``(N, H, W, 3)`` uint8 gives N raw RGB images. Anything else raises TypeError or
ValueError before any RPC is made.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._tensors import fill_tensor

if TYPE_CHECKING:
    from PIL import Image as PILImage

    ImageItem: TypeAlias = (
        str | os.PathLike[str] | bytes | bytearray | memoryview | np.ndarray | PILImage.Image
    )
else:
    ImageItem: TypeAlias = Any

#: One image, or a batch: a list/tuple of images or a 4-D array.
Images: TypeAlias = ImageItem | Sequence[ImageItem]

#: The prepared input of the default model (VGG16); other models: ``ModelInfo.input_spec``.
PREPARED_SHAPE = (3, 224, 224)
_ACCEPTED = (
    "a file path, encoded image bytes, a PIL image, a uint8 HxWx3 RGB array, "
    "a float32 CxHxW prepared array (VGG16: 3x224x224), a list or tuple of these, or a 4-D array batch"
)


def to_inputs(images: Images) -> list[pb.Input]:
    """The ``Input`` messages for one image or a batch; raises TypeError/ValueError if unusable."""
    holder = pb.PredictRequest()
    add_inputs(holder.inputs, images)
    return list(holder.inputs)


def add_inputs(field: Any, images: Images) -> None:
    """Appends the ``Input`` messages for ``images`` to a request's ``inputs`` field, built in
    place: each image's bytes are copied into the request once (a message built apart and
    then set in the request is copied again, at every level). TypeError/ValueError if unusable."""
    items = list(images) if isinstance(images, list | tuple) else [images]
    if not items:
        raise ValueError("images is empty: pass at least one image")
    for index, item in enumerate(items):
        if isinstance(item, list | tuple):
            raise TypeError(f"images[{index}] is a {type(item).__name__}: nested lists are not accepted")
        _add(field, item, f"images[{index}]" if len(items) > 1 else "image")


def _add(field: Any, item: object, where: str) -> None:
    if isinstance(item, np.ndarray):
        _add_array(field, item, where)
    elif isinstance(item, bytes | bytearray | memoryview):
        field.add(encoded_image=_checked_encoded(bytes(item), where))
    elif isinstance(item, str | os.PathLike):
        field.add(encoded_image=_read(item, where))
    elif _is_pil_image(item):
        field.add(encoded_image=_png_bytes(item))
    else:
        raise TypeError(f"{where}: unsupported type {type(item).__name__}; expected {_ACCEPTED}")


def _add_array(field: Any, array: np.ndarray, where: str) -> None:
    if array.ndim == 4:
        if array.shape[0] == 0:
            raise ValueError(f"{where}: the batch array has no images (shape {array.shape})")
        for i in range(array.shape[0]):
            _add_image_array(field, array[i], f"{where}[{i}]")
    elif array.ndim == 3:
        _add_image_array(field, array, where)
    else:
        raise ValueError(
            f"{where}: array of shape {array.shape} is neither one image (3-D) nor a batch (4-D)"
        )


def _add_image_array(field: Any, array: np.ndarray, where: str) -> None:
    if array.dtype == np.uint8:
        checked = _checked_rgb(array, where)
        fill_tensor(field.add().rgb_image, checked)
    elif array.dtype in (np.float32, np.float64):
        checked = _checked_prepared(array, where)
        fill_tensor(field.add().prepared, checked)
    else:
        raise ValueError(
            f"{where}: arrays must be uint8 (raw RGB, HxWx3) or float32/float64 (prepared, CxHxW), "
            f"not {array.dtype}"
        )


def _checked_rgb(array: np.ndarray, where: str) -> np.ndarray:
    height, width, channels = array.shape
    if channels != 3 or height == 0 or width == 0:
        raise ValueError(
            f"{where}: a uint8 image must have shape (H, W, 3) with RGB channels, not {array.shape}"
        )
    return array


def _checked_prepared(array: np.ndarray, where: str) -> np.ndarray:
    channels, _height, width = array.shape
    if 0 in array.shape or (width in (3, 4) and channels not in (1, 3, 4)):
        raise ValueError(
            f"{where}: a float image must be prepared, channels first (C, H, W) in the model's input "
            f"format (VGG16: (3, 224, 224) BGR with the mean subtracted), not {array.shape}; pass raw "
            "pixels as a uint8 (H, W, 3) RGB array"
        )
    return array.astype(np.float32, copy=False)


def _checked_encoded(data: bytes, where: str) -> bytes:
    if not data:
        raise ValueError(f"{where}: encoded image bytes are empty")
    return data


def _read(path: str | os.PathLike[str], where: str) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read()
    return _checked_encoded(data, f"{where} ({os.fspath(path)})")


def _is_pil_image(item: object) -> bool:
    module = sys.modules.get("PIL.Image")  # PIL images exist only if Pillow is already imported
    return module is not None and isinstance(item, module.Image)


def _png_bytes(image: PILImage.Image) -> bytes:
    if image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
