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
