"""The GPU check: one command that shows the stage functions on an NVIDIA GPU, in one 10-minute run.

    python -m tests.gpu.check [--size gpt2|tiny] [--work DIR] [--concurrency 1,8,32] [--new-tokens 64]

1. Finds the GPU (the CUDA driver) and ONNX Runtime's CUDA provider; without either it prints one
   line `gpu check: skipped: <reason>` and exits 0 (tests/gpu/test_check.py checks that line).
2. Writes a GPT-2 with seeded random weights (124M by default) and exports it into a bundle (the
   export's own parity check runs on the CPU).
3. Runs that parity check again with the CUDA provider: the chained stages against PyTorch,
   prefill + 20 greedy steps, batch 1 and a left-padded batch of 4; it fails when max |logit
   difference| > 1e-3 or a greedy token differs (the export's fp32 rule).
4. Starts the stack with TANDEM_PROVIDER=cuda (the stages keep their KV cache on the GPU: the
   device store) and runs the benchmark's stack variant at each concurrency, through the
   gateway's streaming API (tests/benchmarks/bench.py), printing its table.

Every line it prints starts with `gpu check:`, the device name and the providers in use first.
Exit status: 0 passed or skipped, 1 a check failed. On the lent GPU machine, run it through
tests/gpu/device_run.sh (docs/gpu.md), which installs the wheels that travelled first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from functions.device import CUDA_EP, CUDA_INSTALL_HINT, gpu_name, preload_cuda_libraries

REPO_ROOT = Path(__file__).resolve().parents[2]
FP32_MAX_DIFF = 1e-3  # as the export's parity rule (export/build.py)


def say(message: str) -> None:
    print(f"gpu check: {message}", flush=True)


def skip_reason() -> str | None:
    """Why this machine cannot run the check, in one line; None when it can."""
    name = gpu_name()
    if name is None:
        return "no NVIDIA GPU (the CUDA driver libcuda.so.1 is absent or finds no device)"
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    if CUDA_EP not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no {CUDA_EP} on {name}; {CUDA_INSTALL_HINT}"
    return None


def export_bundle(size: str, work: Path) -> tuple[Path, Path]:
    """A seeded random GPT-2 as a local HF directory, and its bundle (exported with `python -m
    export --model DIR`, the real from_pretrained path)."""
    from export.random_init import make_random_model

    hf_dir, bundle = work / f"{size}-hf", work / f"{size}-bundle"
    if not (hf_dir / "config.json").is_file():
        make_random_model(size, hf_dir, None, seed=0)
    if not (bundle / "manifest.json").is_file():
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "export", "--model", str(hf_dir), "--out", str(bundle)]
        r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"gpu check: FAILED: the export failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        say(f"exported {size} in {time.perf_counter() - t0:.1f} s (CPU parity passed) -> {bundle}")
    return hf_dir, bundle


def cuda_parity(hf_dir: Path, bundle: Path) -> bool:
    from transformers import AutoModelForCausalLM

    from export.families import parts_of
    from export.verify import links_of, verify
    from functions.bundle import load_manifest

    manifest = load_manifest(bundle)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    links = links_of(bundle, manifest.stages)
    parity = verify(model, links, parts_of(model).shape, providers=[CUDA_EP, "CPUExecutionProvider"])
    diff, top1 = parity["max_abs_logit_diff"], parity["top1_agreement"]
    ok = diff <= FP32_MAX_DIFF and top1 == 1.0
    say(
        f"parity with {CUDA_EP}: max |logit diff| {diff:.3g}, top-1 agreement {top1:.1%}: {'ok' if ok else 'FAILED'}"
    )
    return ok


def benchmark(bundle: Path, concurrency: str, new_tokens: int, work: Path) -> bool:
    out = work / "bench.json"
    cmd = [sys.executable, "-m", "tests.benchmarks.bench", "--bundle", str(bundle), "--variants", "stack"]
    cmd += ["--concurrency", concurrency, "--new-tokens", str(new_tokens), "--rounds", "1"]
    cmd += ["--skip-startup", "--out", str(out)]
    env = {**os.environ, "TANDEM_PROVIDER": "cuda", "PYTHONUNBUFFERED": "1"}
    say(f"benchmark: {' '.join(cmd[1:])} (TANDEM_PROVIDER=cuda)")
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, text=True)
    say(f"benchmark exit status {r.returncode}; figures in {out}")
    return r.returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.gpu.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("gpt2", "tiny"), default="gpt2", help="GPT-2 124M (default) or tiny")
    p.add_argument(
        "--work", type=Path, default=None, help="where the model and bundle go (default a temp dir)"
    )
    p.add_argument("--concurrency", default="1,8,32", help="benchmark streams (default 1,8,32)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--skip-bench", action="store_true", help="parity only")
    args = p.parse_args(argv)
    reason = skip_reason()
    if reason is not None:
        say(f"skipped: {reason}")
        return 0
    import onnxruntime as ort

    preload_cuda_libraries()
    say(f"device {gpu_name()}, onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
    work = args.work or Path(tempfile.mkdtemp(prefix="tandem-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, bundle = export_bundle(args.size, work)
    ok = cuda_parity(hf_dir, bundle)
    if ok and not args.skip_bench:
        ok = benchmark(bundle, args.concurrency, args.new_tokens, work)
    say("passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
