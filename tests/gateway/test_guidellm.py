"""guidellm (the benchmark client, installed from PyPI) runs a short streaming benchmark unchanged
against a real stack on 127.0.0.1: synthetic prompts tokenized with the tiny model's local HF
directory (nothing downloaded), the text-completions request format, and a JSON report whose time to
first token and inter-token latency are there, with zero errored requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.stack import Stack

# the session fixtures export the tiny model first when this module runs alone (minutes on 2 cores)
pytestmark = [pytest.mark.slow, pytest.mark.processes, pytest.mark.timeout(600)]
REQUESTS = 4


@pytest.fixture(scope="module")
def stack(default_stack: Stack) -> Stack:
    return default_stack


def test_guidellm_streaming_benchmark_reports_ttft_and_itl(
    stack: Stack, tiny_hf_dir: Path, tmp_path: Path
) -> None:
    report = tmp_path / "benchmarks.json"
    guidellm = Path(sys.executable).with_name("guidellm")
    cmd = [
        str(guidellm),
        "run",
        "--backend",
        f"kind=openai_http,target={stack.gateway_url},request_format=/v1/completions,model=gpt2",
        "--profile",
        "kind=synchronous",
        "--constraint",
        f"kind=max_requests,count={REQUESTS}",
        "--data",
        "kind=synthetic_text,prompt_tokens=16,output_tokens=8",
        "--tokenizer",
        f"kind=huggingface_auto,model={tiny_hf_dir}",
        "--output",
        f"kind=json,path={report}",
        "--disable-console-interactive",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (bench,) = json.loads(report.read_text())["benchmarks"]
    metrics = bench["metrics"]
    assert metrics["request_totals"] == {
        "successful": REQUESTS,
        "errored": 0,
        "incomplete": 0,
        "total": REQUESTS,
    }
    ttft = metrics["time_to_first_token_ms"]["successful"]
    itl = metrics["inter_token_latency_ms"]["successful"]
    assert ttft["count"] == REQUESTS and ttft["mean"] > 0, ttft
    assert itl["count"] == REQUESTS * 7 and itl["mean"] > 0, itl  # 7 gaps between 8 tokens
    # every request streamed the asked-for tokens
    assert metrics["output_token_count"]["successful"]["min"] == 8
