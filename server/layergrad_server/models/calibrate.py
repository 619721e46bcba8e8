"""Seeded random weights that keep a network's activations, logits and gradients moderate.

Chainer's own initialisation is no use for tests of gradients: VGG16 built with
``pretrained_model=None`` gives exactly uniform probabilities, and ResNet's
BatchNormalization with running statistics 0 and 1 lets the residual sums grow
until ResNet50's logits reach about 4e4 and ResNet152's 9e10 (a one-hot softmax,
gradients of zero almost everywhere).

:func:`calibrated_random_weights` draws every parameter from one seeded generator
(He-normal weights, biases of 0.01-scale noise, BatchNormalization ``gamma`` 1 and
``beta`` 0) and then runs one forward pass in test mode on a seeded random input,
calibrating layer by layer in the order the links run (the LSUV idea):

* each BatchNormalization link, before it runs, takes the mean and variance of its
  input as its running statistics, so its output is normalised;
* each Convolution2D, Deconvolution2D and Linear link, after it runs, has its weight
  and bias divided by the standard deviation of its output (and that output, which
  the rest of the forward consumes, divided likewise), so it leaves with unit scale.

The logits therefore have a standard deviation of about 1: the softmax is neither
uniform nor saturated, and every gradient the loss reaches is non-zero. The result
depends only on the seed and the network's structure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import chainer
import chainer.links as L  # noqa: N812
import numpy as np

if TYPE_CHECKING:
    from layergrad_server.models.base import ModelAdapter

#: The scale of the calibration input: about that of a prepared image (pixels minus the mean).
INPUT_SCALE = 50.0
_SCALED = (L.Convolution2D, L.Deconvolution2D, L.Linear)


def _draw(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "gamma":
        return np.ones(shape, dtype=np.float32)
    if leaf == "beta":
        return np.zeros(shape, dtype=np.float32)
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01)


class _Calibrator(chainer.LinkHook):
    name = "layergrad-calibrator"

    def forward_preprocess(self, args: object) -> None:
        link = args.link
        if isinstance(link, L.BatchNormalization) and args.args:
            x = chainer.as_array(args.args[0])
            axes = (0, *range(2, x.ndim))
            link.avg_mean[...] = x.mean(axis=axes)
            link.avg_var[...] = x.var(axis=axes)

    def forward_postprocess(self, args: object) -> None:
        link = args.link
        if not isinstance(link, _SCALED) or not isinstance(args.out, chainer.Variable):
            return
        std = float(args.out.array.std())
        if not np.isfinite(std) or std <= 0:
            return
        scale = np.float32(1.0 / std)
        link.W.array *= scale
        if getattr(link, "b", None) is not None:
            link.b.array *= scale
        args.out.array *= scale


def calibrated_random_weights(adapter: ModelAdapter, net: chainer.Link, seed: int) -> None:
    """Overwrites ``net``'s parameters and BatchNormalization statistics with calibrated random ones."""
    rng = np.random.default_rng(seed)
    shape = adapter.input_spec.shape
    x = (rng.standard_normal((1, *shape), dtype=np.float32) * np.float32(INPUT_SCALE)).astype(np.float32)
    layers = list(adapter.layer_names)
    with chainer.using_config("train", False), chainer.using_config("enable_backprop", False):
        if any(param.array is None for param in net.params(include_uninit=True)):
            adapter.forward_layers(net, chainer.Variable(x.copy()), layers)  # initialises lazy shapes
        for name, param in sorted(net.namedparams()):
            param.array[...] = _draw(rng, name, param.shape)
        for link in net.links():
            if isinstance(link, L.BatchNormalization):
                link.avg_mean[...] = 0
                link.avg_var[...] = 1
        with _Calibrator():
            adapter.forward_layers(net, chainer.Variable(x), layers)
