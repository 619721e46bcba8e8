"""The scalar objectives whose gradients the server computes.

Build one and pass it to :meth:`layergrad.Client.gradients`::

    SumOfSquares("prob")                       sum(square(prob))
    SquaredError("fc8", target=array)          sum(square(fc8 - target))
    SquaredError("prob", target_classes=[1])   sum(square(prob - one_hot(1)))
    SoftmaxCrossEntropy(labels=[281, 5])       softmax_cross_entropy(fc8, labels), batch mean
    ClassScore("fc8", [281])                   sum over the batch of fc8[i, classes[i]]
    UpstreamGradient("conv5_3", gradient=g)    backward from conv5_3 with gradient g; no loss value

Class and label lists hold one entry per input image. A layer's output is taken
after its activation function (ReLU for conv and fc6/fc7, softmax for prob).

Every loss but SoftmaxCrossEntropy is a sum over the batch (UpstreamGradient has no
value, its gradients add up over the batch too); SoftmaxCrossEntropy is a mean. A
batch split into several calls is joined accordingly (see ``Client.gradients``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar, Literal, Self, TypeAlias

import numpy as np
import numpy.typing as npt

from layergrad._gen.layergrad.v1 import gradient_service_pb2 as pb
from layergrad._tensors import to_tensor

__all__ = ["ClassScore", "Loss", "SoftmaxCrossEntropy", "SquaredError", "SumOfSquares", "UpstreamGradient"]

Classes: TypeAlias = int | Sequence[int] | npt.NDArray[np.integer]


Reduction: TypeAlias = Literal["sum", "mean"]


class Loss:
    """Base of the loss classes; see the module docstring for the available ones."""

    _reduction: ClassVar[Reduction] = "sum"
    """How the loss reduces over the batch: its value and gradients are a sum or a mean of per-input terms."""

    def _to_proto(self) -> pb.Loss:
        raise NotImplementedError

    def _items(self) -> Sequence[object] | np.ndarray | None:
        """The per-input data (one entry per input), or None when the loss has none."""
        return None

    def _with_items(self, items: Sequence[object] | np.ndarray) -> Self:
        raise NotImplementedError

    def _slice(self, start: int, stop: int, batch: int) -> Self:
        """The same loss for inputs ``start:stop`` of ``batch``; ValueError if its data is not per input."""
        items = self._items()
        if items is None:
            return self
        if len(items) != batch:
            raise ValueError(
                f"{type(self).__name__} holds {len(items)} entries for a batch of {batch} inputs: "
                "give one per input to split the batch"
            )
        return self._with_items(items[start:stop])


@dataclass(frozen=True)
class SumOfSquares(Loss):
    """``sum(square(layer))`` over every element and the batch."""

    layer: str = "prob"

    def __post_init__(self) -> None:
        _check_layer(self.layer)

    def _to_proto(self) -> pb.Loss:
        return pb.Loss(sum_of_squares=pb.SumOfSquares(layer=self.layer))


@dataclass(frozen=True, eq=False)
class SquaredError(Loss):
    """``sum(square(layer - target))``; give exactly one of ``target`` and ``target_classes``.

    ``target`` is a float array of shape ``[batch] + the layer's output shape``;
    ``target_classes`` holds one class per input and means the one-hot target
    (layers with a 1-D output only: fc6, fc7, fc8, prob).
    """

    layer: str
    target: np.ndarray | None = None
    target_classes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        if (self.target is None) == (self.target_classes is None):
            raise ValueError("SquaredError needs exactly one of target and target_classes")
        if self.target is not None:
            object.__setattr__(self, "target", _float32_array(self.target, "target"))
        else:
            object.__setattr__(self, "target_classes", _class_tuple(self.target_classes, "target_classes"))

    def _to_proto(self) -> pb.Loss:
        if self.target is not None:
            message = pb.SquaredError(layer=self.layer, target=to_tensor(self.target))
        else:
            message = pb.SquaredError(layer=self.layer, target_classes=self.target_classes)
        return pb.Loss(squared_error=message)

    def _items(self) -> Sequence[object] | np.ndarray | None:
        return self.target if self.target is not None else self.target_classes

    def _with_items(self, items: Sequence[object] | np.ndarray) -> Self:
        if self.target is not None:
            return replace(self, target=items)
        return replace(self, target_classes=items)


@dataclass(frozen=True)
class SoftmaxCrossEntropy(Loss):
    """Softmax cross-entropy of fc8 against one label (0..999) per input, averaged over the batch."""

    labels: tuple[int, ...]
    _reduction: ClassVar[Reduction] = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _class_tuple(self.labels, "labels"))

    def _to_proto(self) -> pb.Loss:
        return pb.Loss(softmax_cross_entropy=pb.SoftmaxCrossEntropy(labels=self.labels))

    def _items(self) -> Sequence[object] | np.ndarray | None:
        return self.labels

    def _with_items(self, items: Sequence[object] | np.ndarray) -> Self:
        return replace(self, labels=items)


@dataclass(frozen=True)
class ClassScore(Loss):
    """The score of one class per input at a 1-D layer (fc6, fc7, fc8, prob), summed over the batch."""

    layer: str = "fc8"
    classes: tuple[int, ...] = ()  # required; a default only so layer can default too

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        object.__setattr__(self, "classes", _class_tuple(self.classes, "classes"))

    def _to_proto(self) -> pb.Loss:
        return pb.Loss(class_score=pb.ClassScore(layer=self.layer, classes=self.classes))

    def _items(self) -> Sequence[object] | np.ndarray | None:
        return self.classes

    def _with_items(self, items: Sequence[object] | np.ndarray) -> Self:
        return replace(self, classes=items)


@dataclass(frozen=True, eq=False)
class UpstreamGradient(Loss):
    """Backpropagation from ``layer`` seeded with ``gradient`` (shape ``[batch] + the layer's shape``).

    Chainer's ``grad_outputs``; the call then returns no loss value.
    """

    layer: str
    gradient: np.ndarray

    def __post_init__(self) -> None:
        _check_layer(self.layer)
        object.__setattr__(self, "gradient", _float32_array(self.gradient, "gradient"))

    def _to_proto(self) -> pb.Loss:
        return pb.Loss(
            upstream_gradient=pb.UpstreamGradient(layer=self.layer, gradient=to_tensor(self.gradient))
        )

    def _items(self) -> Sequence[object] | np.ndarray | None:
        return self.gradient

    def _with_items(self, items: Sequence[object] | np.ndarray) -> Self:
        return replace(self, gradient=items)


def _check_layer(layer: object) -> None:
    if not isinstance(layer, str) or not layer:
        raise TypeError(f"layer must be a non-empty layer name such as 'prob', not {layer!r}")


def _float32_array(value: npt.ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a numeric array, not {array.dtype}")
    if array.ndim < 2:
        raise ValueError(f"{name} must have shape [batch] + the layer's output shape, not {array.shape}")
    return array.astype(np.float32, copy=False)


def _class_tuple(value: Classes | None, name: str) -> tuple[int, ...]:
    items = np.asarray(value).reshape(-1) if isinstance(value, np.ndarray) else value
    if isinstance(items, int | np.integer) and not isinstance(items, bool):
        items = [items]
    if isinstance(items, str | bytes) or not isinstance(items, Sequence | np.ndarray):
        raise TypeError(f"{name} must be a list of integer classes, one per input, not {value!r}")
    if any(isinstance(c, bool) or not isinstance(c, int | np.integer) for c in items):
        raise TypeError(f"{name} must hold integers, got {list(items)!r}")
    if len(items) == 0:
        raise ValueError(f"{name} must hold one class per input, got none")
    return tuple(int(c) for c in items)
