"""What a served model is: adapters for Chainer networks (no gRPC, no protobuf).

``base`` defines the adapter interface and reads a network's layers, links and
parameters from its computational graph; ``vision`` holds the built-in ImageNet
models Chainer ships; ``chain`` adapts a user's own ``chainer.Chain``.
"""

from __future__ import annotations

from layergrad_server.models.base import Description, InputSpec, ModelAdapter, Outputs, trace
from layergrad_server.models.vision import BUILTINS, DEFAULT_MODEL, VGG16, imagenet_labels

__all__ = [
    "BUILTINS",
    "DEFAULT_MODEL",
    "VGG16",
    "Description",
    "InputSpec",
    "ModelAdapter",
    "Outputs",
    "imagenet_labels",
    "trace",
]
