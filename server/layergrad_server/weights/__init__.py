"""Pretrained weights of the built-in models: finding, downloading, converting and checking them.

``resolve_weights(choice, model)`` turns a user's ``--weights`` choice into an npz
file that the model's Chainer link (``VGG16Layers``, ``VGG19Layers``, ``GoogLeNet``,
``ResNet50Layers``, ``ResNet101Layers``, ``ResNet152Layers``) loads, or a seed for
random initialisation; ``convert_caffemodel`` turns the published Caffe model into
that npz.
Every failure is a :class:`WeightsError` whose message says what is wrong.
"""

from __future__ import annotations


class WeightsError(Exception):
    """Weights are missing, unreadable, incomplete, corrupt or of the wrong shape."""


from layergrad_server.weights.convert import convert_caffemodel  # noqa: E402
from layergrad_server.weights.store import ResolvedWeights, resolve_weights  # noqa: E402

__all__ = ["ResolvedWeights", "WeightsError", "convert_caffemodel", "resolve_weights"]
