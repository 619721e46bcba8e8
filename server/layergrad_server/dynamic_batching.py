"""Dynamic batching: concurrent requests' per-example work computed as one batch.

Knows nothing of gRPC. With ``--batch-delay-ms`` above 0, a gradient or Predict call whose
results are all per example (input, layer and link gradients, activations; never parameter
gradients, which are sums over the batch and would mix callers) joins an open *group* of
calls that ask for the same thing of the same engine: the same pattern, loss kind and layer,
targets, output type and input shape. The group's first call (its *leader*) waits for a
compute slot as any call does, then up to the delay from the group's opening for others to
join (or until the merged batch reaches the size limit), and computes every member's inputs
as one batch: inputs concatenated, one loss whose gradient is each member's own loss's on its
rows (sums stay sums; a softmax cross entropy, averaged over its batch alone, is weighed by
``1 / batch`` per row; targets, classes and upstream gradients are concatenated). Each member
gets its own rows of every tensor and its own loss value, computed from its rows of the loss
layer.

A merged batch computes the same functions on more rows, so each member's results equal its
own unbatched call up to float32 rounding (the matrix products see other shapes); a request
with ``exact`` set is never merged and is bit-identical to the same Chainer code in-process.
The members other than the leader hold no compute slot: they wait for the leader, checking
their own caller and deadline. One who goes away while waiting leaves the group (a leader
who does hands the group to the next member); once the batch is computing, a member who goes
away gets its error and the computation goes on for the others, and stops only when every
member has gone.

The model must compute each input independently of the others in its batch (every built-in
model does, with ``train`` off); a user's Chain that mixes inputs must not be served with
batching on.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np

from layergrad_server import engine as eng
from layergrad_server.errors import Cancelled, LayergradError

# How often a waiting member wakes to check its caller and deadline.
POLL_SECONDS = 0.05


class Call(Protocol):
    """What the batcher needs of an admitted call (``admission.AdmittedCall``)."""

    batch: int
    entered: float

    def computing(self) -> AbstractContextManager[None]: ...
    def checkpoint(self) -> None: ...
    def shared(self, queue_seconds: float, compute_seconds: float) -> None: ...


def gradients_key(plan: eng.Plan) -> tuple[Any, ...] | None:
    """What a planned gradient query must share with others to be computed with them, or
    None if it cannot be (it asks for parameter gradients)."""
    query = plan.query
    if plan.parameters or query.all_parameters:
        return None
    loss = query.loss
    if isinstance(loss, eng.SquaredError):
        shape: tuple[Any, ...] = ("tensor" if loss.target is not None else "classes",)
    elif isinstance(loss, eng.SoftmaxCrossEntropy):
        if loss.row_weights is not None:
            return None
        shape = ()
    else:
        shape = ()
    return (
        "gradients",
        query.pattern,
        type(loss).__name__,
        getattr(loss, "layer", ""),
        *shape,
        plan.loss_layer,
        plan.layers,
        plan.links,
        query.input,
        tuple(query.activations),
        np.dtype(query.output_dtype).str,
        query.inputs.shape[1:],
        query.inputs.dtype.str,
    )


def predict_key(inputs: np.ndarray, layers: Sequence[str], output_dtype: np.dtype) -> tuple[Any, ...]:
    """What a validated Predict call (its layers resolved) must share with others."""
    return ("predict", tuple(layers), np.dtype(output_dtype).str, inputs.shape[1:], inputs.dtype.str)


def _merged_loss(losses: Sequence[eng.Loss], sizes: Sequence[int]) -> eng.Loss:
    """One loss over the concatenated rows whose gradient on each member's rows is its own loss's."""
    first = losses[0]
    if isinstance(first, eng.SumOfSquares):
        return first
    if isinstance(first, eng.SquaredError):
        if first.target is not None:
            return eng.SquaredError(first.layer, target=np.concatenate([loss.target for loss in losses]))
        classes = np.concatenate([loss.target_classes for loss in losses])
        return eng.SquaredError(first.layer, target_classes=classes)
    if isinstance(first, eng.ClassScore):
        return eng.ClassScore(first.layer, np.concatenate([loss.classes for loss in losses]))
    if isinstance(first, eng.UpstreamGradient):
        return eng.UpstreamGradient(first.layer, np.concatenate([loss.gradient for loss in losses]))
    assert isinstance(first, eng.SoftmaxCrossEntropy)
    weights = np.concatenate([np.full(size, 1.0 / size, dtype=np.float32) for size in sizes])
    labels = np.concatenate([loss.labels for loss in losses])
    return eng.SoftmaxCrossEntropy(labels, row_weights=weights)


def merge_plans(plans: Sequence[eng.Plan]) -> tuple[eng.Plan, list[tuple[int, int, eng.Loss]]]:
    """The plans (of one ``gradients_key``) as one plan over their concatenated inputs, and each
    member's rows and loss."""
    sizes = [plan.query.inputs.shape[0] for plan in plans]
    first = plans[0]
    total = sum(sizes)
    query = dataclasses.replace(
        first.query,
        inputs=np.concatenate([plan.query.inputs for plan in plans]),
        loss=_merged_loss([plan.query.loss for plan in plans], sizes),
    )
    results = tuple(dataclasses.replace(spec, shape=(total, *spec.shape[1:])) for spec in first.results)
    starts = np.cumsum([0, *sizes])
    members = [
        (int(start), int(start) + size, plan.query.loss)
        for start, size, plan in zip(starts, sizes, plans, strict=False)
    ]
    return dataclasses.replace(first, query=query, results=results), members


def _rows(tensors: Sequence[eng.ResultTensor], start: int, stop: int) -> list[eng.ResultTensor]:
    return [dataclasses.replace(tensor, array=tensor.array[start:stop]) for tensor in tensors]


@dataclasses.dataclass(eq=False)
class _Member:
    call: Call
    work: Any  # a Plan, or a Predict call's inputs
    size: int
    result: Any = None
    error: BaseException | None = None
    done: bool = False


@dataclasses.dataclass(eq=False)
class _Group:
    key: tuple[Any, ...]
    opened: float
    members: list[_Member] = dataclasses.field(default_factory=list)
    size: int = 0
    full: bool = False
    closed: bool = False
    started: float = 0.0
    compute_seconds: float = 0.0

    @property
    def leader(self) -> _Member | None:
        return self.members[0] if self.members else None


Compute = Callable[[list[Any], eng.Checkpoint], list[Any]]


class BatchListener(Protocol):
    """What the batcher reports (``observability.metrics.Metrics`` implements it)."""

    def batch_waiting(self, calls: int) -> None: ...
    def batch_computed(self, calls: int) -> None: ...


class Batcher:
    """Groups concurrent compatible calls of each engine (see the module's description)."""

    def __init__(
        self, max_delay_seconds: float, max_batch: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_delay_seconds = max_delay_seconds
        self.max_batch = max_batch
        self._clock = clock
        self._lock = threading.Condition()
        self._open: dict[tuple[int, tuple[Any, ...]], _Group] = {}
        self._waiting = 0  # calls in groups not yet closed
        # Told ``listener.batch_waiting(calls)`` (under the lock) whenever the calls waiting in open
        # groups change, and ``listener.batch_computed(calls)`` after each group is computed.
        self.listener: BatchListener | None = None

    def gradients(
        self, engine: eng.Engine, plan: eng.Plan, call: Call, *, defer_dtype: bool = False
    ) -> eng.GradientResult:
        """``engine.gradients(plan)`` computed with other calls' when they can be."""
        key = gradients_key(plan)
        if key is None:
            with call.computing():
                return engine.gradients(plan, checkpoint=call.checkpoint, defer_dtype=defer_dtype)

        def compute(plans: list[eng.Plan], checkpoint: eng.Checkpoint) -> list[eng.GradientResult]:
            if len(plans) == 1:
                return [engine.gradients(plans[0], checkpoint=checkpoint, defer_dtype=defer_dtype)]
            merged, members = merge_plans(plans)
            result = engine.gradients(merged, checkpoint=checkpoint, defer_dtype=defer_dtype, members=members)
            return [
                eng.GradientResult(_rows(result.tensors, start, stop), loss)
                for (start, stop, _), loss in zip(members, result.member_losses, strict=True)
            ]

        return self._run(engine, key, plan, plan.query.inputs.shape[0], call, compute)

    def predict(
        self,
        engine: eng.Engine,
        inputs: np.ndarray,
        layers: Sequence[str],
        output_dtype: np.dtype,
        call: Call,
    ) -> list[eng.ResultTensor]:
        """``engine.predict(inputs, layers, output_dtype)`` computed with other calls' when it can be."""
        names = engine.check_predict(inputs, layers, output_dtype)

        def compute(batches: list[np.ndarray], checkpoint: eng.Checkpoint) -> list[list[eng.ResultTensor]]:
            tensors = engine.predict(np.concatenate(batches), names, output_dtype, checkpoint=checkpoint)
            starts = np.cumsum([0, *(len(batch) for batch in batches)])
            return [_rows(tensors, int(a), int(b)) for a, b in itertools.pairwise(starts)]

        return self._run(engine, predict_key(inputs, names, output_dtype), inputs, len(inputs), call, compute)

    # ---- groups ---------------------------------------------------------------

    def _join(self, engine: eng.Engine, key: tuple[Any, ...], member: _Member) -> _Group:
        slot = (id(engine), key)
        with self._lock:
            group = self._open.get(slot)
            if group is not None and group.size + member.size > self.max_batch:
                group.full = True
                group = None
            if group is None:
                group = self._open[slot] = _Group(key, self._clock())
            group.members.append(member)
            group.size += member.size
            if group.size >= self.max_batch:
                group.full = True
            self._waiting_changed(+1)
            self._lock.notify_all()
            return group

    def _waiting_changed(self, change: int) -> None:
        self._waiting += change
        if self.listener is not None:
            self.listener.batch_waiting(self._waiting)

    def _leave(self, engine: eng.Engine, group: _Group, member: _Member) -> None:
        """Takes a member out of a group not yet closed (the next member leads, if any)."""
        with self._lock:
            if group.closed:
                return
            group.members.remove(member)
            group.size -= member.size
            self._waiting_changed(-1)
            if not group.members and self._open.get((id(engine), group.key)) is group:
                del self._open[(id(engine), group.key)]
            self._lock.notify_all()

    def _run(
        self, engine: eng.Engine, key: tuple[Any, ...], work: Any, size: int, call: Call, compute: Compute
    ) -> Any:
        member = _Member(call, work, size)
        group = self._join(engine, key, member)
        with self._lock:  # reentrant: ``_leave`` takes it too
            while not member.done and group.leader is not member:
                try:
                    call.checkpoint()
                except BaseException:
                    self._leave(engine, group, member)
                    raise
                self._lock.wait(POLL_SECONDS)
            leads = not member.done
        if leads:
            try:
                self._lead(engine, group, member, compute)
            except BaseException:
                # Cancelled or refused while waiting for a slot: the next member leads.
                self._leave(engine, group, member)
                raise
        else:
            call.shared(group.started - call.entered, group.compute_seconds)
        if member.error is not None:
            raise member.error
        return member.result

    def _lead(self, engine: eng.Engine, group: _Group, me: _Member, compute: Compute) -> None:
        """Computes the group's batch in the leader's compute slot, then wakes the members."""
        with me.call.computing():
            with self._lock:
                while not group.full:
                    left = group.opened + self.max_delay_seconds - self._clock()
                    if left <= 0:
                        break
                    self._lock.wait(left)
                group.closed = True
                slot = (id(engine), group.key)
                if self._open.get(slot) is group:
                    del self._open[slot]
                members = list(group.members)
                self._waiting_changed(-len(members))
            me.call.batch = group.size  # the slot's compute time is the whole batch's
            group.started = self._clock()
            try:
                results = compute([m.work for m in members], _checkpoint(members))
            except BaseException as error:
                for m in members:
                    if m.error is None:
                        m.error = error
            else:
                for m, result in zip(members, results, strict=True):
                    m.result = result
            finally:
                group.compute_seconds = self._clock() - group.started
                with self._lock:
                    for m in members:
                        m.done = True
                    self._lock.notify_all()
                if self.listener is not None:
                    self.listener.batch_computed(len(members))


def _checkpoint(members: Sequence[_Member]) -> eng.Checkpoint:
    """A checkpoint for the merged computation: a member whose caller has gone gets its error;
    the computation stops when every member has."""

    def checkpoint() -> None:
        alive = False
        for member in members:
            if member.error is None:
                try:
                    member.call.checkpoint()
                except LayergradError as error:
                    member.error = error
                else:
                    alive = True
        if not alive:
            raise Cancelled("every caller of the batch went away; it was stopped", reason="CANCELLED")

    return checkpoint
