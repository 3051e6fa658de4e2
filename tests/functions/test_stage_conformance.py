"""Conformance with two real third-party Open Inference Protocol v2 clients, tritonclient (HTTP) and
the KServe Python SDK's v2 REST client: every stage of the tiny bundle is asked, by each client, in
JSON and in binary, for each output its metadata lists alone, for all of them together, and for
none (the client's default), with only the inputs a stage requires and (last stage) with the inputs
that drive its optional outputs too. Every answer is a 2xx with exactly the outputs asked, of the
datatype and rank the metadata lists, binary or JSON as asked; or a 400 whose reason, as the client
reports it, names an output asked and the input it needs. Never a 5xx.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from functions import contract as c
from functions import protocol
from tests.helpers.stage_calls import N_EMBD, STAGE_1, STAGE_2, STAGE_3, VOCAB, Stages, new_id

pytestmark = pytest.mark.slow

ROWS, WIDTH = 2, 3


@dataclass
class Answer:
    status: int
    reason: str = ""
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    binary: dict[str, bool] = field(default_factory=dict)  # output -> it came as binary data


def stage_inputs(meta: dict[str, Any], driving: bool) -> dict[str, np.ndarray]:
    """A batch of fresh sequences ended in the same call; `driving`: with every input that an
    optional output needs (contract.OUTPUT_NEEDS) that this stage lists."""
    listed = {t["name"] for t in meta["inputs"]}
    x_name = c.data_input(list(listed))
    rng = np.random.default_rng(0)
    if x_name == c.INPUT_IDS:
        x = rng.integers(0, VOCAB, (ROWS, WIDTH)).astype(np.int64)
    else:
        x = rng.standard_normal((ROWS, WIDTH, N_EMBD)).astype(np.float32)
    inputs = {
        c.SEQUENCE_IDS: np.array([new_id() for _ in range(ROWS)], np.int64),
        c.PAST_LENGTHS: np.zeros(ROWS, np.int64),
        x_name: x,
        c.SEQUENCE_END: np.ones(ROWS, np.bool_),
    }
    extra = {
        c.NUM_TOP: np.array([2, 0], np.int64),
        c.TARGET_IDS: np.array([[5, -1, 7], [-1, -1, 9]], np.int64),
    }
    return inputs | {k: v for k, v in extra.items() if driving and k in listed}


def expected_refusal(asked: list[str] | None, inputs: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """(output, input it needs) for each output asked whose driving input is not sent."""
    return [
        (o, c.OUTPUT_NEEDS[o]) for o in asked or [] if o in c.OUTPUT_NEEDS and c.OUTPUT_NEEDS[o] not in inputs
    ]


def triton_infer(
    url: str, model: str, inputs: dict[str, np.ndarray], asked: list[str] | None, binary: bool
) -> Answer:
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(url=url.removeprefix("http://"))
    try:
        tensors = []
        for name, array in inputs.items():
            t = tc.InferInput(name, list(array.shape), protocol.datatype_of(array))
            t.set_data_from_numpy(array, binary_data=binary)
            tensors.append(t)
        requested = None if asked is None else [tc.InferRequestedOutput(n, binary_data=binary) for n in asked]
        try:
            result = client.infer(model, tensors, outputs=requested)
        except InferenceServerException as e:
            return Answer(int(e.status() or 0), e.message() or "")
        entries = result.get_response()["outputs"]
        return Answer(
            200,
            outputs={o["name"]: result.as_numpy(o["name"]) for o in entries},
            binary={o["name"]: "binary_data_size" in o.get("parameters", {}) for o in entries},
        )
    finally:
        client.close()


def kserve_infer(
    url: str, model: str, inputs: dict[str, np.ndarray], asked: list[str] | None, binary: bool
) -> Answer:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    async def run() -> Answer:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        try:
            tensors = []
            for name, array in inputs.items():
                t = InferInput(name, list(array.shape), protocol.datatype_of(array))
                t.set_data_from_numpy(array, binary_data=binary)
                tensors.append(t)
            params = {"binary_data": binary}
            requested = None if asked is None else [RequestedOutput(n, parameters=params) for n in asked]
            request = InferRequest(model, tensors, request_outputs=requested)
            if asked is None and binary:
                request.parameters = {"binary_data_output": True}
            headers: dict[str, str] = {}
            try:
                response = await client.infer(url, request, model_name=model, response_headers=headers)
            except httpx.HTTPStatusError as e:
                return Answer(e.response.status_code, str(e))
            assert not isinstance(response, dict)
            # the SDK turns binary outputs into lists as it reads them: the framing header tells
            raw = protocol.HEADER.lower() in {k.lower() for k in headers}
            return Answer(
                200,
                outputs={o.name: o.as_numpy() for o in response.outputs},
                binary={o.name: raw for o in response.outputs},
            )
        finally:
            await client.close()

    return asyncio.run(run())


CLIENTS = {"tritonclient": triton_infer, "kserve": kserve_infer}


def requests_for(meta: dict[str, Any]) -> Iterator[list[str] | None]:
    """Each listed output alone, all of them, and none named (the client's default)."""
    names = [o["name"] for o in meta["outputs"]]
    yield from ([n] for n in names)
    yield names
    yield None


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize("stage", [STAGE_1, STAGE_2, STAGE_3])
def test_every_listed_output_with_a_real_client(stages: Stages, client: str, stage: str) -> None:
    url = stages.urls[stage]
    meta = httpx.get(f"{url}/v2/models/{stage}", timeout=10).json()
    listed = {o["name"]: o for o in meta["outputs"]}
    assert listed, meta
    drives = [False, True] if any(t["name"] in c.OUTPUT_NEEDS.values() for t in meta["inputs"]) else [False]
    seen: dict[int, int] = {}
    for driving in drives:
        for asked in requests_for(meta):
            for binary in (False, True):
                inputs = stage_inputs(meta, driving)
                answer = CLIENTS[client](url, stage, inputs, asked, binary)
                seen[answer.status] = seen.get(answer.status, 0) + 1
                what = f"{client} {stage} outputs={asked} binary={binary} driving={driving}"
                assert answer.status < 500, f"{what}: {answer.status} {answer.reason}"
                refused = expected_refusal(asked, inputs)
                if refused:
                    assert answer.status == 400, f"{what}: {answer.status} {answer.reason}"
                    assert any(o in answer.reason and i in answer.reason for o, i in refused), (
                        what,
                        answer.reason,
                    )
                    continue
                assert answer.status == 200, f"{what}: {answer.status} {answer.reason}"
                # tritonclient naming no output always sends binary_data_output: true
                raw = binary or (asked is None and client == "tritonclient")
                check_outputs(answer, listed, asked, raw, what)
    assert seen.get(200), seen  # something was answered
    if stage == STAGE_3:
        assert seen.get(400), seen  # and the outputs that need an input not sent were refused


def check_outputs(
    answer: Answer, listed: dict[str, Any], asked: list[str] | None, binary: bool, what: str
) -> None:
    if asked is not None:
        assert sorted(answer.outputs) == sorted(asked), what
    else:  # the stage's defaults: the next stage's input, or the sampled tokens
        assert set(answer.outputs) <= set(listed) and answer.outputs, what
        assert c.TOKEN_IDS in answer.outputs or len(answer.outputs) == 1, what
    for name, array in answer.outputs.items():
        spec = listed[name]
        assert array.dtype == protocol.DATATYPES[spec["datatype"]], (what, name, array.dtype)
        assert array.ndim == len(spec["shape"]), (what, name, array.shape)
        assert all(d == -1 or d == n for d, n in zip(spec["shape"], array.shape, strict=True)), (what, name)
        assert answer.binary[name] is binary, (what, name)
    if c.TOKEN_IDS in answer.outputs:
        assert answer.outputs[c.TOKEN_IDS].shape == (ROWS,), what


def test_kserve_client_reads_a_refusal_reason(stages: Stages) -> None:
    """The KServe SDK surfaces the stage's reason (it reads `error` from an application/json body)."""
    meta = httpx.get(f"{stages.urls[STAGE_3]}/v2/models/{STAGE_3}", timeout=10).json()
    inputs = stage_inputs(meta, driving=False)
    answer = kserve_infer(stages.urls[STAGE_3], STAGE_3, inputs, [c.TOP_IDS], binary=True)
    assert answer.status == 400
    assert f"{c.TOP_IDS} needs {c.NUM_TOP}" in answer.reason, answer.reason
