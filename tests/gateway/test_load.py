"""The load command (python -m tests.benchmarks.load) on the tiny bundle, shortened: many clients at
once through the real launcher's stack, every answer complete and well formed, no 5xx, and every
process's memory back near its baseline afterwards. (The figures in docs/benchmarks.md come from the
full 64 clients x 60 s run on GPT-2 124M; this checks behaviour, not speed.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks import load
from tests.helpers.procs import free_port

pytestmark = [pytest.mark.slow, pytest.mark.processes]


def test_many_clients_get_well_formed_answers_and_memory_comes_back(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "load.json"
    args = ["--bundle", str(tiny_bundle), "--clients", "24", "--seconds", "10", "--max-tokens", "24"]
    code = load.main([*args, "--port", str(free_port()), "--out", str(out)])
    figures = json.loads(out.read_text())
    assert figures["errors"] == [], figures["errors"][:5]
    assert figures["ok"] >= 24 and figures["generated_tokens"] > 0
    assert set(figures["baseline"]) == {"tokenizer", "stage-1", "stage-2", "stage-3", "gateway"}
    assert code == 0, figures  # 0 also means every process came back near its baseline
