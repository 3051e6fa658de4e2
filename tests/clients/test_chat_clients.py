"""Chat completions with the clients that use them, unchanged, against one stack of real processes
on 127.0.0.1 serving the tiny model made a chat model (tests/helpers/chat.py): the openai SDK
(whole, streamed, n = 2, logprobs), lm-evaluation-harness `local-chat-completions` with
`apply_chat_template` on a generate_until task, and guidellm's default (chat) mode. Greedy answers
equal PyTorch's on the same weights and the prompt transformers' apply_chat_template renders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.clients.test_lm_eval import TASKS_DIR
from tests.conftest import Reference
from tests.helpers.chat import BOS, EOS, hf_tokenizer
from tests.helpers.stack import Stack, start_stack

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    # third-party import-time warnings (lm-eval's and guidellm's dependencies), not ours
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]
MESSAGES = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hello, how are you today?"},
]
GREEDY = {"ignore_eos": True, "return_tokens_as_token_ids": True}  # vLLM's extensions, as extra_body


@pytest.fixture(scope="module")
def stack(chat_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(chat_bundle, tmp_path_factory.mktemp("chat-stack"))
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def hf(chat_bundle: Path) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(chat_bundle / "tokenizer.json"))
    return hf_tokenizer(tok, (chat_bundle / "chat_template.jinja").read_text(), BOS, EOS)


@pytest.fixture(scope="module")
def client(stack: Stack) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0)


def greedy_text(
    reference: Reference, hf: Any, messages: list[dict[str, Any]], n: int
) -> tuple[list[int], str]:
    """PyTorch's greedy ids on the prompt transformers renders, and their text."""
    ids = reference.greedy(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True), n)
    return ids, hf.decode(ids, skip_special_tokens=True)


def token_ids(logprobs: Any) -> list[int]:
    return [int(e.token.removeprefix("token_id:")) for e in logprobs.content]


def test_openai_sdk_whole_answer_equals_pytorch(client: Any, reference: Reference, hf: Any) -> None:
    ids, text = greedy_text(reference, hf, MESSAGES, 10)
    r = client.chat.completions.create(
        model="gpt2", messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True, extra_body=GREEDY
    )
    (choice,) = r.choices
    assert token_ids(choice.logprobs) == ids
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 10
    assert r.object == "chat.completion" and r.model == "gpt2"


def test_openai_sdk_streamed(client: Any, reference: Reference, hf: Any) -> None:
    _, text = greedy_text(reference, hf, MESSAGES, 10)
    stream = client.chat.completions.create(
        model="gpt2",
        messages=MESSAGES,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_openai_sdk_two_choices_and_logprobs(client: Any) -> None:
    r = client.chat.completions.create(
        model="gpt2",
        messages=MESSAGES,
        max_tokens=6,
        n=2,
        seed=3,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 12
    assert r.choices[0].message.content != r.choices[1].message.content
    for c in r.choices:
        assert len(c.logprobs.content) == 6
        assert "".join(e.token for e in c.logprobs.content) == c.message.content
        assert all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in c.logprobs.content)


def test_openai_sdk_sees_a_400_with_the_reason(client: Any) -> None:
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="messages must not be empty"):
        client.chat.completions.create(model="gpt2", messages=[])
    with pytest.raises(BadRequestError, match="tools is not supported"):
        client.chat.completions.create(
            model="gpt2", messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}]
        )


def test_lm_eval_local_chat_completions_generates_what_pytorch_does(
    stack: Stack, reference: Reference, hf: Any, tmp_path: Path
) -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    yaml = (TASKS_DIR / "tandem_gen.yaml").read_text().replace("DATA_DIR", str(TASKS_DIR))
    (tmp_path / "tandem_gen.yaml").write_text(yaml)
    result = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args={
            "base_url": f"{stack.gateway_url}/v1/chat/completions",
            "model": "gpt2",
            "max_retries": 1,
        },
        tasks=["tandem_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        apply_chat_template=True,
        log_samples=True,
        batch_size=1,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    samples = sorted(result["samples"]["tandem_gen"], key=lambda s: s["doc_id"])
    assert len(samples) == 3
    assert any(s["resps"][0][0] for s in samples)  # something was generated
    for s in samples:
        context, gen_kwargs = s["arguments"][0]
        # what lm-eval sent (a JsonChatStr, a one-string tuple): the task's prompt as a user message
        messages = json.loads(context[0] if isinstance(context, tuple | list) else context)
        assert messages[-1] == {"role": "user", "content": s["doc"]["prompt"]}
        ids, _ = greedy_text(reference, hf, messages, gen_kwargs["max_gen_toks"])
        want = expected(hf, ids, gen_kwargs["until"])
        assert s["resps"][0][0] == want, (messages, s["resps"], want)


def expected(hf: Any, ids: list[int], until: list[str]) -> str:
    """The answer the gateway gives for greedy `ids`: up to EOS, its text cut at the first stop."""
    eos = hf.convert_tokens_to_ids(EOS)
    text = hf.decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True)
    cut = [text.find(stop) for stop in until if stop in text]
    return text[: min(cut)] if cut else text


def chat_requests(stack: Stack) -> float:
    """Chat completions the gateway answered with 200 so far (its own metrics)."""
    import httpx

    series = 'tandem_requests_total{route="/v1/chat/completions",status="200"} '
    for line in httpx.get(f"{stack.gateway_url}/metrics", timeout=5).text.splitlines():
        if line.startswith(series):
            return float(line[len(series) :])
    return 0.0


def test_guidellm_default_chat_mode(stack: Stack, tiny_hf_dir: Path, tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.json"
    requests = 4
    cmd = [
        str(Path(sys.executable).with_name("guidellm")),
        "run",
        "--backend",
        f"kind=openai_http,target={stack.gateway_url},model=gpt2",  # no request_format: chat
        "--profile",
        "kind=synchronous",
        "--constraint",
        f"kind=max_requests,count={requests}",
        "--data",
        "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
        "--tokenizer",
        f"kind=huggingface_auto,model={tiny_hf_dir}",
        "--output",
        f"kind=json,path={report}",
        "--disable-console-interactive",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = chat_requests(stack)
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (bench,) = json.loads(report.read_text())["benchmarks"]
    metrics = bench["metrics"]
    totals = {"successful": requests, "errored": 0, "incomplete": 0, "total": requests}
    assert metrics["request_totals"] == totals
    assert chat_requests(stack) - before == requests  # the chat route served them
    ttft = metrics["time_to_first_token_ms"]["successful"]
    itl = metrics["inter_token_latency_ms"]["successful"]
    assert ttft["count"] == requests and ttft["mean"] > 0, ttft
    assert itl["count"] == requests * 7 and itl["mean"] > 0, itl  # 7 gaps between 8 tokens
    assert metrics["output_token_count"]["successful"]["min"] == 8
