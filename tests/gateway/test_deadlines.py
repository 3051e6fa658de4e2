"""Per-call deadlines from a stage's own recent latency (gateway.deadlines): a replica that takes a
call and never answers is given up at its deadline, not at call_timeout, even when its health
checks pass; its rows move to the other replica and replay, answers unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.deadlines import MIN_SAMPLES, CallDeadlines
from tests.gateway.test_inproc import PROMPT, greedy, run_breaking_its_replica, run_to_end, sample, tokens_of
from tests.helpers.inproc import InProcessStack, in_process_stack


def test_budget_follows_the_recent_latency_and_the_work() -> None:
    d = CallDeadlines(stages=2, factor=10.0, floor=0.5, ceiling=60.0)
    assert d.budget(0, 1) == 60.0  # nothing observed yet: call_timeout
    for _ in range(MIN_SAMPLES):
        d.observe(0, 0.02, 1)  # 20 ms for one position
    assert d.budget(0, 1) == 0.5  # 10 x 20 ms is under the floor
    assert d.budget(0, 16) == pytest.approx(3.2)  # 16 positions: 10 x 20 ms x 16
    assert d.budget(0, 10_000) == 60.0  # never above call_timeout
    assert d.budget(1, 1) == 60.0  # per stage
    d.observe(0, 1.0, 1)  # one slow answer raises the budget (the slowest recent one counts)
    assert d.budget(0, 1) == pytest.approx(10.0)
    assert CallDeadlines(1, factor=0.0, floor=0.5, ceiling=7.0).budget(0, 1) == 7.0  # factor 0: off


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path) -> Iterator[InProcessStack]:
    # the hung replica passes its health checks: only the deadline can find it; the call timeout is
    # long enough that waiting it out would fail the test
    config = {"call_timeout": 50, "call_deadline_floor": 0.5, "stage_wait": 5}
    with in_process_stack(tiny_bundle, replicas=(1, 2, 1), config=config) as s:
        yield s


def test_a_hung_replica_is_given_up_at_its_deadline(stack: InProcessStack, reference: Any) -> None:
    gw = stack.gateway
    stack.run(run_to_end(gw, gw.require_scheduler().submit_all([PROMPT], greedy(8))[0]))  # latency
    # after 4 tokens the replica holding the sequence takes calls and never answers
    events, hung, took = run_breaking_its_replica(stack, 12, 4, stack.router.hung, timeout=45)
    assert tokens_of(events) == reference.greedy(PROMPT, 12)
    assert took < 15, f"{took:.1f} s: the call waited far beyond its deadline"
    assert sample(stack, "tandem_stage_deadline_misses_total", stage="stage-2", replica=hung) == 1
    assert sample(stack, "tandem_failovers_total", stage="stage-2") == 1
