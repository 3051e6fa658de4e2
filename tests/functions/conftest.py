"""The stage processes every stage-function test module shares: stages 1-3 and a stage 1 with a
small KV cache, started once per way of serving `infer` (the ASGI fast path, and Litestar's route
as it runs when tracing is on), so the whole contract is checked against both. Tests marked
`BOTH_KV_STORES` (tests.helpers.stage_calls) also run against stages that keep the KV cache in
the device store (TANDEM_KV_STORE=device, on the CPU device here)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.helpers.procs import ProcessHandle, free_port, start_stage, stop_process
from tests.helpers.stage_calls import DEVICE_KV, MAX_BODY, SMALL_CACHE, STAGE_PARAMS, Stages


@pytest.fixture(scope="session", params=STAGE_PARAMS)
def stages(tiny_bundle: Path, request: pytest.FixtureRequest) -> Iterator[Stages]:
    """Three stage processes (plus a stage-1 with a small KV cache), started in parallel."""
    store = {"TANDEM_KV_STORE": "device"} if request.param == DEVICE_KV else {}
    specs = {
        "stage-1": ("1", {}),
        "stage-2": ("2", {}),
        "stage-3": ("3", {}),
        "small": ("1", {"TANDEM_KV_CACHE_BYTES": str(SMALL_CACHE)}),
    }

    def start(item: tuple[str, tuple[str, dict[str, str]]]) -> tuple[str, str, ProcessHandle]:
        key, (stage, env) = item
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        handle = start_stage(
            tiny_bundle,
            stage,
            port,
            env={
                "TANDEM_MAX_BODY_BYTES": str(MAX_BODY),
                "TANDEM_LOG_LEVEL": "warning",
                "TANDEM_FAST_PATH": "off" if request.param == "litestar-route" else "on",
                **store,
                **env,
            },
        )
        return key, url, handle

    handles: list[ProcessHandle] = []
    urls: dict[str, str] = {}
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(start, item) for item in specs.items()]
        errors = []
        for f in futures:
            try:
                key, url, handle = f.result()
                urls[key] = url
                handles.append(handle)
            except AssertionError as e:
                errors.append(str(e))
    try:
        assert not errors, "\n".join(errors)
        with httpx.Client(timeout=30) as client:
            yield Stages(urls, client)
    finally:
        for h in handles:
            stop_process(h)
