"""The KV cache of a stage: LRU eviction under a byte budget, freeing by sequence_end, DELETE and
release, and the idle timeout."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from functions import contract as c
from functions import protocol
from tests.helpers.procs import free_port, start_stage, stop_process
from tests.helpers.stage_calls import (
    BOTH_KV_STORES,
    KV_BYTES_PER_POSITION,
    N_EMBD,
    SMALL_CACHE,
    Stages,
    assert_problem,
    first_inputs,
    held,
    infer,
    metric,
    new_id,
    outputs_of,
    release,
)

pytestmark = pytest.mark.processes


@BOTH_KV_STORES
def test_lru_eviction_under_a_byte_budget(stages: Stages) -> None:
    evictions = metric(stages, "small", "tandem_kv_cache_evictions_total", stage="stage-1")
    a, b, c, d = (new_id() for _ in range(4))
    prompt = list(range(1, 9))
    for seq in (a, b):
        outputs_of(infer(stages, "small", first_inputs([seq], [prompt])))
    assert held(stages, "small") == {a: 8, b: 8}
    outputs_of(infer(stages, "small", first_inputs([a], [[9]], past=[8])))  # a is now the most recent
    outputs_of(infer(stages, "small", first_inputs([c], [prompt])))  # evicts b, the least recently used
    assert held(stages, "small") == {a: 9, c: 8}
    body = assert_problem(infer(stages, "small", first_inputs([b], [[9]], past=[8])), 409)
    assert body["sequence_ids"] == [b] and body["held_lengths"] == [0] and body["past_lengths"] == [8]
    outputs_of(infer(stages, "small", first_inputs([d], [prompt])))  # evicts a
    assert held(stages, "small") == {c: 8, d: 8}
    body = assert_problem(infer(stages, "small", first_inputs([a], [[10]], past=[9])), 409)
    assert body["held_lengths"] == [0]
    assert metric(stages, "small", "tandem_kv_cache_evictions_total", stage="stage-1") == evictions + 2
    assert metric(stages, "small", "tandem_kv_cache_sequences", stage="stage-1") == 2
    cache_bytes = metric(stages, "small", "tandem_kv_cache_bytes", stage="stage-1")
    assert cache_bytes == 16 * KV_BYTES_PER_POSITION <= SMALL_CACHE
    # one call bigger than the whole budget is refused before anything is allocated or evicted
    e, f = new_id(), new_id()
    body = assert_problem(infer(stages, "small", first_inputs([e, f], [list(range(1, 14))] * 2)), 413)
    assert "26 cached positions" in body["detail"] and "TANDEM_KV_CACHE_BYTES" in body["detail"]
    assert held(stages, "small") == {c: 8, d: 8}
    # one that fits the budget evicts the others to make room
    outputs_of(infer(stages, "small", first_inputs([e, f], [list(range(1, 10))] * 2)))
    assert held(stages, "small") == {e: 9, f: 9}
    release(stages, "small", [e, f])
    assert metric(stages, "small", "tandem_kv_cache_bytes", stage="stage-1") == 0


# ------------------------------------------------------------------------ 6. freeing a sequence


@BOTH_KV_STORES
def test_sequence_end_delete_and_release_free_the_cache(stages: Stages) -> None:
    url = f"{stages.urls['stage-1']}/v2/models/stage-1/sequences"
    a, b, c, d, e = (new_id() for _ in range(5))
    outputs_of(infer(stages, "stage-1", first_inputs([a, b, c, d, e], [[1, 2, 3]] * 5)))
    assert {a: 3, b: 3, c: 3, d: 3, e: 3}.items() <= held(stages, "stage-1").items()
    # sequence_end on one row of a batch frees that row only (and still runs it)
    inputs = first_inputs([a, b], [[4], [4]], past=[3, 3]) | {"sequence_end": np.array([True, False])}
    assert outputs_of(infer(stages, "stage-1", inputs))["hidden_states_2"].shape == (2, 1, N_EMBD)
    now = held(stages, "stage-1")
    assert a not in now and now[b] == 4
    # DELETE frees, and is idempotent
    assert stages.client.delete(f"{url}/{b}").json() == {"released": True}
    assert b not in held(stages, "stage-1")
    assert stages.client.delete(f"{url}/{b}").json() == {"released": False}
    # release frees several, and names only those it held
    r = stages.client.post(f"{url}/release", json={"sequence_ids": [c, d, 987_654_321]})
    assert r.status_code == 200 and r.json() == {"released": [c, d]}
    now = held(stages, "stage-1")
    assert not {a, b, c, d} & set(now) and now[e] == 3
    release(stages, "stage-1", [e])
    assert e not in held(stages, "stage-1")


def test_idle_sequences_expire_without_traffic(tiny_bundle: Path) -> None:
    """The idle timeout frees a sequence even when no further request arrives."""
    port = free_port()
    handle = start_stage(tiny_bundle, 1, port, env={"TANDEM_KV_IDLE_SECONDS": "0.5"}, threads=None)
    try:
        url = f"http://127.0.0.1:{port}"
        body, hlen = protocol.encode_request(
            {
                "sequence_ids": np.array([77]),
                "past_lengths": np.array([0]),
                "input_ids": np.array([[1, 2, 3]]),
            }
        )
        r = httpx.post(f"{url}/v2/models/stage-1/infer", content=body, headers={protocol.HEADER: str(hlen)})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            metrics = httpx.get(f"{url}/metrics").text
            if 'tandem_kv_cache_expirations_total{stage="stage-1"} 1.0' in metrics:
                break
            time.sleep(0.2)
        assert 'tandem_kv_cache_sequences{stage="stage-1"} 0.0' in metrics, metrics
        assert 'tandem_kv_cache_expirations_total{stage="stage-1"} 1.0' in metrics
    finally:
        stop_process(handle)


def test_a_held_sequence_is_started_over_only_when_asked(stages: Stages) -> None:
    """past_lengths 0 for a sequence the stage holds is a 409 (no caller replaces another's KV cache
    by mistake) unless the row says sequence_start; sequence_start with a past is a 400."""
    seq = new_id()
    outputs_of(infer(stages, "stage-1", first_inputs([seq], [[1, 2, 3, 4, 5]])))
    body = assert_problem(infer(stages, "stage-1", first_inputs([seq], [[7, 7]])), 409, "sequence_start")
    assert body["sequence_ids"] == [seq] and body["held_lengths"] == [5] and body["past_lengths"] == [0]
    assert held(stages, "stage-1")[seq] == 5  # untouched
    again = first_inputs([seq], [[7, 7]]) | {c.SEQUENCE_START: np.array([True])}
    outputs_of(infer(stages, "stage-1", again))
    assert held(stages, "stage-1")[seq] == 2  # started over, as asked
    late = first_inputs([seq], [[8]], past=[2]) | {c.SEQUENCE_START: np.array([True])}
    assert_problem(infer(stages, "stage-1", late), 400, c.SEQUENCE_START)
    release(stages, "stage-1", [seq])
