"""Guided backpropagation's ReLU rule, switched on per thread.

Chainer's ``ReLU.backward`` is wrapped once, at import, by a version that reads a
thread-local switch: off (the default, in every thread), it is Chainer's own rule
``gx = gy * (y > 0)``; on, inside :func:`guided_relus` in the thread that entered
it, it is the guided rule ``gx = max(gy, 0) * (y > 0)`` (Springenberg et al.).
The switch belongs to the thread that runs the backward pass, so a gradient call
running in any other thread, at the same time or later, keeps the plain rule.

Scope: every ``chainer.functions.relu`` node the backward pass goes through
(VGG's conv and fc ReLUs, ResNet's after each residual sum, GoogLeNet's inside
its inception modules). Other activations are left alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from chainer.functions.activation import relu as _relu

_state = threading.local()
_plain_backward = _relu.ReLU.backward


def active() -> bool:
    """Whether the guided rule is on in this thread."""
    return getattr(_state, "depth", 0) > 0


def _backward(self: Any, indexes: Any, grad_outputs: Any) -> Any:
    if not active():
        return _plain_backward(self, indexes, grad_outputs)
    (gy,) = grad_outputs
    (y,) = self.get_retained_outputs()
    positive = _relu.ReLUGrad2(gy.array).apply((gy,))[0]  # max(gy, 0): gy where gy > 0
    return _relu.ReLUGrad2(y.array).apply((positive,))


if getattr(_relu.ReLU.backward, "__name__", "") != "_backward":
    _relu.ReLU.backward = _backward


@contextmanager
def guided_relus() -> Iterator[None]:
    """Within the block, backward passes run in this thread use the guided ReLU rule."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
