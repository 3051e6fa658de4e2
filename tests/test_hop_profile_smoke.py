"""A short run of the per-hop profile command (python -m tests.benchmarks.hop_profile) on the tiny
bundle, so that it cannot rot: a real stage process called with the gateway's client, the same
steps on the engine in-process, and every figure in the JSON. It checks that the profile works, not
how fast anything is. (Its own module, apart from the benchmark's smoke run, marked `quiet`: queued
after everything else, not next to the exports, whose load can swamp its sub-millisecond split.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
        assert split["transport"] + split["engine"] < s["rtt_ms"]["p99"]
