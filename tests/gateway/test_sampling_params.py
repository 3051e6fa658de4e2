"""logit_bias, the penalties and min_tokens end to end (the real tokenizer, stage and gateway apps
in one process): a +100 bias forces its token, penalties move greedy output the way they should,
min_tokens holds EOS back, all reproducible with a seed; bad values are 400s naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.params import sampling_from
from gateway.sequence import Event
from tests.helpers.inproc import InProcessStack, in_process_stack

PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path) -> Iterator[InProcessStack]:
    with in_process_stack(tiny_bundle) as s:
        yield s


def ids(stack: InProcessStack, **kw: Any) -> tuple[list[int], str | None]:
    """Generated token ids and the finish reason of one sequence, through the gateway's scheduler
    and the real stages (the parameters checked as the routes check them)."""
    gw = stack.gateway
    stop = kw.pop("stop", [])
    base = {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "ignore_eos": False}
    base |= {k: kw.pop(k) for k in list(kw) if k in base}
    params = sampling_from(**base, stop=stop, logprobs=False, **kw)

    async def go() -> list[Event]:
        (seq,) = gw.require_scheduler().submit_all([PROMPT], params)
        return [ev async for ev in gw.require_scheduler().stream(seq)]

    events = stack.run(go())
    return [e.token_id for e in events if e.kind == "token"], events[-1].finish_reason


def test_logit_bias_plus_100_forces_the_token(stack: InProcessStack) -> None:
    plain, _ = ids(stack, ignore_eos=True)
    target = next(t for t in range(300, 520) if t not in plain)
    forced, _ = ids(stack, ignore_eos=True, logit_bias={str(target): 100})
    assert forced == [target] * 12
    # sampling too (any seed): +100 leaves nothing else a chance
    sampled, _ = ids(stack, ignore_eos=True, temperature=1.0, seed=3, logit_bias={str(target): 100})
    assert sampled == [target] * 12
    # -100 on the greedy choice: never chosen
    banned, _ = ids(stack, ignore_eos=True, logit_bias={str(plain[0]): -100})
    assert plain[0] not in banned


def repeats(tokens: list[int]) -> int:
    return len(tokens) - len(set(tokens))


@pytest.mark.parametrize(
    "penalty",
    [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 10.0}],
)
def test_penalties_make_greedy_output_repeat_less(stack: InProcessStack, penalty: dict[str, float]) -> None:
    plain, _ = ids(stack, ignore_eos=True, max_tokens=24)
    assert repeats(plain) > 0  # the tiny random model loops when greedy
    penalised, _ = ids(stack, ignore_eos=True, max_tokens=24, **penalty)
    assert repeats(penalised) < repeats(plain), (plain, penalised)
    # a negative frequency penalty rewards repetition: at least as many repeats
    if "frequency_penalty" in penalty:
        looped, _ = ids(stack, ignore_eos=True, max_tokens=24, frequency_penalty=-2.0)
        assert repeats(looped) >= repeats(plain)


def test_penalised_sampling_is_reproducible_with_a_seed(stack: InProcessStack) -> None:
    body: dict[str, Any] = {
        "temperature": 1.0,
        "seed": 11,
        "presence_penalty": 1.5,
        "repetition_penalty": 1.3,
    }
    body |= {"logit_bias": {"7": 3.5}, "ignore_eos": True, "max_tokens": 16}
    assert ids(stack, **body) == ids(stack, **body)


def test_min_tokens_holds_eos_back(stack: InProcessStack) -> None:
    gw = stack.gateway
    assert gw.tokenizer is not None and gw.tokenizer.eos_token_id is not None
    eos = str(gw.tokenizer.eos_token_id)
    r = stack.call(
        "POST",
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "logit_bias": {eos: 100}},
    )
    assert r.json()["usage"]["completion_tokens"] == 1  # EOS at once
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    r = stack.call(
        "POST",
        "/v1/completions",
        json={
            "prompt": PROMPT,
            "max_tokens": 10,
            "temperature": 0,
            "logit_bias": {eos: 100},
            "min_tokens": 4,
        },
    )
    # EOS banned for the first 4 tokens, then it is the 5th
    assert r.json()["usage"]["completion_tokens"] == 5, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": 6.4e-189}, "repetition_penalty"),  # 0 as float32 (found by the fuzzer)
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 1, "05": 2}}, "logit_bias"),
    ],
)
def test_bad_values_are_400s_naming_the_field(
    stack: InProcessStack, body: dict[str, Any], param: str
) -> None:
    r = stack.call("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
