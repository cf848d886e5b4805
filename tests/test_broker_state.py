"""The broker's bookkeeping, with plain data: the poison ledger and the request timers."""

from __future__ import annotations

from broker import protocol as p
from broker.state import TIMER_COMPACT_SLACK, PoisonLedger, RequestTimers


def request(rid: str, task: str | None = None) -> p.Request:
    extra = {p.TASK_KEY: task} if task else {}
    return p.Request(request_id=rid, session_id="s", model_id="m", layer_lo=0, deadline_ms=0, step=0,
                     kind="decode", api_key="", extra=extra)


def test_a_task_is_poison_after_failing_on_max_attempts_distinct_workers():
    ledger = PoisonLedger(max_attempts=3, remembered=100)
    first, retry = request("r1", task="t"), request("r2", task="t")  # a retry shares the task
    assert not ledger.record(first, "w1")
    assert not ledger.record(retry, "w1"), "the same worker twice says nothing about the request"
    assert not ledger.record(retry, "w2")
    assert ledger.record(first, "w3")
    assert ledger.is_poison(request("r3", task="t")) and ledger.failed_on(first) == ("w1", "w2", "w3")
    assert not ledger.is_poison(request("r4", task="other"))


def test_the_ledger_forgets_the_oldest_tasks_beyond_its_bound():
    ledger = PoisonLedger(max_attempts=1, remembered=2)
    for t in ("a", "b", "c"):
        ledger.record(request(t, task=t), "w1")
    assert ledger.failed_on(request("x", task="a")) == ()
    assert ledger.is_poison(request("y", task="c"))


def test_timers_fire_in_time_order_and_only_when_due():
    live = {"a", "b", "c"}
    timers = RequestTimers(live.__contains__, live.__len__)
    timers.push(3.0, "deadline", "c")
    timers.push(1.0, "deadline", "a")
    timers.push(1.0, "grace", "b")  # a tie fires in the order it was set
    assert timers.next_due() == 1.0
    assert list(timers.due(2.0)) == [("deadline", "a"), ("grace", "b")]
    assert timers.next_due() == 3.0 and list(timers.due(2.5)) == []


def test_timers_of_answered_requests_are_dropped_when_the_heap_grows():
    live: set[str] = set()
    timers = RequestTimers(live.__contains__, live.__len__)
    for i in range(4 * TIMER_COMPACT_SLACK + 1):  # none is live: all answered
        timers.push(float(i), "deadline", f"r{i}")
    assert len(timers) < 4 * TIMER_COMPACT_SLACK, "the heap was rebuilt from live requests"
