"""The stages' KV budget as a per-call bound (TANDEM_KV_CACHE_BYTES) and the answer-size bound
(TANDEM_MAX_RESPONSE_BYTES): a stage refuses a call whose rows x (past + new) positions exceed its
cache budget with a 413 before allocating for it; the gateway splits decode steps to fit (answers
unchanged) and refuses at admission a request no stage could cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from functions import contract as c
from functions import protocol
from functions.bundle import load_manifest
from functions.engine import StageEngine
from functions.errors import PayloadTooLargeError
from tests.gateway.test_batch_bound import PROMPTS
from tests.helpers.inproc import InProcessStack, in_process_stack
from tests.helpers.stage_calls import KV_BYTES_PER_POSITION, VOCAB

POSITIONS = 60  # each stage caches at most this many positions (4 prompts x 21 need 84)


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path) -> Iterator[InProcessStack]:
    budget = {"cache_bytes": POSITIONS * KV_BYTES_PER_POSITION}
    with in_process_stack(tiny_bundle, stage_settings=budget) as s:
        yield s


def post_stage(stack: InProcessStack, inputs: dict[str, np.ndarray]) -> httpx.Response:
    body, hlen = protocol.encode_request(inputs)
    host = stack.hosts["stage-1-r1"]
    return stack.call(
        "POST",
        f"/v2/models/{c.stage_name(1)}/infer",
        host=host,
        content=body,
        headers={protocol.HEADER: str(hlen)},
    )


def test_a_stage_refuses_a_call_over_its_kv_budget(stack: InProcessStack) -> None:
    inputs = {
        c.SEQUENCE_IDS: np.arange(5, dtype=np.int64) + 100,
        c.PAST_LENGTHS: np.zeros(5, dtype=np.int64),
        c.INPUT_IDS: np.ones((5, 13), dtype=np.int64),  # 65 positions > 60
    }
    r = post_stage(stack, inputs)
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert "65 cached positions" in detail and "TANDEM_KV_CACHE_BYTES" in detail, detail
    assert not stack.held("stage-1-r1")
    inputs[c.INPUT_IDS] = np.ones((5, 12), dtype=np.int64)  # 60: within the budget
    assert post_stage(stack, inputs).status_code == 200
    meta = stack.call("GET", f"/v2/models/{c.stage_name(1)}", host=stack.hosts["stage-1-r1"]).json()
    assert meta["parameters"]["max_call_positions"] == POSITIONS


def test_the_gateway_splits_decode_steps_within_the_kv_budget(stack: InProcessStack, reference: Any) -> None:
    layout = stack.gateway.layout
    assert layout is not None and layout.max_call_positions == POSITIONS
    body = {"prompt": PROMPTS, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    r = stack.call("POST", "/v1/completions", json=body)  # 4 rows of up to 21 positions: 84 > 60
    assert r.status_code == 200, r.text
    tok = stack.gateway.tokenizer
    assert tok is not None
    texts = [ch["text"] for ch in sorted(r.json()["choices"], key=lambda ch: ch["index"])]
    assert texts == [tok.decode(reference.greedy(p, 6)) for p in PROMPTS]


def test_a_request_no_stage_could_cache_is_413(stack: InProcessStack) -> None:
    r = stack.call("POST", "/v1/completions", json={"prompt": [7] * 50, "max_tokens": 11})
    assert r.status_code == 413, r.text
    message = r.json()["error"]["message"]
    assert "61 cached positions" in message and "TANDEM_KV_CACHE_BYTES" in message, message
    assert (
        stack.call("POST", "/v1/completions", json={"prompt": [7] * 50, "max_tokens": 10}).status_code == 200
    )


def test_an_answer_over_the_response_bound_is_refused_before_running(tiny_bundle: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    limit = 2 * VOCAB * 4 + 64  # the logits of two rows fit, of three do not
    engine = StageEngine(
        tiny_bundle, manifest, manifest.stage(c.stage_name(3)), threads=1, max_response_bytes=limit
    )
    n = manifest.hidden_size
    name = manifest.stage(c.stage_name(3)).inputs[0].name

    def batch(rows: int) -> dict[str, np.ndarray]:
        return {
            c.SEQUENCE_IDS: np.arange(rows, dtype=np.int64) + 7,
            c.PAST_LENGTHS: np.zeros(rows, dtype=np.int64),
            name: np.zeros((rows, 2, n), dtype=np.float32),
            c.SEQUENCE_END: np.ones(rows, dtype=np.bool_),
        }

    with pytest.raises(PayloadTooLargeError, match="TANDEM_MAX_RESPONSE_BYTES"):
        engine.infer(batch(3), {c.LOGITS})
    assert engine.held() == {}
    assert engine.infer(batch(2), {c.LOGITS}).outputs[c.LOGITS].shape == (2, VOCAB)
    assert engine.infer(batch(3), {c.TOKEN_IDS}).outputs[c.TOKEN_IDS].shape == (3,)
