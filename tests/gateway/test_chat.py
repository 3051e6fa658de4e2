"""POST /v1/chat/completions in-process, on the tiny model made a chat model (tests/helpers/chat.py:
chat special tokens in its tokenizer, a ChatML-with-BOS template in its bundle): the prompt is the
template rendered and encoded as transformers' apply_chat_template does (one BOS: the template's),
greedy answers equal PyTorch's on that prompt, the whole answer and the stream take OpenAI's and
vLLM's shapes (role chunk, content deltas, finish chunk, usage chunk, [DONE]), log-probabilities
take the chat shape, and every bad input is a 400 that says what is wrong."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.discovery import ChatOverride
from gateway.openai import IGNORED_HEADER
from tests.conftest import Reference
from tests.helpers.chat import BOS, EOS, TEMPLATES, hf_tokenizer
from tests.helpers.inproc import InProcessStack, in_process_stack

ROUTE = "/v1/chat/completions"
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hello, how are you?"},
    {"role": "assistant", "content": "The quick brown fox."},
    {"role": "user", "content": [{"type": "text", "text": "Café"}, {"type": "text", "text": "naïve 東京"}]},
]
# what the template sees: text parts joined with newlines
RENDERED = [*MESSAGES[:3], {"role": "user", "content": "Café\nnaïve 東京"}]
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def stack(chat_bundle: Path) -> Iterator[InProcessStack]:
    with in_process_stack(chat_bundle) as s:
        yield s


@pytest.fixture(scope="module")
def hf(chat_bundle: Path) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(chat_bundle / "tokenizer.json"))
    return hf_tokenizer(tok, (chat_bundle / "chat_template.jinja").read_text(), BOS, EOS)


def chat(stack: InProcessStack, **body: Any) -> httpx.Response:
    return stack.call("POST", ROUTE, json={"messages": MESSAGES, **body})


def ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def refused(r: httpx.Response, *words: str, status: int = 400) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["type"] == "invalid_request_error", err
    for w in words:
        assert w in err["message"], err
    return str(err["message"])


def events(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [ln[len("data: ") :] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def ids_of(body: dict[str, Any], i: int = 0) -> list[int]:
    """The generated ids, from logprobs with return_tokens_as_token_ids."""
    return [int(e["token"].removeprefix("token_id:")) for e in body["choices"][i]["logprobs"]["content"]]


def test_prompt_ids_are_the_templates_as_transformers_encodes_them(stack: InProcessStack, hf: Any) -> None:
    want = hf.apply_chat_template(RENDERED, add_generation_prompt=True, tokenize=True)
    r = stack.call("POST", "/tokenize", json={"messages": MESSAGES})
    got = ok(r)["tokens"]
    assert got == want
    bos = hf.convert_tokens_to_ids(BOS)
    assert got[0] == bos and got[1] != bos  # the template's BOS, none added by encoding
    assert hf.convert_tokens_to_ids("<|im_start|>") in got  # special tokens as their own ids
    added = ok(stack.call("POST", "/tokenize", json={"messages": MESSAGES, "add_special_tokens": True}))
    assert added["tokens"] == [bos, *want]  # the flag reaches the tokenizer (its post-processor adds BOS)
    body = ok(chat(stack, max_tokens=2, **GREEDY))
    assert body["usage"]["prompt_tokens"] == len(want)


def test_greedy_answer_equals_pytorch_on_the_rendered_prompt(
    stack: InProcessStack, hf: Any, reference: Reference
) -> None:
    prompt = hf.apply_chat_template(RENDERED, add_generation_prompt=True, tokenize=True)
    want = reference.greedy(prompt, 12)
    body = ok(chat(stack, max_tokens=12, logprobs=True, return_tokens_as_token_ids=True, **GREEDY))
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert ids_of(body) == want
    assert choice["message"] == {"role": "assistant", "content": hf.decode(want, skip_special_tokens=True)}
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": len(prompt),
        "completion_tokens": 12,
        "total_tokens": len(prompt) + 12,
    }
    # max_completion_tokens is OpenAI's newer name, and wins over max_tokens
    body = ok(chat(stack, max_tokens=3, max_completion_tokens=5, **GREEDY))
    assert body["usage"]["completion_tokens"] == 5


def test_stream_takes_vllms_chunk_order(stack: InProcessStack) -> None:
    whole = ok(chat(stack, max_tokens=8, **GREEDY))["choices"][0]["message"]["content"]
    opts = {"include_usage": True}
    chunks = events(chat(stack, max_tokens=8, stream=True, stream_options=opts, **GREEDY))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    first, *deltas, finish, last = chunks
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert len(deltas) == 8 and all(set(c["choices"][0]["delta"]) == {"content"} for c in deltas)
    assert "".join(c["choices"][0]["delta"]["content"] for c in deltas) == whole
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8
    assert set(last["metrics"]["stage_ms"]) == {"stage-1", "stage-2", "stage-3"}
    # continuous usage stats: usage so far in every chunk
    opts["continuous_usage_stats"] = True
    chunks = events(chat(stack, max_tokens=3, stream=True, stream_options=opts, **GREEDY))
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 3, 3]


def test_two_choices_streamed_and_whole(stack: InProcessStack) -> None:
    body = ok(chat(stack, n=2, max_tokens=6, seed=7, temperature=1.0, ignore_eos=True))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["message"]["content"] != body["choices"][1]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 12
    chunks = events(chat(stack, n=2, max_tokens=6, seed=7, temperature=1.0, ignore_eos=True, stream=True))
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] == "length"
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == body["choices"][i]["message"]["content"]  # the same seed, the same choices


def test_logprobs_take_the_chat_shape(stack: InProcessStack) -> None:
    body = ok(chat(stack, max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY))
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for e in content:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["bytes"] == list(e["token"].encode()) and e["logprob"] <= 0
        assert len(e["top_logprobs"]) == 3 and e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])
        assert all(set(t) == {"token", "logprob", "bytes"} for t in e["top_logprobs"])
    assert "".join(e["token"] for e in content) == body["choices"][0]["message"]["content"]
    # logprobs without alternatives: empty lists; streamed: one entry per chunk
    body = ok(chat(stack, max_tokens=2, logprobs=True, **GREEDY))
    assert [e["top_logprobs"] for e in body["choices"][0]["logprobs"]["content"]] == [[], []]
    chunks = events(chat(stack, max_tokens=2, logprobs=True, top_logprobs=1, stream=True, **GREEDY))
    assert [len(c["choices"][0]["logprobs"]["content"]) for c in chunks[1:3]] == [1, 1]


def test_continue_final_message_and_echo(stack: InProcessStack, hf: Any) -> None:
    started = [*MESSAGES[:2], {"role": "assistant", "content": "Fine, thanks"}]
    render = {"add_generation_prompt": False, "continue_final_message": True}
    body = {**render, "max_tokens": 3, **GREEDY}
    tokens = ok(stack.call("POST", "/tokenize", json={"messages": started, **render}))["tokens"]
    assert tokens == hf.apply_chat_template(started, continue_final_message=True, tokenize=True)
    assert hf.decode(tokens).endswith("<|im_start|>assistant\nFine, thanks")
    answer = ok(stack.call("POST", ROUTE, json={"messages": started, "echo": True, **body}))
    assert answer["choices"][0]["message"]["content"].startswith("Fine, thanks")
    chunks = events(
        stack.call("POST", ROUTE, json={"messages": started, "echo": True, "stream": True, **body})
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Fine, thanks"}
    # echo after a user message adds nothing (vLLM: only the assistant's own message is continued)
    plain = ok(chat(stack, echo=True, max_tokens=3, **GREEDY))["choices"][0]["message"]["content"]
    assert plain == ok(chat(stack, max_tokens=3, **GREEDY))["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "body,words",
    [
        ({"messages": []}, ["messages must not be empty"]),
        ({"messages": [{"role": "tool", "content": "x"}]}, ["messages[0].role must be one of", "'tool'"]),
        ({"messages": [{"role": "user", "content": 5}]}, ["messages"]),
        ({"messages": [{"role": "user"}]}, ["messages[0].content is missing"]),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            ["'image_url' part"],
        ),
        ({"messages": "hello"}, ["messages"]),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, ["tools is not supported"]),
        ({"tool_choice": "required"}, ["tool_choice is not supported"]),
        ({"response_format": {"type": "json_object"}}, ["response_format 'json_object'"]),
        ({"chat_template": "{{ 1 }}"}, ["chat_template is not supported per request", "--chat-template"]),
        ({"continue_final_message": True}, ["add_generation_prompt to false"]),
        ({"top_logprobs": 2}, ["top_logprobs needs logprobs"]),
        ({"logprobs": True, "top_logprobs": 6}, ["top_logprobs must be between 0 and 5"]),
        (
            {"chat_template_kwargs": {"add_generation_prompt": False}},
            ["may not set ['add_generation_prompt']"],
        ),
        ({"max_tokens": "3"}, ["max_tokens"]),
        ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]}, ["tool_calls"]),
    ],
)
def test_bad_input_is_a_400_that_says_what(
    stack: InProcessStack, body: dict[str, Any], words: list[str]
) -> None:
    refused(stack.call("POST", ROUTE, json={"messages": MESSAGES, **body}), *words)


def test_unknown_fields_are_ignored_and_named_and_models_checked(stack: InProcessStack) -> None:
    r = chat(stack, max_tokens=1, parallel_tool_calls=False, store=True)
    assert ok(r) and r.headers[IGNORED_HEADER] == "parallel_tool_calls, store"
    refused(chat(stack, model="other"), "'other' is not served here", status=404)
    assert ok(
        chat(
            stack, model="gpt2", max_tokens=1, response_format={"type": "text"}, tools=[], tool_choice="none"
        )
    )


def test_the_route_is_counted_as_its_own(stack: InProcessStack) -> None:
    ok(chat(stack, max_tokens=1))
    refused(chat(stack, messages=[]))
    metrics = stack.call("GET", "/metrics").text
    assert 'tandem_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    assert 'tandem_requests_total{route="/v1/chat/completions",status="400"}' in metrics


def test_a_model_without_a_template_refuses_chat_and_an_override_serves_it(tiny_bundle: Path) -> None:
    with in_process_stack(tiny_bundle) as plain:
        refused(
            plain.call("POST", ROUTE, json={"messages": MESSAGES}),
            "this model has no chat template",
            "--chat-template",
        )
        assert (
            plain.call("POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200
        )
    gemma = (TEMPLATES / "gemma.jinja").read_text()
    with in_process_stack(tiny_bundle, chat_template=ChatOverride(gemma, "gemma.jinja")) as given:
        refused(given.call("POST", ROUTE, json={"messages": MESSAGES}), "System role not supported")
        body = ok(given.call("POST", ROUTE, json={"messages": MESSAGES[1:2], "max_tokens": 2}))
        assert body["usage"]["completion_tokens"] == 2
        tokens = ok(given.call("POST", "/tokenize", json={"messages": MESSAGES[1:2]}))["tokens"]
        assert given.gateway.decode(tokens).endswith("<start_of_turn>model\n")


def test_gateway_refuses_to_start_with_a_chat_template_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.__main__ import main

    config = tmp_path / "config.json"
    node = {"id": "n1", "address": "127.0.0.1:1", "model_part": 0}
    config.write_text(
        json.dumps({"model_name": "gpt2", "tokenizer": {"address": "127.0.0.1:2"}, "nodes": [node]})
    )
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }}")
    assert main(["--config", str(config), "--chat-template", str(broken)]) == 2
    assert f"the chat template from {broken} does not compile" in capsys.readouterr().err
    assert main(["--config", str(config), "--chat-template", str(tmp_path / "missing.jinja")]) == 2
    assert "missing.jinja: cannot read it" in capsys.readouterr().err
