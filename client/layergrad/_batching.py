"""Calls with more inputs than the server takes, split into sub-batches whose results are joined.

A batch of N inputs is cut into consecutive sub-batches of at most the server's
``max_batch_size``; each is one call with the matching slice of the loss's
per-input data (classes, labels, targets, upstream gradients). Joining follows how
the loss reduces over the batch (``Loss._reduction``):

- a sum (every loss but SoftmaxCrossEntropy): parameter gradients and loss values
  add up, per-input gradients (input, layers) are the sub-batches' concatenated;
- a mean (SoftmaxCrossEntropy): each sub-batch of n inputs contributes with weight
  n / N, to parameter gradients, per-input gradients and the loss value alike.

Activations are per-input outputs of the forward pass and are concatenated as they are.
The joined result equals that of one call with every input up to float32 rounding:
the sums over the batch are formed in another order (and, for a mean, scaled once more).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from layergrad.losses import Reduction

if TYPE_CHECKING:
    from layergrad.client import GradientResult

Progress = Callable[[int, int], None]
"""Called after each sub-batch with (inputs done, inputs in all)."""


def bounds(batch: int, limit: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive sub-batches of at most ``limit`` inputs."""
    return [(start, min(start + limit, batch)) for start in range(0, batch, limit)]


def sub_requests(request: Any, loss: Any, limit: int) -> list[tuple[int, int, Any]]:
    """``(start, stop, request)`` for each sub-batch of ``request`` (its loss sliced to match).

    ValueError, before any call, if the loss does not hold one entry per input.
    """
    batch = len(request.inputs)
    loss._slice(0, batch, batch)  # checks the per-input data
    template = type(request)()
    template.CopyFrom(request)
    del template.inputs[:]
    parts = []
    for start, stop in bounds(batch, limit):
        part = type(request)()
        part.CopyFrom(template)
        part.inputs.extend(request.inputs[start:stop])
        part.loss.CopyFrom(loss._slice(start, stop, batch)._to_proto())
        parts.append((start, stop, part))
    return parts


class GradientJoin:
    """Accumulates sub-batch results into the result of the whole batch of ``batch`` inputs.

    ``out``: arrays to write the joined tensors into (see ``Client.gradients``).
    """

    def __init__(self, batch: int, reduction: Reduction, out: GradientResult | None) -> None:
        self.batch = batch
        self.reduction = reduction
        self._out = out
        self._input: np.ndarray | None = None
        self._layers: dict[str, np.ndarray] = {}
        self._activations: dict[str, np.ndarray] = {}
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self._loss: float | None = None

    def add(self, part: GradientResult, start: int, stop: int) -> None:
        """Adds the result of inputs ``start:stop``."""
        weight = (stop - start) / self.batch if self.reduction == "mean" else 1.0
        if part.input is not None:
            provided = None if self._out is None else self._out.input
            self._input = self._place(self._input, provided, part.input, start, stop, weight, "input")
        out_layers = {} if self._out is None else self._out.layers
        for name, array in part.layers.items():
            self._layers[name] = self._place(
                self._layers.get(name), out_layers.get(name), array, start, stop, weight, f"layers[{name!r}]"
            )
        out_activations = {} if self._out is None else self._out.activations
        for name, array in part.activations.items():
            self._activations[name] = self._place(
                self._activations.get(name),
                out_activations.get(name),
                array,
                start,
                stop,
                1.0,
                f"activations[{name!r}]",
            )
        for name, array in part.parameters.items():
            total = self._sums.get(name)
            if total is None:
                self._dtypes[name] = array.dtype
                self._sums[name] = np.multiply(array, weight, dtype=np.float32)
            elif weight == 1.0:
                total += array
            else:
                total += np.multiply(array, weight, dtype=np.float32)
        if part.loss is not None:
            self._loss = (self._loss or 0.0) + weight * part.loss

    def finish(self) -> GradientResult:
        from layergrad.client import GradientResult

        out_parameters: Mapping[str, np.ndarray] = {} if self._out is None else self._out.parameters
        parameters = {}
        for name, total in self._sums.items():
            provided = out_parameters.get(name)
            if provided is not None:
                _check_out(provided, total.shape, self._dtypes[name], f"parameters[{name!r}]")
                np.copyto(provided, total, casting="same_kind")
                parameters[name] = provided
            else:
                parameters[name] = total.astype(self._dtypes[name], copy=False)
        return GradientResult(
            input=self._input,
            layers=self._layers,
            parameters=parameters,
            activations=self._activations,
            loss=self._loss,
        )

    def _place(
        self,
        full: np.ndarray | None,
        provided: np.ndarray | None,
        part: np.ndarray,
        start: int,
        stop: int,
        weight: float,
        what: str,
    ) -> np.ndarray:
        """Writes a per-input part into rows ``start:stop`` of the batch's array (made on first use)."""
        if full is None:
            shape = (self.batch, *part.shape[1:])
            if provided is not None:
                _check_out(provided, shape, part.dtype, what)
                full = provided
            else:
                full = np.empty(shape, part.dtype)
        if weight == 1.0:
            full[start:stop] = part
        else:
            np.multiply(part, weight, out=full[start:stop], casting="same_kind")
        return full


def _check_out(array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype[Any], what: str) -> None:
    if array.shape != shape or array.dtype != dtype or not array.flags.writeable:
        raise ValueError(
            f"out {what} must be a writable {np.dtype(dtype).name} array of shape {shape}, "
            f"not {array.dtype.name} {array.shape}{'' if array.flags.writeable else ' read-only'}"
        )


def join_predictions(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Layer outputs of consecutive sub-batches, concatenated along the batch."""
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
