"""The stages' rows x positions bound per call (TANDEM_MAX_BATCH_TOKENS), in-process: a stage
refuses a larger batch with a 413 before allocating for it, the gateway splits prefills and replays
into calls within the bound (answers unchanged), and refuses a prompt no call could carry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from functions import contract as c
from functions import protocol
from tests.helpers.inproc import InProcessStack, in_process_stack

LIMIT = 40
PROMPTS = [[5, 17, 42, 99, 7, 3, 8, 11, 12, 13, 14, 15, 16, 18, 19][: 12 + i] for i in range(4)]


@pytest.fixture(scope="module")
def stack(tiny_bundle: Path) -> Iterator[InProcessStack]:
    with in_process_stack(tiny_bundle, max_batch_tokens=LIMIT) as s:
        yield s


def test_a_stage_refuses_a_batch_over_the_bound(stack: InProcessStack) -> None:
    inputs = {
        c.SEQUENCE_IDS: np.arange(5, dtype=np.int64) + 100,
        c.PAST_LENGTHS: np.zeros(5, dtype=np.int64),
        c.INPUT_IDS: np.ones((5, 9), dtype=np.int64),  # 45 > 40
    }
    body, hlen = protocol.encode_request(inputs)

    async def go() -> httpx.Response:
        host = stack.hosts["stage-1-r1"]
        async with httpx.AsyncClient(transport=stack.router, base_url=f"http://{host}") as client:
            path = f"/v2/models/{c.stage_name(1)}/infer"
            return await client.post(path, content=body, headers={protocol.HEADER: str(hlen)})

    r = stack.run(go())
    assert r.status_code == 413, r.text
    assert "45" in r.json()["detail"] and "TANDEM_MAX_BATCH_TOKENS" in r.json()["detail"]
    assert not stack.held("stage-1-r1")


def test_the_gateway_splits_prefills_within_the_bound(stack: InProcessStack, reference: Any) -> None:
    assert stack.gateway.layout is not None and stack.gateway.layout.max_batch_tokens == LIMIT

    async def go() -> httpx.Response:
        async with stack.client() as client:
            body = {"prompt": PROMPTS, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            return await client.post("/v1/completions", json=body)

    r = stack.run(go())  # 4 prompts of 12-15 tokens: one prefill batch would be 60 positions
    assert r.status_code == 200, r.text
    gw = stack.gateway
    assert gw.tokenizer is not None
    texts = [ch["text"] for ch in sorted(r.json()["choices"], key=lambda ch: ch["index"])]
    assert texts == [gw.tokenizer.decode(reference.greedy(p, 6)) for p in PROMPTS]


def test_a_prompt_no_call_could_carry_is_413(stack: InProcessStack) -> None:
    async def go() -> httpx.Response:
        async with stack.client() as client:
            return await client.post("/v1/completions", json={"prompt": [7] * (LIMIT + 1), "max_tokens": 2})

    r = stack.run(go())
    assert r.status_code == 413, r.text
    assert "TANDEM_MAX_BATCH_TOKENS" in r.json()["error"]["message"]
