"""Prompt scoring (echo + logprobs) and top-N log-probabilities through the real gateway, tokenizer
and stage apps (in process), against the PyTorch reference; the scoring head asked exactly once
per prompt position, also when the last stage lost the sequence; bad input; an old bundle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from functions import contract
from gateway.scoring import targets
from gateway.sequence import SamplingParams, Sequence
from tests.conftest import Reference
from tests.helpers.bundles import bundle_without_scoring_head
from tests.helpers.inproc import InProcessStack, head_calls, in_process_stack

PROMPTS = [[5, 17, 42, 99, 7], [300, 12], [8, 9, 10, 11, 12, 13, 14, 15, 200, 201, 3], [77]]
TOL = 1e-3


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path) -> Iterator[InProcessStack]:
    with in_process_stack(tiny_bundle) as s:
        yield s


def post(stack: InProcessStack, body: dict[str, Any]) -> Any:
    return stack.call("POST", "/v1/completions", json={"temperature": 0, **body})


def text_of(stack: InProcessStack, token: int) -> str:
    tok = stack.gateway.tokenizer
    assert tok is not None
    return tok.decode([token])


def expected_top(stack: InProcessStack, row: np.ndarray, n: int) -> dict[str, float]:
    ids = np.argsort(-row, kind="stable")[:n]
    return {text_of(stack, int(t)): float(row[t]) for t in ids}


def check_top(stack: InProcessStack, got: dict[str, float], row: np.ndarray, n: int) -> None:
    want = expected_top(stack, row, n)
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) <= TOL


def test_prompt_logprobs_equal_the_reference_for_a_batch(stack: InProcessStack, reference: Reference) -> None:
    r = post(stack, {"prompt": PROMPTS, "max_tokens": 0, "echo": True, "logprobs": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 0
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in PROMPTS)
    worst = 0.0
    for choice, prompt in zip(sorted(body["choices"], key=lambda c: c["index"]), PROMPTS, strict=True):
        lp = choice["logprobs"]
        ref = reference.logprobs(prompt)  # (L, V)
        assert choice["finish_reason"] == "length"
        assert choice["text"] == stack.gateway.tokenizer.decode(prompt)  # type: ignore[union-attr]
        assert lp["tokens"] == [text_of(stack, t) for t in prompt]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert len(lp["token_logprobs"]) == len(prompt) == len(lp["top_logprobs"])
        for i in range(1, len(prompt)):
            worst = max(worst, abs(lp["token_logprobs"][i] - ref[i - 1, prompt[i]]))
            check_top(stack, lp["top_logprobs"][i], ref[i - 1], 3)
        offsets = np.cumsum([0] + [len(t) for t in lp["tokens"][:-1]]).tolist()
        assert lp["text_offset"] == offsets
    assert worst <= TOL


def test_echo_with_generation_scores_prompt_and_generated_tokens(
    stack: InProcessStack, reference: Reference
) -> None:
    prompt = PROMPTS[0]
    r = post(stack, {"prompt": prompt, "max_tokens": 4, "echo": True, "logprobs": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    generated = reference.greedy(prompt, 4)
    tokens = prompt + generated
    ref = reference.logprobs(tokens)
    lp = choice["logprobs"]
    assert lp["tokens"] == [text_of(stack, t) for t in tokens]
    tok = stack.gateway.tokenizer
    assert tok is not None
    assert choice["text"] == tok.decode(prompt) + tok.decode(generated)
    got = np.array(lp["token_logprobs"][1:])
    assert np.abs(got - ref[np.arange(len(tokens) - 1), tokens[1:]]).max() <= TOL
    for i in range(1, len(tokens)):
        check_top(stack, lp["top_logprobs"][i], ref[i - 1], 2)
        # greedy: each generated token is the first of its alternatives (what lm-eval's is_greedy reads)
        if i >= len(prompt):
            assert max(lp["top_logprobs"][i].values()) == lp["token_logprobs"][i]


def test_top_logprobs_of_generated_tokens_streamed(stack: InProcessStack, reference: Reference) -> None:
    import json

    prompt = PROMPTS[2]
    body = {"prompt": prompt, "max_tokens": 3, "logprobs": 5, "ignore_eos": True, "stream": True}
    r = post(stack, body)
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
    generated = reference.greedy(prompt, 3)
    ref = reference.logprobs(prompt + generated)
    assert [x["tokens"][0] for x in lps] == [text_of(stack, t) for t in generated]
    for j, x in enumerate(lps):
        row = ref[len(prompt) - 1 + j]
        assert abs(x["token_logprobs"][0] - row[generated[j]]) <= TOL
        check_top(stack, x["top_logprobs"][0], row, 5)
    assert [x["text_offset"][0] for x in lps] == np.cumsum(
        [0] + [len(x["tokens"][0]) for x in lps[:-1]]
    ).tolist()


def test_each_prompt_position_is_scored_once_even_after_the_last_stage_lost_it(
    stack: InProcessStack, reference: Reference
) -> None:
    """Stage 3 forgets the sequence after its prefill: the decode step's 409 makes the gateway
    replay the whole prefill there, and the replay asks the head for nothing (already scored)."""
    engine = stack.engine("stage-3-r1")
    gw = stack.gateway
    prompt = PROMPTS[2]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=1)
    params = SamplingParams(**{**params.__dict__, "score_prompt": True})

    async def go() -> Sequence:
        (seq,) = gw.require_scheduler().submit_all([prompt], params)
        async for ev in gw.require_scheduler().stream(seq):
            if ev.kind == "token" and seq.n_generated == 1:
                assert engine.release(seq.id)  # as after an eviction or a restart
        return seq

    with head_calls(stack, "stage-3-r1") as scored:
        seq = stack.run(go())
    assert scored == [len(prompt) - 1]
    ref = reference.logprobs(prompt)
    got = [seq.prompt_scores[i][0] for i in range(1, len(prompt))]
    assert np.abs(np.array(got) - ref[np.arange(len(prompt) - 1), prompt[1:]]).max() <= TOL
    assert seq.tokens[len(prompt) :] == reference.greedy(prompt, 3)


def test_targets_ask_only_for_positions_not_yet_scored() -> None:
    """The rule behind exactly once, on a replay that starts inside the prompt."""
    from functions.tokenizer_core import IncrementalDecoder

    params = SamplingParams(max_tokens=1, logprobs=True, score_prompt=True)
    seq = Sequence.new([10, 11, 12, 13, 14], params, IncrementalDecoder.__new__(IncrementalDecoder), 3, 4)
    seq.prompt_scores = {1: (-1.0, ()), 2: (-2.0, ())}
    rows = [np.zeros(5, dtype=np.int64)]
    got = targets([seq], rows, {seq.id: 0})
    assert got is not None
    ids, asked = got
    assert ids.tolist() == [[-1, -1, 13, 14, -1]]  # position 2 scores token 3, 3 scores 4; 4 samples
    assert asked == [(0, 3), (0, 4)]
    seq.prompt_scores |= {3: (-3.0, ()), 4: (-4.0, ())}
    assert targets([seq], rows, {seq.id: 0}) is None


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"logprobs": 6}, "logprobs", "between 0 and 5"),
        ({"logprobs": -1}, "logprobs", "between 0 and 5"),
        ({"echo": True, "logprobs": 1, "stream": True}, "echo", "stream"),
        ({"max_tokens": 0}, "max_tokens", "0 only with echo"),
        ({"echo": True, "max_tokens": -1}, "max_tokens", "at least 0"),
        ({"echo": True, "logprobs": 1, "n": 2}, "n", "n = 1"),
        ({"echo": "yes"}, "echo", "Expected `bool`"),
    ],
)
def test_bad_scoring_requests_are_400(
    stack: InProcessStack, body: dict[str, Any], param: str, words: str
) -> None:
    r = post(stack, {"prompt": "hello", "max_tokens": 1, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    # a field of the wrong type is named at the start of the message (the body decoder's style)
    assert param in (err["param"], err["message"].split(":")[0]) and words in err["message"], err


def test_a_bundle_without_the_head_serves_but_refuses_prompt_scoring(
    tiny_bundle: Path, tmp_path: Path, reference: Reference
) -> None:
    old = bundle_without_scoring_head(tiny_bundle, tmp_path / "old")
    with in_process_stack(old) as s:
        r = post(s, {"prompt": PROMPTS[0], "max_tokens": 0, "echo": True, "logprobs": 1})
        assert r.status_code == 400
        assert "re-export" in r.json()["error"]["message"]
        # the stage itself says so too, to a client that asks it directly
        engine = s.engine("stage-3-r1")
        with pytest.raises(contract.ContractError, match="re-export"):
            engine.infer(
                {
                    contract.SEQUENCE_IDS: np.array([1]),
                    contract.PAST_LENGTHS: np.array([0]),
                    engine.x_name: np.zeros((1, 2, engine.io.hidden_size), dtype=np.float32),
                    contract.TARGET_IDS: np.array([[3, -1]]),
                }
            )
        # everything else still works, top-N of generated tokens included
        r = post(s, {"prompt": PROMPTS[0], "max_tokens": 2, "logprobs": 2, "ignore_eos": True})
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        generated = reference.greedy(PROMPTS[0], 2)
        assert lp["tokens"] == [text_of(s, t) for t in generated]
        ref = reference.logprobs(PROMPTS[0] + generated)
        check_top(s, lp["top_logprobs"][1], ref[len(PROMPTS[0])], 2)
