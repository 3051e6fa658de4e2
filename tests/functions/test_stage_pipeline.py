"""Stages 1-3 together, driven as the gateway drives them: batched greedy generation equal to
the PyTorch reference, the 409 replay protocol, sequences joining a running batch."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.stage_calls import (
    BOTH_KV_STORES,
    Stages,
    assert_problem,
    first_inputs,
    held,
    infer,
    metric,
    new_id,
    outputs_of,
    prompts,
    release,
)
from tests.helpers.stage_driver import Sequence, StageDriver

pytestmark = pytest.mark.processes


@BOTH_KV_STORES
def test_batched_greedy_matches_reference(stages: Stages, reference: Any) -> None:
    driver = StageDriver(stages.endpoints(), stages.client)
    ps = prompts()
    seqs = [Sequence(new_id(), p) for p in ps]
    got = driver.generate(seqs, 12)
    for p, g in zip(ps, got, strict=True):
        assert g == reference.greedy(p, 12), p
    assert driver.conflicts == []
    for s in seqs:  # every stage holds each sequence at prompt + 12 (the last token was not fed)
        for key in ("stage-1", "stage-2", "stage-3"):
            assert held(stages, key)[s.seq_id] == len(s.prompt) + 11
    driver.step(seqs, end=True)  # sequence_end frees them everywhere
    for key in ("stage-1", "stage-2", "stage-3"):
        assert not {s.seq_id for s in seqs} & set(held(stages, key))


@BOTH_KV_STORES
def test_replay_after_a_stage_loses_a_sequence(stages: Stages, reference: Any) -> None:
    driver = StageDriver(stages.endpoints(), stages.client)
    ps = prompts(seed=11)
    seqs = [Sequence(new_id(), p) for p in ps]
    victim = seqs[1]
    misses_before = metric(stages, "stage-2", "tandem_kv_cache_misses_total", stage="stage-2")

    def disturb(step: int) -> None:
        if step == 4:  # after the 5th step
            r = stages.client.delete(f"{stages.urls['stage-2']}/v2/models/stage-2/sequences/{victim.seq_id}")
            assert r.status_code == 200 and r.json() == {"released": True}, r.text

    got = driver.generate(seqs, 12, after_step=disturb)
    for p, g in zip(ps, got, strict=True):
        assert g == reference.greedy(p, 12), p
    assert len(driver.conflicts) == 1, driver.conflicts
    model, problem = driver.conflicts[0]
    assert model == "stage-2"
    assert problem["sequence_ids"] == [victim.seq_id] and problem["held_lengths"] == [0]
    assert problem["past_lengths"] == [len(victim.prompt) + 4]
    assert driver.replayed_positions == len(victim.prompt) + 4
    assert metric(stages, "stage-2", "tandem_kv_cache_misses_total", stage="stage-2") == misses_before + 1
    for key in ("stage-1", "stage-2", "stage-3"):
        release(stages, key, [s.seq_id for s in seqs])


@BOTH_KV_STORES
def test_sequences_join_a_running_batch(stages: Stages, reference: Any) -> None:
    """Continuous batching: a step that mixes prefill rows (past 0) with decode rows."""
    driver = StageDriver(stages.endpoints(), stages.client)
    ps = prompts(seed=3, lengths=(6, 2, 9, 4))
    seqs = [Sequence(new_id(), p) for p in ps[:2]]
    driver.generate(seqs, 3)
    seqs += [Sequence(new_id(), p) for p in ps[2:]]
    driver.generate(seqs, 6)
    for s in seqs:
        assert s.generated == reference.greedy(s.prompt, len(s.generated)), s.prompt
    assert [len(s.generated) for s in seqs] == [9, 9, 6, 6] and driver.conflicts == []
    driver.step(seqs, end=True)


def test_conflict_changes_nothing(stages: Stages) -> None:
    good, bad = new_id(), new_id()
    r = infer(stages, "stage-1", first_inputs([good, bad], [[1, 2], [3, 4]], past=[0, 5]))
    body = assert_problem(r, 409)
    assert body["sequence_ids"] == [bad] and body["held_lengths"] == [0] and body["past_lengths"] == [5]
    assert good not in held(stages, "stage-1")  # the good row was not stored either
    outputs_of(infer(stages, "stage-1", first_inputs([good], [[1, 2]])))
    r = infer(stages, "stage-1", first_inputs([good], [[9]], past=[3]))
    body = assert_problem(r, 409)
    assert body["held_lengths"] == [2] and body["past_lengths"] == [3]
    assert held(stages, "stage-1")[good] == 2
    release(stages, "stage-1", [good])
