"""A stage with the reference Open Inference Protocol v2 client: tritonclient, binary and JSON tensors."""

from __future__ import annotations

import numpy as np
import pytest

from functions import contract as c
from tests.helpers.stage_calls import N_EMBD, STAGE_1, VOCAB, Stages, new_id

pytestmark = pytest.mark.processes


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


def test_tritonclient_reads_the_stage_s_error_message(stages: Stages) -> None:
    """A refused batch surfaces in the reference client with the stage's reason (tritonclient reads
    the Open Inference Protocol's `error` field of an application/json body)."""
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(url=stages.urls[STAGE_1].removeprefix("http://"))
    try:
        ids = np.array([new_id(), new_id()], dtype=np.int64)
        inputs = []
        for name, arr in ((c.SEQUENCE_IDS, ids), (c.PAST_LENGTHS, np.zeros(3, dtype=np.int64))):
            inp = tc.InferInput(name, list(arr.shape), "INT64")
            inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)
        with pytest.raises(InferenceServerException) as err:
            client.infer(STAGE_1, inputs)
        assert err.value.status() == "400"
        message = err.value.message()
        assert c.PAST_LENGTHS in message or c.INPUT_IDS in message, message
    finally:
        client.close()
