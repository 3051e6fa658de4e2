"""The stage function as real processes on 127.0.0.1: the Open Inference Protocol v2 contract
(binary and JSON tensors, tritonclient), batching with left padding, the 409 replay protocol,
KV-cache eviction and release, seeded sampling, and refusal of malformed requests."""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from functions import protocol
from tests.helpers.procs import ProcessHandle, free_port, start_stage, stop_process
from tests.helpers.stage_driver import Sequence, StageDriver, StageEndpoint

pytestmark = pytest.mark.slow

N_EMBD = 64
VOCAB = 520
MAX_BODY = 4 * 1024 * 1024
# Key + value of the stage's 2 layers per position: 2 layers * 2 * n_embd * 4 bytes.
KV_BYTES_PER_POSITION = 2 * 2 * N_EMBD * 4
SMALL_CACHE = 20_000  # two 8-position sequences (8 KiB each) fit, a third does not

_ids = itertools.count(1_000)


def new_id() -> int:
    return next(_ids)


@dataclass
class Stages:
    urls: dict[str, str]  # "stage-1", "stage-2", "stage-3", "small" (stage-1 with SMALL_CACHE)
    client: httpx.Client

    def endpoints(self) -> list[StageEndpoint]:
        return [
            StageEndpoint(self.urls["stage-1"], "stage-1", "input_ids", "hidden_states_2"),
            StageEndpoint(self.urls["stage-2"], "stage-2", "hidden_states_2", "hidden_states_4"),
            StageEndpoint(self.urls["stage-3"], "stage-3", "hidden_states_4", "token_ids"),
        ]


@pytest.fixture(scope="module")
def stages(tiny_bundle: Path) -> Iterator[Stages]:
    """Three stage processes (plus a stage-1 with a small KV cache), started in parallel."""
    specs = {
        "stage-1": ("1", {}),
        "stage-2": ("2", {}),
        "stage-3": ("3", {}),
        "small": ("1", {"TANDEM_KV_CACHE_BYTES": str(SMALL_CACHE)}),
    }

    def start(item: tuple[str, tuple[str, dict[str, str]]]) -> tuple[str, str, ProcessHandle]:
        key, (stage, env) = item
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        handle = start_stage(
            tiny_bundle,
            stage,
            port,
            env={"TANDEM_MAX_BODY_BYTES": str(MAX_BODY), "TANDEM_LOG_LEVEL": "warning", **env},
        )
        return key, url, handle

    handles: list[ProcessHandle] = []
    urls: dict[str, str] = {}
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(start, item) for item in specs.items()]
        errors = []
        for f in futures:
            try:
                key, url, handle = f.result()
                urls[key] = url
                handles.append(handle)
            except AssertionError as e:
                errors.append(str(e))
    try:
        assert not errors, "\n".join(errors)
        with httpx.Client(timeout=30) as client:
            yield Stages(urls, client)
    finally:
        for h in handles:
            stop_process(h)


# ------------------------------------------------------------------------------------ helpers


def infer(
    stages: Stages,
    key: str,
    inputs: dict[str, np.ndarray],
    outputs: list[str] | None = None,
    model: str | None = None,
) -> httpx.Response:
    body, hlen = protocol.encode_request(inputs, outputs=outputs)
    model = model or ("stage-1" if key == "small" else key)
    return stages.client.post(
        f"{stages.urls[key]}/v2/models/{model}/infer", content=body, headers={protocol.HEADER: str(hlen)}
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
        "sequence_ids": np.array(ids, dtype=np.int64),
        "past_lengths": np.array(past or [0] * len(ids), dtype=np.int64),
        "input_ids": np.array(tokens, dtype=np.int64),
    }


def hidden_inputs(
    name: str, ids: list[int], x: np.ndarray, past: list[int] | None = None
) -> dict[str, np.ndarray]:
    return {
        "sequence_ids": np.array(ids, dtype=np.int64),
        "past_lengths": np.array(past or [0] * len(ids), dtype=np.int64),
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
    model = "stage-1" if key == "small" else key
    r = stages.client.get(f"{stages.urls[key]}/v2/models/{model}/sequences")
    assert r.status_code == 200, r.text
    return {int(k): v for k, v in r.json()["sequences"].items()}


def release(stages: Stages, key: str, ids: list[int]) -> None:
    model = "stage-1" if key == "small" else key
    r = stages.client.post(
        f"{stages.urls[key]}/v2/models/{model}/sequences/release", json={"sequence_ids": ids}
    )
    assert r.status_code == 200, r.text


def assert_problem(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, f"{response.status_code}: {response.text[:500]}"
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["detail"]
    for w in words:
        assert w.lower() in body["detail"].lower(), f"{w!r} not in {body['detail']!r}"
    return body


def assert_still_serving(stages: Stages, key: str = "stage-1") -> None:
    assert stages.client.get(f"{stages.urls[key]}/v2/health/live").status_code == 200
    seq = new_id()
    if key in ("stage-1", "small"):
        r = infer(stages, key, first_inputs([seq], [[1, 2, 3]]))
    else:
        name = "hidden_states_2" if key == "stage-2" else "hidden_states_4"
        r = infer(stages, key, hidden_inputs(name, [seq], np.ones((1, 3, N_EMBD))))
    assert r.status_code == 200, r.text
    release(stages, key, [seq])


def prompts(seed: int = 7, lengths: tuple[int, ...] = (3, 7, 12, 5)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=n).tolist() for n in lengths]


# ------------------------------------------------------------------- 1. the pipeline, batched


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


# ------------------------------------------------------------------------- 2. tritonclient


def test_tritonclient_binary_and_json(stages: Stages) -> None:
    import tritonclient.http as tc

    client = tc.InferenceServerClient(url=stages.urls["stage-1"].removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("stage-1")
        meta = client.get_model_metadata("stage-1")
        assert "input_ids" in [i["name"] for i in meta["inputs"]]
        assert [o["name"] for o in meta["outputs"]] == ["hidden_states_2"]
        tokens = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], dtype=np.int64)

        def run(binary: bool) -> np.ndarray:
            ids = np.array([new_id(), new_id()], dtype=np.int64)
            arrays = {"sequence_ids": ids, "past_lengths": np.zeros(2, dtype=np.int64), "input_ids": tokens}
            inputs = []
            for name, arr in arrays.items():
                inp = tc.InferInput(name, list(arr.shape), "INT64")
                inp.set_data_from_numpy(arr, binary_data=binary)
                inputs.append(inp)
            result = client.infer(
                "stage-1", inputs, outputs=[tc.InferRequestedOutput("hidden_states_2", binary_data=binary)]
            )
            return result.as_numpy("hidden_states_2")

        binary_out = run(True)
        json_out = run(False)
        assert binary_out.shape == (2, 4, N_EMBD) and binary_out.dtype == np.float32
        np.testing.assert_allclose(json_out, binary_out, rtol=1e-6, atol=1e-6)
    finally:
        client.close()

    client = tc.InferenceServerClient(url=stages.urls["stage-3"].removeprefix("http://"))
    try:
        x = np.random.default_rng(3).standard_normal((3, 2, N_EMBD)).astype(np.float32)
        ids = np.array([new_id(), new_id(), new_id()], dtype=np.int64)
        inputs = []
        for name, arr, dt in (
            ("sequence_ids", ids, "INT64"),
            ("past_lengths", np.zeros(3, np.int64), "INT64"),
            ("hidden_states_4", x, "FP32"),
        ):
            inp = tc.InferInput(name, list(arr.shape), dt)
            inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)
        result = client.infer(
            "stage-3", inputs, outputs=[tc.InferRequestedOutput("token_ids", binary_data=True)]
        )
        tokens = result.as_numpy("token_ids")
        assert tokens.shape == (3,) and tokens.dtype == np.int64
        assert ((tokens >= 0) & (tokens < VOCAB)).all()
        assert result.as_numpy("logits") is None
    finally:
        client.close()


# ------------------------------------------------------------------- 3. malformed requests


def _raw(header: dict[str, Any], data: bytes = b"") -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + data, {protocol.HEADER: str(len(head))}


def _encoded(inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> tuple[bytes, dict[str, str]]:
    body, hlen = protocol.encode_request(inputs, outputs=outputs)
    return body, {protocol.HEADER: str(hlen)}


def _ok1(**extra: np.ndarray) -> dict[str, np.ndarray]:
    return {**first_inputs([new_id()], [[1, 2, 3]]), **extra}


def _ok3(rows: int = 1, **extra: np.ndarray) -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((rows, 2, N_EMBD))
    return {**hidden_inputs("hidden_states_4", [new_id() for _ in range(rows)], x), **extra}


def _truncated() -> tuple[bytes, dict[str, str]]:
    body, headers = _encoded(_ok1())
    return body[:-5], headers


def _ids_fp32() -> dict[str, np.ndarray]:
    return {**_ok1(), "input_ids": np.array([[1.0, 2.0, 3.0]], dtype=np.float32)}


def _with(base: dict[str, np.ndarray], **changes: np.ndarray) -> dict[str, np.ndarray]:
    return {**base, **changes}


def _mask(*rows: list[int]) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


def _f32(*v: float) -> np.ndarray:
    return np.array(v, dtype=np.float32)


def _i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


# (id, stage key, body builder, expected status, words the detail must contain)
BAD_REQUESTS: list[tuple[str, str, Any, int, tuple[str, ...]]] = [
    ("truncated-binary", "stage-1", _truncated, 400, ("truncated",)),
    (
        "trailing-bytes",
        "stage-1",
        lambda: (_encoded(_ok1())[0] + b"xx", _encoded(_ok1())[1]),
        400,
        ("unexpected bytes",),
    ),
    ("header-zero", "stage-1", lambda: (_encoded(_ok1())[0], {protocol.HEADER: "0"}), 400, ("JSON",)),
    ("wrong-tensor-name", "stage-1", lambda: _encoded(_ok1(bogus=_i64(1))), 400, ("bogus",)),
    (
        "missing-tensor",
        "stage-1",
        lambda: _encoded({k: v for k, v in _ok1().items() if k != "past_lengths"}),
        400,
        ("past_lengths",),
    ),
    ("input-ids-fp32", "stage-1", lambda: _encoded(_ids_fp32()), 400, ("input_ids", "INT64")),
    (
        "input-ids-1d",
        "stage-1",
        lambda: _encoded(_with(_ok1(), input_ids=_i64(1, 2, 3))),
        400,
        ("input_ids",),
    ),
    (
        "input-ids-no-positions",
        "stage-1",
        lambda: _encoded(_with(_ok1(), input_ids=np.zeros((1, 0), np.int64))),
        400,
        ("input_ids",),
    ),
    (
        "input-ids-beyond-vocab",
        "stage-1",
        lambda: _encoded(_with(_ok1(), input_ids=_mask([1, VOCAB, 2]))),
        400,
        ("input_ids",),
    ),
    (
        "input-ids-negative",
        "stage-1",
        lambda: _encoded(_with(_ok1(), input_ids=_mask([1, -1, 2]))),
        400,
        ("input_ids",),
    ),
    (
        "sequence-ids-int32",
        "stage-1",
        lambda: _encoded(_with(_ok1(), sequence_ids=np.array([5], np.int32))),
        400,
        ("sequence_ids",),
    ),
    (
        "batch-mismatch-past",
        "stage-1",
        lambda: _encoded(_with(_ok1(), past_lengths=_i64(0, 0))),
        400,
        ("past_lengths",),
    ),
    (
        "batch-mismatch-ids",
        "stage-1",
        lambda: _encoded(_with(_ok1(), input_ids=_mask([1, 2, 3], [4, 5, 6]))),
        400,
        ("input_ids", "batch"),
    ),
    (
        "duplicate-sequence-ids",
        "stage-1",
        lambda: _encoded(first_inputs([77, 77], [[1, 2], [3, 4]])),
        400,
        ("duplicates",),
    ),
    (
        "negative-past",
        "stage-1",
        lambda: _encoded(_with(_ok1(), past_lengths=_i64(-1))),
        400,
        ("past_lengths",),
    ),
    (
        "empty-batch",
        "stage-1",
        lambda: _encoded(first_inputs([], np.zeros((0, 3), np.int64).tolist())),
        400,
        ("empty batch",),
    ),
    (
        "beyond-context-window",
        "stage-1",
        lambda: _encoded(first_inputs([new_id()], [[1] * 1025])),
        400,
        ("context window", "1024"),
    ),
    (
        "mask-not-binary",
        "stage-1",
        lambda: _encoded(_ok1(attention_mask=_mask([1, 2, 1]))),
        400,
        ("attention_mask",),
    ),
    (
        "mask-right-padded",
        "stage-1",
        lambda: _encoded(_ok1(attention_mask=_mask([1, 1, 0]))),
        400,
        ("attention_mask",),
    ),
    (
        "mask-all-padding",
        "stage-1",
        lambda: _encoded(_ok1(attention_mask=_mask([0, 0, 0]))),
        400,
        ("attention_mask",),
    ),
    (
        "mask-wrong-shape",
        "stage-1",
        lambda: _encoded(_ok1(attention_mask=_mask([1, 1]))),
        400,
        ("attention_mask",),
    ),
    (
        "sequence-end-not-bool",
        "stage-1",
        lambda: _encoded(_ok1(sequence_end=_i64(1))),
        400,
        ("sequence_end",),
    ),
    (
        "bool-byte-2",
        "stage-1",
        lambda: _raw(
            {
                "inputs": [
                    {"name": "sequence_ids", "datatype": "INT64", "shape": [1], "data": [5]},
                    {"name": "past_lengths", "datatype": "INT64", "shape": [1], "data": [0]},
                    {"name": "input_ids", "datatype": "INT64", "shape": [1, 1], "data": [1]},
                    {
                        "name": "sequence_end",
                        "datatype": "BOOL",
                        "shape": [1],
                        "parameters": {"binary_data_size": 1},
                    },
                ]
            },
            b"\x02",
        ),
        400,
        ("BOOL",),
    ),
    (
        "json-float-in-int64",
        "stage-1",
        lambda: (
            json.dumps(
                {
                    "inputs": [
                        {"name": "sequence_ids", "datatype": "INT64", "shape": [1], "data": [5.5]},
                        {"name": "past_lengths", "datatype": "INT64", "shape": [1], "data": [0]},
                        {"name": "input_ids", "datatype": "INT64", "shape": [1, 1], "data": [1]},
                    ]
                }
            ).encode(),
            {},
        ),
        400,
        ("sequence_ids", "integers"),
    ),
    (
        "json-data-count",
        "stage-1",
        lambda: (
            json.dumps(
                {"inputs": [{"name": "sequence_ids", "datatype": "INT64", "shape": [2], "data": [5]}]}
            ).encode(),
            {},
        ),
        400,
        ("sequence_ids", "elements"),
    ),
    (
        "bytes-datatype",
        "stage-1",
        lambda: (
            json.dumps(
                {"inputs": [{"name": "sequence_ids", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
            ).encode(),
            {},
        ),
        400,
        ("BYTES",),
    ),
    (
        "huge-shape",
        "stage-1",
        lambda: _raw(
            {
                "inputs": [
                    {
                        "name": "input_ids",
                        "datatype": "INT64",
                        "shape": [1 << 20, 1 << 20],
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            },
            bytes(8),
        ),
        400,
        ("input_ids",),
    ),
    (
        "hidden-nan",
        "stage-2",
        lambda: _encoded(hidden_inputs("hidden_states_2", [new_id()], np.full((1, 2, N_EMBD), np.nan))),
        400,
        ("NaN",),
    ),
    (
        "hidden-inf",
        "stage-2",
        lambda: _encoded(hidden_inputs("hidden_states_2", [new_id()], np.full((1, 2, N_EMBD), -np.inf))),
        400,
        ("infinite",),
    ),
    (
        "hidden-wrong-width",
        "stage-2",
        lambda: _encoded(hidden_inputs("hidden_states_2", [new_id()], np.ones((1, 2, N_EMBD + 1)))),
        400,
        ("hidden_states_2",),
    ),
    (
        "hidden-as-int",
        "stage-2",
        lambda: _encoded(
            {
                **hidden_inputs("hidden_states_2", [new_id()], np.ones((1, 2, N_EMBD))),
                "hidden_states_2": np.ones((1, 2, N_EMBD), np.int64),
            }
        ),
        400,
        ("hidden_states_2", "FP32"),
    ),
    ("input-ids-on-stage-2", "stage-2", lambda: _encoded(_ok1()), 400, ("input_ids",)),
    ("temperature-negative", "stage-3", lambda: _encoded(_ok3(temperature=_f32(-1))), 400, ("temperature",)),
    ("temperature-nan", "stage-3", lambda: _encoded(_ok3(temperature=_f32(math.nan))), 400, ("temperature",)),
    ("temperature-inf", "stage-3", lambda: _encoded(_ok3(temperature=_f32(math.inf))), 400, ("temperature",)),
    (
        "temperature-fp64",
        "stage-3",
        lambda: _encoded(_ok3(temperature=np.array([0.5]))),
        400,
        ("temperature",),
    ),
    ("top-p-zero", "stage-3", lambda: _encoded(_ok3(top_p=_f32(0))), 400, ("top_p",)),
    ("top-p-above-one", "stage-3", lambda: _encoded(_ok3(top_p=_f32(1.5))), 400, ("top_p",)),
    ("top-p-nan", "stage-3", lambda: _encoded(_ok3(top_p=_f32(math.nan))), 400, ("top_p",)),
    ("top-k-negative", "stage-3", lambda: _encoded(_ok3(top_k=_i64(-3))), 400, ("top_k",)),
    ("top-k-absurd", "stage-3", lambda: _encoded(_ok3(top_k=_i64(10**12))), 400, ("top_k",)),
    ("sampling-batch-mismatch", "stage-3", lambda: _encoded(_ok3(2, seed=_i64(1))), 400, ("seed",)),
    ("sampling-on-stage-1", "stage-1", lambda: _encoded(_ok1(temperature=_f32(1))), 400, ("temperature",)),
]


@pytest.mark.parametrize(
    ("key", "build", "status", "words"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_malformed_request_is_refused(
    stages: Stages, key: str, build: Any, status: int, words: tuple[str, ...]
) -> None:
    body, headers = build()
    before = held(stages, key)
    r = stages.client.post(f"{stages.urls[key]}/v2/models/{key}/infer", content=body, headers=headers)
    assert_problem(r, status, *words)
    assert held(stages, key) == before  # a refused request stores nothing
    assert_still_serving(stages, key)


def test_random_bytes_are_refused(stages: Stages) -> None:
    rng = np.random.default_rng(2024)
    url = f"{stages.urls['stage-1']}/v2/models/stage-1/infer"
    valid_body, valid_headers = _encoded(_ok1())
    statuses: dict[int, int] = {}
    for i in range(300):
        n = int(rng.integers(0, 600))
        body = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        if i % 5 == 4:  # corrupt a valid request instead: flip some bytes
            b = bytearray(valid_body)
            for j in rng.integers(0, len(b), size=int(rng.integers(1, 8))):
                b[j] = int(rng.integers(0, 256))
            body = bytes(b)
        choice = i % 6
        if choice == 0:
            headers = {}
        elif choice == 1:
            headers = {protocol.HEADER: str(int(rng.integers(0, n + 1)))}
        elif choice == 2:
            headers = {protocol.HEADER: str(-int(rng.integers(1, 1000)))}
        elif choice == 3:
            headers = {protocol.HEADER: ["abc", "1.5", "0x10", "", "+-3", "1e3", "NaN"][i % 7]}
        elif choice == 4:
            headers = {protocol.HEADER: str(n + int(rng.integers(1, 10**12)))}
        else:
            headers = {protocol.HEADER: valid_headers[protocol.HEADER]}
        r = stages.client.post(url, content=body, headers=headers)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert 400 <= r.status_code < 500, (i, r.status_code, r.text[:300])
        assert r.json()["detail"], r.text
    assert set(statuses) <= {400, 409}, statuses
    assert_still_serving(stages, "stage-1")


def test_http_level_errors(stages: Stages) -> None:
    url = stages.urls["stage-1"]
    body, headers = _encoded(_ok1())
    assert_problem(
        stages.client.post(f"{url}/v2/models/nope/infer", content=body, headers=headers), 404, "nope"
    )
    assert_problem(stages.client.get(f"{url}/v2/models/nope"), 404, "nope")
    assert_problem(stages.client.get(f"{url}/v2/models/nope/ready"), 404, "nope")
    assert_problem(stages.client.get(f"{url}/v2/models/stage-1/infer"), 405, "GET")
    assert_problem(stages.client.put(f"{url}/v2/models/stage-1/infer", content=body), 405, "PUT")
    big = bytes(MAX_BODY + 1024)
    assert_problem(
        stages.client.post(f"{url}/v2/models/stage-1/infer", content=big, headers={protocol.HEADER: "10"}),
        413,
        "TANDEM_MAX_BODY_BYTES",
    )
    r = stages.client.post(f"{url}/v2/models/stage-1/sequences/release", json={"ids": [1]})
    assert_problem(r, 400)
    r = stages.client.post(f"{url}/v2/models/stage-1/infer", content=body, headers=headers)
    assert r.status_code == 200
    assert_still_serving(stages, "stage-1")


def test_unknown_output_changes_nothing(stages: Stages) -> None:
    seq = new_id()
    outputs_of(infer(stages, "stage-1", first_inputs([seq], [[1, 2, 3]])))
    decode = first_inputs([seq], [[4]], past=[3])
    assert_problem(infer(stages, "stage-1", decode, outputs=["logits"]), 400, "logits")
    try:
        assert held(stages, "stage-1")[seq] == 3
        outputs_of(infer(stages, "stage-1", decode))  # the caller retries the step correctly
    finally:
        release(stages, "stage-1", [seq])


# ------------------------------------------------------------------------------ 4. sampling


def _sampled(
    stages: Stages,
    x: np.ndarray,
    temperature: list[float],
    top_k: list[int],
    seed: list[int],
    outputs: list[str] | None = None,
) -> dict[str, np.ndarray]:
    ids = [new_id() for _ in range(len(x))]
    inputs = hidden_inputs("hidden_states_4", ids, x)
    inputs |= {
        "temperature": np.array(temperature, np.float32),
        "top_k": np.array(top_k, np.int64),
        "top_p": np.ones(len(x), np.float32),
        "seed": np.array(seed, np.int64),
        "sequence_end": np.ones(len(x), bool),
    }
    out = outputs_of(infer(stages, "stage-3", inputs, outputs=outputs))
    assert set(ids).isdisjoint(held(stages, "stage-3"))  # sequence_end: nothing stays behind
    return out


def test_seeded_sampling_is_reproducible_in_any_batch(stages: Stages) -> None:
    rng = np.random.default_rng(5)
    row = rng.standard_normal((1, 4, N_EMBD)).astype(np.float32)
    alone = int(_sampled(stages, row, [0.8], [50], [1234])["token_ids"][0])
    assert int(_sampled(stages, row, [0.8], [50], [1234])["token_ids"][0]) == alone
    others = rng.standard_normal((2, 4, N_EMBD)).astype(np.float32)
    batch = np.concatenate([others[:1], row, others[1:]])
    out = _sampled(stages, batch, [1.0, 0.8, 0.0], [0, 50, 0], [7, 1234, -1])
    assert int(out["token_ids"][1]) == alone
    # it is sampling, not argmax: different seeds give different tokens
    tokens = {int(_sampled(stages, row, [0.8], [50], [s])["token_ids"][0]) for s in range(12)}
    assert len(tokens) > 1, tokens


def test_temperature_zero_is_argmax_of_logits(stages: Stages) -> None:
    x = np.random.default_rng(8).standard_normal((3, 5, N_EMBD)).astype(np.float32)
    out = _sampled(stages, x, [0.0] * 3, [0] * 3, [-1] * 3, outputs=["token_ids", "logprobs", "logits"])
    logits = out["logits"]
    assert logits.shape == (3, VOCAB)
    np.testing.assert_array_equal(out["token_ids"], logits.argmax(axis=-1))
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    logprobs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(
        out["logprobs"], logprobs[np.arange(3), out["token_ids"]], rtol=1e-5, atol=1e-5
    )
    # logits are never sent unless asked
    assert "logits" not in _sampled(stages, x, [0.0] * 3, [0] * 3, [-1] * 3)


# ------------------------------------------------------------------------- 5. KV eviction


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
    # one batch bigger than the budget is still served; the budget then holds again after it
    e, f = new_id(), new_id()
    outputs_of(infer(stages, "small", first_inputs([e, f], [list(range(1, 14))] * 2)))
    assert set(held(stages, "small")) == {e, f}
    assert (
        metric(stages, "small", "tandem_kv_cache_bytes", stage="stage-1")
        <= SMALL_CACHE + 26 * KV_BYTES_PER_POSITION
    )
    release(stages, "small", [e, f])
    assert metric(stages, "small", "tandem_kv_cache_bytes", stage="stage-1") == 0


# ------------------------------------------------------------------------ 6. freeing a sequence


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
