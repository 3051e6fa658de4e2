"""Session fixtures: a tiny random-weight GPT-2 written as a local HF directory, exported through
the real `python -m export` (from_pretrained on that directory), and a PyTorch reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.procs import REPO_ROOT


def run_export(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2-architecture model with seeded random weights, saved like a hub download. Its folder
    is named gpt2, so its bundle's model is called "gpt2", as the test stacks' configs name it (the
    gateway checks model_name against the bundle)."""
    from export.random_init import make_random_model

    d = tmp_path_factory.mktemp("tiny-hf") / "gpt2"
    make_random_model("tiny", d, None, seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_bundle(tiny_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported as a 3-stage bundle of two layers each (parity verified by the export
    itself). The split is explicit: the default one balances bytes, which puts the tiny model's
    large position table alone with one layer on the first stage."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-3"
    r = run_export("--model", str(tiny_hf_dir), "--out", str(out), "--layers", "0:2,2:4,4:6")
    assert r.returncode == 0, r.stdout + r.stderr
    return out


class Reference:
    """Greedy generation with the PyTorch model, one prompt at a time: the monolithic truth."""

    def __init__(self, hf_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        torch = self.torch
        ids = torch.tensor([prompt])
        out: list[int] = []
        past = None
        with torch.no_grad():
            for _ in range(n):
                r = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = r.past_key_values
                nxt = int(r.logits[0, -1].argmax())
                out.append(nxt)
                ids = torch.tensor([[nxt]])
        return out

    def logprobs(self, tokens: list[int]) -> Any:
        """(L, V) float64 log-probabilities of the next token at every position of `tokens`, from
        one forward pass: row i - 1 scores tokens[i]."""
        torch = self.torch
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([tokens])).logits[0]  # (L, V)
        return torch.log_softmax(logits.double(), dim=-1).numpy()


@pytest.fixture(scope="session")
def reference(tiny_hf_dir: Path) -> Reference:
    return Reference(tiny_hf_dir)


@pytest.fixture(scope="session")
def chat_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle as a chat model: a tokenizer with chat special tokens (same vocabulary size,
    BOS added by its post-processor when asked) and a ChatML-with-BOS chat template, written as the
    export writes them (tests/helpers/chat.py)."""
    from tests.helpers.chat import TEMPLATES
    from tests.helpers.chat import chat_bundle as make

    return make(
        tiny_bundle,
        tmp_path_factory.mktemp("bundles") / "tiny-chat",
        (TEMPLATES / "served.jinja").read_text(),
    )
