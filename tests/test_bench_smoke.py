"""A short run of the benchmark command (python -m tests.benchmarks.bench) on the tiny model, one
pass, so that it cannot rot: the monolith and three stack configurations, all pipelined (depth 2):
plain, with a simulated hop delay, and int8, loaded side by side, every figure in the JSON, the
stack's greedy text equal to the monolith's, the targets evaluated and the plot drawn. It checks
that the benchmark works, not how fast anything is. (The per-hop profile's run:
tests/test_hop_profile_smoke.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.benchmarks import bench
from tests.helpers.exports import TINY_LAYERS, ExportCache
from tests.helpers.procs import free_port

pytestmark = [pytest.mark.slow, pytest.mark.processes, pytest.mark.timeout(900)]

STACKS = ["stack:d2", "stack:d2:5ms", "stack:int8:d2"]


@pytest.mark.export  # the int8 twin of the shared bundle
def test_benchmark_smoke_run(tiny_bundle: Path, exports: ExportCache, tmp_path: Path) -> None:
    # the shared bundle (exported with the reference) and its int8 twin, laid out as the benchmark
    # finds them: BUNDLE and BUNDLE-int8
    bundle = tmp_path / "tiny"
    int8 = exports.bundle("gpt2", None, "--with-reference", "--quantize", "int8", layers=TINY_LAYERS)
    for src, dst in ((tiny_bundle, bundle), (int8, tmp_path / "tiny-int8")):
        shutil.copytree(src, dst)
    doc_path, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code = bench.main(
        [
            *("--bundle", str(bundle), "--variants", "monolith,stack", "--stacks", "base,5ms,int8"),
            *("--pipeline-depth", "2"),
            *("--concurrency", "1,3", "--new-tokens", "6", "--prompt-tokens", "5", "--rounds", "1"),
            *("--skip-startup", "--stack-port", str(free_port())),
            *("--out", str(doc_path), "--plot", str(png)),
        ]
    )
    doc = json.loads(doc_path.read_text())
    assert code == 0 and doc["errors"] == {}, doc["errors"]
    assert list(doc["results"]) == ["monolith", *STACKS]
    for variant, per in doc["results"].items():
        assert set(per) == {"1", "3"}, variant
        for c, r in per.items():
            assert r["aggregate_tok_s"] > 0 and r["first_token_ms"] > 0 and r["itl_p50_ms"] > 0, variant
            assert len(r["runs"]) == 1 and len(r["tokens" if variant == "monolith" else "texts"]) == int(c)
            if variant != "monolith":  # from the gateway's hop histogram: a stage call per stage and token
                assert r["runs"][0]["hop_calls"] >= 3 * 6 and r["hop_overhead_p50_ms"] > 0, variant
    # every float stack streamed the monolith's greedy text; int8 is not held to it
    assert {k for k, v in doc["checks"].items() if v == "equal"} == {
        f"monolith_vs_{s}_text_C{c}" for s in STACKS if "int8" not in s for c in (1, 3)
    }, doc["checks"]
    # the simulated delay really is in every stage call: 5 ms x 3 stages per token, at least
    assert doc["results"]["stack:d2:5ms"]["1"]["itl_p50_ms"] >= 15.0
    assert [(s["pipeline_depth"], s["hop_delay_ms"]) for s in doc["config"]["stacks"]] == [
        (2, 0.0),
        (2, 5.0),
        (2, 0.0),
    ]
    assert doc["config"]["stacks"][2]["bundle"].endswith("tiny-int8")
    names = [t["name"] for t in doc["targets"]]
    assert any("first token" in n for n in names)
    assert any(n.startswith("stack:int8:d2 vs stack:d2, 1 stream") for n in names)
    assert "stack:d2:5ms/stack:d2 aggregate tok/s, C=3" in doc["ratios"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
