"""Stage processes for the stage-function tests, and the small calls those tests make: one batch
in, its outputs or its problem details out; what a stage holds; its metrics."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from functions import contract as c
from functions import protocol
from functions import stage_api as api
from tests.helpers.stage_driver import StageEndpoint

N_EMBD = 64
VOCAB = 520
MAX_BODY = 4 * 1024 * 1024
# Key + value of the stage's 2 layers per position: 2 layers * 2 * KV heads * head_dim * 4 bytes.
KV_BYTES_PER_POSITION = 2 * 2 * N_EMBD * 4
SMALL_CACHE = 20_000  # two 8-position sequences (8 KiB each) fit, a third does not
# the tiny test model: 6 layers, 2 per stage
STAGE_1, STAGE_2, STAGE_3 = (c.stage_name(k) for k in (1, 2, 3))
HIDDEN_2, HIDDEN_4 = c.hidden_states(2), c.hidden_states(4)

# how the `stages` fixture serves (tests/functions/conftest.py): every test runs on the first two;
# DEVICE_KV (the fast path, the KV cache in the device store) only where a test asks for it
STAGE_PARAMS = ["fast-path", "litestar-route"]
DEVICE_KV = "device-kv"
BOTH_KV_STORES = pytest.mark.parametrize("stages", [*STAGE_PARAMS, DEVICE_KV], indirect=True)

_ids = itertools.count(1_000)


def new_id() -> int:
    return next(_ids)


@dataclass
class Stages:
    urls: dict[str, str]  # STAGE_1..STAGE_3 and "small" (stage 1 with SMALL_CACHE)
    client: httpx.Client

    def endpoints(self) -> list[StageEndpoint]:
        return [
            StageEndpoint(self.urls[STAGE_1], STAGE_1, c.INPUT_IDS, HIDDEN_2),
            StageEndpoint(self.urls[STAGE_2], STAGE_2, HIDDEN_2, HIDDEN_4),
            StageEndpoint(self.urls[STAGE_3], STAGE_3, HIDDEN_4, c.TOKEN_IDS),
        ]


def infer(
    stages: Stages,
    key: str,
    inputs: dict[str, np.ndarray],
    outputs: list[str] | None = None,
    model: str | None = None,
) -> httpx.Response:
    body, hlen = protocol.encode_request(inputs, outputs=outputs)
    model = model or (STAGE_1 if key == "small" else key)
    return stages.client.post(
        stages.urls[key] + api.infer_path(model), content=body, headers={protocol.HEADER: str(hlen)}
    )


def outputs_of(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    raw = response.headers.get(protocol.HEADER)
    return protocol.decode_response(response.content, int(raw) if raw is not None else None).outputs


def first_inputs(
    ids: list[int], tokens: list[list[int]], past: list[int] | None = None
) -> dict[str, np.ndarray]:
    """A stage-1 batch, one row per sequence, all rows the same length."""
    return {
        c.SEQUENCE_IDS: np.array(ids, dtype=np.int64),
        c.PAST_LENGTHS: np.array(past or [0] * len(ids), dtype=np.int64),
        c.INPUT_IDS: np.array(tokens, dtype=np.int64),
    }


def hidden_inputs(
    name: str, ids: list[int], x: np.ndarray, past: list[int] | None = None
) -> dict[str, np.ndarray]:
    return {
        c.SEQUENCE_IDS: np.array(ids, dtype=np.int64),
        c.PAST_LENGTHS: np.array(past or [0] * len(ids), dtype=np.int64),
        name: x.astype(np.float32),
    }


def metric(stages: Stages, key: str, sample: str, **labels: str) -> float:
    text = stages.client.get(f"{stages.urls[key]}/metrics").text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {sample} {labels} in /metrics")


def held(stages: Stages, key: str) -> dict[int, int]:
    model = STAGE_1 if key == "small" else key
    r = stages.client.get(stages.urls[key] + api.sequences_path(model))
    assert r.status_code == 200, r.text
    listing = msgspec.json.decode(r.content, type=api.SequencesAnswer)
    return {int(k): v for k, v in listing.sequences.items()}


def release(stages: Stages, key: str, ids: list[int]) -> None:
    model = STAGE_1 if key == "small" else key
    body = msgspec.json.encode(api.ReleaseRequest(ids))
    r = stages.client.post(stages.urls[key] + api.release_path(model), content=body)
    assert r.status_code == 200, r.text


def assert_problem(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, f"{response.status_code}: {response.text[:500]}"
    assert response.headers["content-type"].startswith("application/json")  # problem JSON, OIP-readable
    assert response.json()["error"] == response.json()["detail"]
    body = response.json()
    assert body["status"] == status and body["detail"]
    for w in words:
        assert w.lower() in body["detail"].lower(), f"{w!r} not in {body['detail']!r}"
    return body


def assert_still_serving(stages: Stages, key: str = STAGE_1) -> None:
    assert stages.client.get(f"{stages.urls[key]}/v2/health/live").status_code == 200
    seq = new_id()
    if key in (STAGE_1, "small"):
        r = infer(stages, key, first_inputs([seq], [[1, 2, 3]]))
    else:
        name = HIDDEN_2 if key == STAGE_2 else HIDDEN_4
        r = infer(stages, key, hidden_inputs(name, [seq], np.ones((1, 3, N_EMBD))))
    assert r.status_code == 200, r.text
    release(stages, key, [seq])


def prompts(seed: int = 7, lengths: tuple[int, ...] = (3, 7, 12, 5)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=n).tolist() for n in lengths]
