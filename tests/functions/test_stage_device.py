"""The device a stage computes on: a stage asked for CUDA where ONNX Runtime has none exits at
start with one line saying why (never a silent CPU fallback, never a stage that stays up and
never becomes ready); the providers and the KV store in use are in the model metadata and the
metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from functions.bundle import load_manifest
from functions.device import CUDA_EP, ProviderError, require_in_session
from functions.stage_state import Loader, StageSettings
from tests.helpers.procs import REPO_ROOT, free_port
from tests.helpers.stage_calls import BOTH_KV_STORES, DEVICE_KV, Stages

pytestmark = pytest.mark.processes

needs_cpu_onnxruntime = pytest.mark.skipif(
    __import__("onnxruntime").get_available_providers().count(CUDA_EP) > 0,
    reason="this onnxruntime has the CUDA provider (tests/gpu covers that machine)",
)


def _run_stage(
    tiny_bundle: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "functions.stage", "--bundle", str(tiny_bundle), "--stage", "2"]
    cmd += ["--port", str(free_port()), *args]
    return subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}
    )


@needs_cpu_onnxruntime
@pytest.mark.parametrize("how", ["flag", "env"])
def test_cuda_without_the_cuda_provider_exits_at_start_with_one_line(tiny_bundle: Path, how: str) -> None:
    r = (
        _run_stage(tiny_bundle, "--provider", "cuda")
        if how == "flag"
        else _run_stage(tiny_bundle, env={"TANDEM_PROVIDER": "cuda"})
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("stage: error: --provider cuda:"), lines[0]
    assert CUDA_EP in lines[0] and "requirements/cuda.txt" in lines[0]


@needs_cpu_onnxruntime
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_a_session_that_falls_back_to_the_cpu_is_fatal(tiny_bundle: Path) -> None:
    """The check after the session is built: ONNX Runtime asked for CUDA and CPU silently runs
    on the CPU alone; the loader calls on_fatal (the process exits) instead of serving."""
    reasons: list[str] = []
    settings = StageSettings.from_env(env={}, bundle=tiny_bundle, stage="2", provider="cuda", threads=1)
    loader = Loader(settings, load_manifest(tiny_bundle), on_fatal=reasons.append)
    loader.run()
    assert loader.engine is None and not loader.ready()[0]
    assert len(reasons) == 1 and "CPUExecutionProvider only" in reasons[0], reasons
    assert "\n" not in reasons[0]


def test_the_session_check_passes_when_cuda_is_in_use() -> None:
    require_in_session("cuda", [CUDA_EP, "CPUExecutionProvider"])
    require_in_session("cpu", ["CPUExecutionProvider"])
    with pytest.raises(ProviderError, match="CUDA or cuDNN"):
        require_in_session("cuda", ["CPUExecutionProvider"])


def test_a_bad_kv_store_setting_is_refused_at_start(tiny_bundle: Path) -> None:
    r = _run_stage(tiny_bundle, env={"TANDEM_KV_STORE": "gpu"})
    assert r.returncode == 2
    assert "TANDEM_KV_STORE must be one of auto, host, device, got 'gpu'" in r.stderr, r.stderr


@BOTH_KV_STORES
def test_metadata_and_metrics_name_the_providers_and_the_store(
    stages: Stages, request: pytest.FixtureRequest
) -> None:
    store = "device" if request.node.callspec.params["stages"] == DEVICE_KV else "host"
    url = stages.urls["stage-2"]
    meta = stages.client.get(f"{url}/v2/models/stage-2").json()
    assert meta["parameters"]["providers"] == ["CPUExecutionProvider"]
    assert meta["parameters"]["kv_store"] == store
    metrics = stages.client.get(f"{url}/metrics").text
    info = (
        f'tandem_stage_runtime_info{{kv_store="{store}",provider="cpu",'
        'providers="CPUExecutionProvider",stage="stage-2"} 1.0'
    )
    assert info in metrics, [m for m in metrics.splitlines() if "runtime" in m]
    assert "tandem_gpu_memory" not in metrics  # on the CPU there is none to report
