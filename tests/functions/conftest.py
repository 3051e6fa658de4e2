"""The stage processes every stage-function test module shares: stages 1-3 and a stage 1 with a
small KV cache, per way of serving `infer` (the ASGI fast path, and Litestar's route as it runs
when tracing is on), so the whole contract is checked against both. Tests marked `BOTH_KV_STORES`
(tests.helpers.stage_calls) also run against stages that keep the KV cache in the device store
(TANDEM_KV_STORE=device, on the CPU device here).

Each set starts (its four processes at once) the first time a test asks for its mode, and stays up
for the rest of the run: the `stages` fixture only picks the set, so any order of tests, on any
pytest-xdist worker, starts each set at most once per worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.procs import ProcessHandle, free_port, stage_command, start_all, stop_process
from tests.helpers.stage_calls import DEVICE_KV, MAX_BODY, SMALL_CACHE, STAGE_PARAMS, Stages


class StageSets:
    """The running stage sets by mode (STAGE_PARAMS and DEVICE_KV)."""

    def __init__(self, bundle: Path):
        self.bundle = bundle
        self.sets: dict[str, Stages] = {}
        self.handles: list[ProcessHandle] = []

    def get(self, mode: str) -> Stages:
        if mode not in self.sets:
            self.sets[mode] = self._start(mode)
        return self.sets[mode]

    def _start(self, mode: str) -> Stages:
        env: dict[str, str | None] = {
            "TANDEM_MAX_BODY_BYTES": str(MAX_BODY),
            "TANDEM_LOG_LEVEL": "warning",
            "TANDEM_FAST_PATH": "off" if mode == "litestar-route" else "on",
        }
        if mode == DEVICE_KV:
            env["TANDEM_KV_STORE"] = "device"
        specs = {
            "stage-1": ("1", {}),
            "stage-2": ("2", {}),
            "stage-3": ("3", {}),
            "small": ("1", {"TANDEM_KV_CACHE_BYTES": str(SMALL_CACHE)}),
        }
        ports = {key: free_port() for key in specs}
        commands = {
            key: stage_command(self.bundle, stage, ports[key], env={**env, **extra})
            for key, (stage, extra) in specs.items()
        }
        handles = start_all(commands)
        self.handles += handles.values()
        urls = {key: f"http://127.0.0.1:{port}" for key, port in ports.items()}
        return Stages(urls, httpx.Client(timeout=30))

    def stop(self) -> None:
        for stages in self.sets.values():
            stages.client.close()
        for h in self.handles:
            stop_process(h)


@pytest.fixture(scope="session")
def stage_sets(tiny_bundle: Path) -> Iterator[StageSets]:
    sets = StageSets(tiny_bundle)
    try:
        yield sets
    finally:
        sets.stop()


@pytest.fixture(params=STAGE_PARAMS)
def stages(stage_sets: StageSets, request: pytest.FixtureRequest) -> Stages:
    """Three stage processes (plus a stage-1 with a small KV cache) serving in this test's mode."""
    return stage_sets.get(str(request.param))
