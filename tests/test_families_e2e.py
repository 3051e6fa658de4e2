"""Every supported family through real processes (tokenizer, N stage functions, gateway on
127.0.0.1), one stack per family shared by its checks: 32 greedy tokens identical to PyTorch's over
a prompt + generation longer than the sliding window, prompt logprobs (echo) within 1e-3 of
PyTorch, `n: 2` with a forked prefill, a stage restarted mid-generation (replay), and each stage
process's memory within its own files + its KV budget + 300 MB.

The bundles come from `python -m export --model DIR` on each family's tiny random-weight shape
(export/random_init.py), in 2, 3 or 4 stages (the split differs per family, so N varies too).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from functions.bundle import load_manifest
from functions.tokenizer_core import TokenizerCore
from tests.conftest import Reference, run_export
from tests.helpers.exports import ExportCache
from tests.helpers.procs import REPO_ROOT, free_port, read_until
from tests.helpers.stack import Stack, start_stack

pytestmark = [pytest.mark.export, pytest.mark.processes, pytest.mark.timeout(600)]

STAGES = {"gpt2": 2, "llama": 3, "qwen2": 4, "mistral": 2, "phi3": 3, "gemma": 2, "gemma2": 4}
TEXT = "The quick brown fox jumps over the lazy dog."
KV_BUDGET = 64 << 20  # TANDEM_KV_CACHE_BYTES of every stage here
N = 32


@dataclass
class FamilyStack:
    name: str
    stack: Stack
    reference: Reference
    tok: TokenizerCore
    prompt: list[int]
    expected: list[int]  # PyTorch's 32 greedy tokens after `prompt`


@pytest.fixture(scope="session")
def family_bundles(
    tmp_path_factory: pytest.TempPathFactory, exports: ExportCache
) -> Iterator[dict[str, Future[tuple[Path, Path]]]]:
    """Every family's model directory and bundle, exported two at a time (torch's exporter keeps one
    core busy) as soon as the first family is asked for. GPT-2's is the suite's shared tiny model in
    2 stages (tests.helpers.exports), which test_export's 2-stage case reads too."""
    # transformers' lazy attributes are not safe to resolve from two threads at once (an
    # ImportError for AutoConfig in one of them): resolve them here, before the pool starts
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig  # noqa: F401

    from export.random_init import make_random_model

    def export(name: str) -> tuple[Path, Path]:
        if name == "gpt2":
            return exports.hf_dir("gpt2"), exports.bundle("gpt2", STAGES["gpt2"])
        work = tmp_path_factory.mktemp(f"export-{name}")
        hf, bundle = work / "hf", work / "bundle"
        make_random_model(f"{name}-tiny", hf, None, seed=0)
        r = run_export("--model", str(hf), "--out", str(bundle), "--stages", str(STAGES[name]))
        assert r.returncode == 0, r.stdout + r.stderr
        return hf, bundle

    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {name: pool.submit(export, name) for name in sorted(STAGES)}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module", params=sorted(STAGES))
def fam(
    request: pytest.FixtureRequest,
    family_bundles: dict[str, Future[tuple[Path, Path]]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FamilyStack]:
    name: str = request.param
    hf, bundle = family_bundles[name].result()
    assert len(load_manifest(bundle).stages) == STAGES[name]
    reference = Reference(hf)
    tok = TokenizerCore.from_bundle(bundle)
    prompt = tok.encode(TEXT)
    stack = start_stack(
        bundle,
        tmp_path_factory.mktemp(f"stack-{name}"),
        replicas=(1,) * STAGES[name],
        env={"TANDEM_KV_CACHE_BYTES": str(KV_BUDGET)},
    )
    try:
        yield FamilyStack(name, stack, reference, tok, prompt, reference.greedy(prompt, N))
    finally:
        stack.stop()


def _complete(fam: FamilyStack, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{fam.stack.gateway_url}/v1/completions", json={"ignore_eos": True, **body}, timeout=120)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def test_greedy_tokens_match_pytorch_past_the_window(fam: FamilyStack) -> None:
    window = load_manifest(fam.stack.bundle).config["sliding_window"]
    assert window is None or len(fam.prompt) + N > 2 * window
    r = httpx.post(
        f"{fam.stack.gateway_url}/api/model/process",
        json={"text": TEXT, "max_tokens": N, "ignore_eos": True},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == fam.expected


def test_prompt_logprobs_match_pytorch(fam: FamilyStack) -> None:
    tokens = [*fam.prompt, *fam.expected[:8]]
    body = _complete(fam, prompt=tokens, max_tokens=1, echo=True, logprobs=1, temperature=0)
    got = body["choices"][0]["logprobs"]["token_logprobs"][: len(tokens)]
    want = fam.reference.logprobs(tokens)  # (L, V)
    assert got[0] is None
    diffs = [abs(got[i] - float(want[i - 1, tokens[i]])) for i in range(1, len(tokens))]
    assert max(diffs) <= 1e-3, diffs


def _forked(fam: FamilyStack) -> float:
    total = 0.0
    for name, urls in fam.stack.stage_urls.items():
        for line in httpx.get(f"{urls[0]}/metrics", timeout=5).text.splitlines():
            if line.startswith("tandem_stage_forked_sequences_total{") and f'stage="{name}"' in line:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_two_choices_share_the_prefill_and_match(fam: FamilyStack) -> None:
    before = _forked(fam)
    body = _complete(fam, prompt=fam.prompt, n=2, max_tokens=N, temperature=0)
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    assert texts == [fam.tok.decode(fam.expected)] * 2
    assert _forked(fam) - before == 2 * len(fam.stack.stage_urls)  # both choices forked on every stage


def test_a_stage_restarted_mid_generation_replays(fam: FamilyStack) -> None:
    """The last stage is killed once it holds part of the sequence, then started again on its port:
    the gateway replays what it lost and the tokens are the same."""
    last = list(fam.stack.stage_urls)[-1]
    node_id = f"{last}-r1"
    url = fam.stack.stage_urls[last][0]

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(timeout=120) as c:
            body = {"text": TEXT, "max_tokens": N, "ignore_eos": True}
            task = asyncio.create_task(c.post(f"{fam.stack.gateway_url}/api/model/process", json=body))
            while not task.done():
                held = (await c.get(f"{url}/v2/models/{last}/sequences")).json()["sequences"]
                if any(n >= len(fam.prompt) + 4 for n in held.values()):
                    handle = fam.stack.procs[node_id]
                    handle.process.kill()
                    handle.process.wait()
                    port = int(url.rsplit(":", 1)[1])
                    await asyncio.to_thread(fam.stack.start_stage, node_id, len(fam.stack.stage_urls), port)
                    break
                await asyncio.sleep(0.002)
            else:
                pytest.fail("the generation ended before the stage could be killed")
            return await task

    r = asyncio.run(main())
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == fam.expected
    replays = httpx.get(f"{fam.stack.gateway_url}/metrics", timeout=5).text
    assert any(
        line.startswith("tandem_replays_total{")
        and f'stage="{last}"' in line
        and float(line.rsplit(" ", 1)[1]) >= 1
        for line in replays.splitlines()
    )


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_each_stage_holds_its_own_files_only(fam: FamilyStack) -> None:
    m = load_manifest(fam.stack.bundle)
    for s in m.stages:
        rss = _rss(fam.stack.procs[f"{s.name}-r1"].process.pid)
        assert rss < s.bytes + KV_BUDGET + (300 << 20), (s.name, rss, s.bytes)


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_launcher_starts_one_process_per_stage(
    family_bundles: dict[str, Future[tuple[Path, Path]]], tmp_path: Path
) -> None:
    """`python -m infra.local.stack up` on a 4-stage Qwen2 bundle: four stage processes, served."""
    hf, bundle = family_bundles["qwen2"].result()
    gw, tok = free_port(), free_port()
    base = free_port()
    while any(p in (gw, tok) or not _bindable(p) for p in range(base, base + 4)):
        base = free_port()
    ports = ["--gateway-port", str(gw), "--tokenizer-port", str(tok), "--stage-port-base", str(base)]
    cmd = [sys.executable, "-m", "infra.local.stack", "up", "--bundle", str(bundle), "--no-export"]
    p = subprocess.Popen(
        [*cmd, "--no-frontend", "--no-prometheus", *ports],
        cwd=REPO_ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TANDEM_STATE_DIR": str(tmp_path)},
    )
    try:
        out = read_until(p.stdout, lambda line: line.startswith("  OpenAPI docs"), 120)
        assert "tandem is up: hf, 4 stage processes" in out, out
        assert sorted(s["name"] for s in json.loads((tmp_path / "pids.json").read_text())["services"]) == [
            "gateway", "stage-1", "stage-2", "stage-3", "stage-4", "tokenizer",
        ]  # fmt: skip
        r = httpx.post(
            f"http://127.0.0.1:{gw}/api/model/process",
            json={"text": TEXT, "max_tokens": 8, "ignore_eos": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["token_ids"] == Reference(hf).greedy(
            TokenizerCore.from_bundle(bundle).encode(TEXT), 8
        )
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)


def test_the_kv_budget_counts_the_family_kv_shape(fam: FamilyStack) -> None:
    """Each stage turns its KV budget into positions by its layers' KV heads x head_dim (GQA, an
    explicit head_dim), never by hidden_size; its metadata says the family's shape."""
    m = load_manifest(fam.stack.bundle)
    for s in m.stages:
        meta = httpx.get(f"{fam.stack.stage_urls[s.name][0]}/v2/models/{s.name}", timeout=5).json()[
            "parameters"
        ]
        per_position = (s.layers[1] - s.layers[0]) * 2 * m.num_kv_heads * m.head_dim * 4
        assert meta["max_call_positions"] == KV_BUDGET // per_position, (s.name, meta)
        assert (meta["family"], meta["num_kv_heads"], meta["head_dim"]) == (
            fam.name,
            m.num_kv_heads,
            m.head_dim,
        )
        assert meta["hidden_size"] == m.hidden_size and meta["max_positions"] == m.max_positions
