"""Admission control on its own: slots, bounded queue, deadline estimates, draining."""

from __future__ import annotations

import threading
import time

import pytest
from layergrad_server.admission import Admission
from layergrad_server.errors import Cancelled, DeadlineExceeded, Overloaded, Unavailable


def active() -> bool:
    return True


def test_calls_beyond_slots_and_queue_are_overloaded_at_once_with_a_retry_hint():
    admission = Admission(slots=1, max_queue=1)
    admission.record("k", 1, 2.0)
    with admission.enter("k", 1, None, active), admission.enter("k", 1, None, active):
        started = time.monotonic()
        with pytest.raises(Overloaded) as caught, admission.enter("k", 1, None, active):
            pass
        assert time.monotonic() - started < 0.1
        assert caught.value.status == "RESOURCE_EXHAUSTED" and caught.value.reason == "OVERLOADED"
        assert caught.value.retry_after == pytest.approx(4.0, abs=0.1)
        assert "1 computing + 1 queued" in caught.value.message
    with admission.enter("k", 1, None, active):  # places are given back
        assert admission.admitted == 1
    assert admission.admitted == 0


def test_queued_calls_get_the_slot_in_arrival_order():
    admission = Admission(slots=1, max_queue=3)
    order: list[int] = []
    gate = threading.Event()

    def work(index: int) -> None:
        with admission.enter("k", 1, None, active) as call, call.computing():
            if index == 0:
                gate.wait(5)
            order.append(index)

    threads = []
    for index in range(4):
        threads.append(threading.Thread(target=work, args=(index,)))
        threads[-1].start()
        time.sleep(0.05)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert order == [0, 1, 2, 3]


def test_a_deadline_the_estimate_cannot_meet_is_refused_before_compute():
    admission = Admission(slots=1, max_queue=4)
    admission.record("k", 2, 2.0)  # 1 s per input
    with pytest.raises(DeadlineExceeded) as caught, admission.enter("k", 4, time.monotonic() + 1.0, active):
        pass
    assert caught.value.reason == "DEADLINE_TOO_SHORT"
    assert "4.00s" in caught.value.message and "nothing was computed" in caught.value.message
    with admission.enter("k", 1, time.monotonic() + 2.0, active):  # 1 s of compute fits
        pass
    with admission.enter("other", 4, time.monotonic() + 0.5, active):  # no estimate: admitted
        pass


def test_the_estimate_counts_the_calls_ahead_in_the_queue():
    admission = Admission(slots=1, max_queue=4)
    admission.record("k", 1, 1.0)
    with admission.enter("k", 1, None, active), admission.enter("k", 1, None, active):
        with (
            pytest.raises(DeadlineExceeded) as caught,
            admission.enter("k", 1, time.monotonic() + 2.5, active),
        ):
            pass
        assert "behind 2 call(s)" in caught.value.message


def test_the_moving_average_follows_recent_compute_times():
    admission = Admission(slots=1, max_queue=0)
    admission.record("k", 1, 1.0)
    for _ in range(20):
        admission.record("k", 2, 1.0)
    assert admission.estimate("k", 1) == pytest.approx(0.5, abs=0.01)
    assert admission.estimate("unknown", 1) is None


def test_checkpoint_raises_once_the_caller_is_gone_or_the_deadline_passed():
    admission = Admission(slots=1, max_queue=0)
    alive = [True]
    with admission.enter("k", 1, None, lambda: alive[0]) as call:
        call.checkpoint()
        alive[0] = False
        with pytest.raises(Cancelled):
            call.checkpoint()
    with admission.enter("k", 1, time.monotonic() - 0.01, active) as call, pytest.raises(DeadlineExceeded):
        call.checkpoint()


def test_a_queued_call_whose_caller_leaves_gives_up_its_place():
    admission = Admission(slots=1, max_queue=1)
    alive = [True]
    outcome: list[BaseException] = []

    def queued() -> None:
        try:
            with admission.enter("k", 1, None, lambda: alive[0]) as call, call.computing():
                pass
        except Cancelled as error:
            outcome.append(error)

    with admission.enter("k", 1, None, active) as running, running.computing():
        thread = threading.Thread(target=queued)
        thread.start()
        time.sleep(0.1)
        alive[0] = False
        thread.join(2)
        assert outcome and admission.admitted == 1


def test_draining_refuses_new_calls_and_queued_calls_that_cannot_finish_in_time():
    admission = Admission(slots=1, max_queue=2)
    admission.record("k", 1, 1.0)
    outcome: list[object] = []

    def queued() -> None:
        try:
            with admission.enter("k", 1, None, active) as call, call.computing():
                outcome.append("ran")
        except Unavailable as error:
            outcome.append(error.reason)

    with admission.enter("k", 1, None, active) as running, running.computing():
        thread = threading.Thread(target=queued)
        thread.start()
        time.sleep(0.1)
        admission.drain(time.monotonic() + 0.5)  # the queued call needs ~1 s after the running one
        thread.join(2)
        assert outcome == ["SHUTTING_DOWN"]
        with pytest.raises(Unavailable), admission.enter("k", 1, None, active):
            pass
    assert admission.wait_idle(time.monotonic() + 1)


def test_draining_judges_the_queue_in_order_so_a_refused_call_does_not_delay_the_next():
    clock = [100.0]
    admission = Admission(slots=1, max_queue=3, clock=lambda: clock[0])
    admission.record("long", 1, 5.0)
    admission.record("short", 1, 1.0)
    outcome: dict[str, object] = {}
    queued: list[threading.Thread] = []

    def call(name: str, kind: str) -> None:
        try:
            with admission.enter(kind, 1, None, active) as admitted, admitted.computing():
                outcome[name] = "ran"
        except Unavailable as error:
            outcome[name] = error.reason

    release = threading.Event()
    with admission.enter("short", 1, None, active) as running, running.computing():
        # Behind the running call (1 s): a long call (5 s), then a short one (1 s).
        for name, kind in (("long", "long"), ("short", "short")):
            queued.append(threading.Thread(target=call, args=(name, kind)))
            queued[-1].start()
            while len(admission._queue) < len(queued):
                time.sleep(0.01)
        # 3 s left: the long call cannot finish; the short one can, once the long one is refused,
        # whichever of the two looks first.
        admission.drain(clock[0] + 3.0)
        while "long" not in outcome:
            time.sleep(0.01)
        assert outcome == {"long": "SHUTTING_DOWN"}
        release.set()
    for thread in queued:
        thread.join(5)
    assert outcome == {"long": "SHUTTING_DOWN", "short": "ran"}


def test_the_overload_message_counts_every_admitted_call_that_is_not_computing():
    admission = Admission(slots=1, max_queue=2)
    with admission.enter("k", 1, None, active), admission.enter("k", 1, None, active):
        with admission.enter("k", 1, None, active):  # admitted, none computing yet
            with pytest.raises(Overloaded) as caught, admission.enter("k", 1, None, active):
                pass
    assert "0 call(s) computing and 3 queued" in caught.value.message


def test_estimates_are_kept_for_a_bounded_number_of_kinds():
    from layergrad_server.admission import MAX_KINDS

    admission = Admission(slots=1, max_queue=0)
    for index in range(MAX_KINDS + 10):
        admission.record(f"kind-{index}", 1, 1.0)
    assert admission.estimate("kind-0", 1) is None
    assert admission.estimate(f"kind-{MAX_KINDS + 9}", 1) == 1.0
