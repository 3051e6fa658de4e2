"""n and best_of on /v1/completions with the real stage apps in one process: the choices of a prompt
share one prefill per stage (a fork), differ from each other, are reproducible with a seed, replay
correctly when a fork is lost, and best_of returns the candidates with the highest cumulative
logprob."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.inproc import InProcessStack, in_process_stack

PROMPT = [5, 17, 42, 99, 7, 230, 11]
STAGES = ("stage-1", "stage-2", "stage-3")


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path) -> Iterator[InProcessStack]:
    with in_process_stack(tiny_bundle, config={"max_running": 8, "max_waiting": 4}) as s:
        yield s


def stage_metric(stack: InProcessStack, stage: str, name: str, /, **labels: str) -> float:
    text = stack.call("GET", "/metrics", host=stack.hosts[f"{stage}-r1"]).text
    for line in text.splitlines():
        if line.split("{")[0].split(" ")[0] == name and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def prefills(stack: InProcessStack) -> dict[str, float]:
    return {
        k: stage_metric(stack, k, "tandem_stage_infer_seconds_count", phase="prefill", stage=k)
        for k in STAGES
    }


def forked(stack: InProcessStack) -> dict[str, float]:
    return {k: stage_metric(stack, k, "tandem_stage_forked_sequences_total", stage=k) for k in STAGES}


def complete(stack: InProcessStack, **body: Any) -> dict[str, Any]:
    r = stack.call(
        "POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True, **body}
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def texts(body: dict[str, Any]) -> list[str]:
    return [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]


def held_nothing(stack: InProcessStack) -> None:
    for node in stack.stage_apps:
        assert stack.held(node) == {}, (node, stack.held(node))


def test_n3_with_a_seed_differs_per_choice_is_reproducible_and_prefills_once(stack: InProcessStack) -> None:
    p0, f0 = prefills(stack), forked(stack)
    first = complete(stack, n=3, seed=1234, temperature=1.0)
    p1, f1 = prefills(stack), forked(stack)
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert len(set(texts(first))) == 3, texts(first)  # three different completions
    # the prompt ran through each stage once (one prefill batch), then forked into 3 sequences
    assert {k: p1[k] - p0[k] for k in STAGES} == dict.fromkeys(STAGES, 1.0)
    assert {k: f1[k] - f0[k] for k in STAGES} == dict.fromkeys(STAGES, 3.0)
    assert first["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 24, "total_tokens": 31}
    again = complete(stack, n=3, seed=1234, temperature=1.0)
    assert texts(again) == texts(first)  # the same seed, the same three completions
    other = complete(stack, n=3, seed=99, temperature=1.0)
    assert texts(other) != texts(first)
    # choice 0 keeps the request's seed: n = 1 with that seed gives the same text
    assert texts(complete(stack, seed=1234, temperature=1.0)) == texts(first)[:1]
    held_nothing(stack)  # children freed at their end, the parent after its fork


def test_a_lost_fork_replays_each_choice_to_the_same_result(
    stack: InProcessStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    forked_run = complete(stack, n=3, seed=777, temperature=0.9)
    misses0 = stage_metric(stack, "stage-2", "tandem_kv_cache_misses_total", stage="stage-2")

    async def lost(*args: Any, **kw: Any) -> bool:
        return False  # as if the replica restarted between the prefill and the fork

    monkeypatch.setattr(stack.gateway.clients, "fork", lost)
    replayed = complete(stack, n=3, seed=777, temperature=0.9)
    assert texts(replayed) == texts(forked_run)
    # each child found nothing at its first call (409) and replayed its whole prompt
    assert stage_metric(stack, "stage-2", "tandem_kv_cache_misses_total", stage="stage-2") == misses0 + 3
    held_nothing(stack)


def test_best_of_returns_the_highest_cumulative_logprob(stack: InProcessStack) -> None:
    every = complete(stack, n=3, seed=4321, temperature=1.0, logprobs=0)
    totals = [sum(c["logprobs"]["token_logprobs"]) for c in every["choices"]]
    best = complete(stack, n=1, best_of=3, seed=4321, temperature=1.0)
    assert len(best["choices"]) == 1 and best["choices"][0]["index"] == 0
    assert best["choices"][0]["text"] == texts(every)[totals.index(max(totals))]
    assert best["choices"][0]["logprobs"] is None  # not asked for: used only to rank
    assert best["usage"]["completion_tokens"] == 24  # every candidate's tokens count
    two = complete(stack, n=2, best_of=3, seed=4321, temperature=1.0)
    ranked = [texts(every)[i] for i in sorted(range(3), key=lambda i: -totals[i])]
    assert texts(two) == ranked[:2]


def test_two_prompts_with_n2_index_prompt_by_prompt(stack: InProcessStack) -> None:
    body = complete(stack, prompt=[PROMPT, PROMPT[:3]], n=2, seed=5, temperature=1.0)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == len(PROMPT) + 3
    assert texts(body)[:2] == texts(complete(stack, n=2, seed=5, temperature=1.0))


def test_streaming_n2_sends_both_indexes(stack: InProcessStack) -> None:
    r = stack.call(
        "POST",
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 4, "n": 2, "seed": 3, "stream": True, "ignore_eos": True},
    )
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    by_index: dict[int, str] = {}
    for ch in chunks:
        for c in ch["choices"]:
            by_index[c["index"]] = by_index.get(c["index"], "") + c["text"]
    assert sorted(by_index) == [0, 1]
    assert list(by_index.values()) == texts(complete(stack, n=2, seed=3, max_tokens=4))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"n": 1, "best_of": 2, "stream": True}, "best_of"),
    ],
)
def test_bad_choices_are_400s_naming_the_field(
    stack: InProcessStack, body: dict[str, Any], param: str
) -> None:
    r = stack.call("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_full_queue_refuses_all_choices_at_once(stack: InProcessStack) -> None:
    before = prefills(stack)
    r = stack.call("POST", "/v1/completions", json={"prompt": [PROMPT] * 2, "max_tokens": 2, "n": 7})
    assert r.status_code == 429, r.text  # 14 sequences; 12 slots
    assert prefills(stack) == before  # nothing of it ran
