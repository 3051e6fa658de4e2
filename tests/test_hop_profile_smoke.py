"""Short runs of the per-hop profile (python -m tests.benchmarks.hop_profile) and the split's floor
(python -m tests.benchmarks.split_floor) on the tiny bundles, so that they cannot rot: a real stage
process called with the gateway's client, the same steps on the engine in-process, engines in
processes of their own, and every figure in the JSON. They check that the tools work, not how fast
anything is. (Its own module, apart from the benchmark's smoke run, marked `quiet`: queued
after everything else, not next to the exports, whose load can swamp its sub-millisecond split.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.exports import ExportCache

pytestmark = [pytest.mark.slow, pytest.mark.processes, pytest.mark.quiet]


def test_hop_profile_smoke_run(tiny_bundle: Path, tmp_path: Path) -> None:
    # the per-hop profile (python -m tests.benchmarks.hop_profile): a real stage process called
    # with the gateway's client, and the same steps on the engine in-process; every figure there
    from tests.benchmarks import hop_profile

    out = tmp_path / "hops.json"
    steps = 30
    code = hop_profile.main(
        ["--bundle", str(tiny_bundle), "--stages", "1,3", "--steps", str(steps), "--out", str(out)]
    )
    doc = json.loads(out.read_text())
    assert code == 0 and [s["stage"] for s in doc["stages"]] == ["stage-1", "stage-3"]
    for s in doc["stages"]:
        assert s["decode_steps"] == steps
        assert 0 < s["session_ms"]["p50"] < s["rtt_ms"]["p50"]
        assert 0 < s["overhead_ms"]["p50"] <= s["overhead_ms"]["p90"] <= s["overhead_ms"]["p99"]
        split = s["split_mean_ms"]
        # transport and handler are differences of means (the round trip's, the stage's handler
        # histogram's, which also counts the prefill), clamped at 0: either may read 0 on a busy
        # host, not both
        assert split["engine"] > 0 and split["transport"] >= 0 and split["handler"] >= 0
        assert split["transport"] + split["handler"] > 0
        # (the engine's share comes from a second run of the steps in this process, so a busy host
        # can make it exceed the first run's round trips: no bound against them here)


def test_split_floor_smoke_run(exports: ExportCache, tiny_bundle: Path, tmp_path: Path) -> None:
    # the split's floor (python -m tests.benchmarks.split_floor): the same tiny model in 2 and 3
    # stages, the engines chained in this process and one process per stage over a raw socket;
    # every figure there, the first bundle the reference
    from tests.benchmarks import split_floor

    two = exports.bundle("gpt2", 2)
    out = tmp_path / "floor.json"
    code = split_floor.main(["--bundles", str(two), str(tiny_bundle), "--steps", "20", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert code == 0 and [b["stages"] for b in doc["bundles"]] == [2, 3]
    for b in doc["bundles"]:
        for way in ("in_process", "processes"):
            fig = b[way]
            assert 0 < fig["sessions_ms"] < fig["token_ms"], (b["stages"], way, fig)
            assert fig["vs_first"] > 0
    assert all(doc["bundles"][0][way]["vs_first"] == 1.0 for way in ("in_process", "processes"))
