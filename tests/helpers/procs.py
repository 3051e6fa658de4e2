"""Start a service as a real process on 127.0.0.1, wait until it is ready, stop it gracefully.

stderr goes to a temp file whose tail is put in every failure message, so a crash explains itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ProcessHandle:
    process: subprocess.Popen[bytes]
    args: list[str]
    stderr_path: Path
    stderr_file: IO[bytes]

    def stderr_tail(self, lines: int = 40) -> str:
        self.stderr_file.flush()
        text = self.stderr_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` until it is true; fail the test after `timeout` seconds, saying `what`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def free_port() -> int:
    """A port that was free a moment ago (the usual small race is acceptable in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_process(
    args: list[str],
    ready_url: str,
    *,
    timeout: float = 30.0,
    env: dict[str, str] | None = None,
) -> ProcessHandle:
    """Start `args` in the repository root and poll `ready_url` until it answers 200."""
    stderr_file = tempfile.NamedTemporaryFile(prefix="tandem-proc-", suffix=".log", delete=False)
    process = subprocess.Popen(
        args,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=stderr_file,
        stderr=subprocess.STDOUT,
    )
    handle = ProcessHandle(process, args, Path(stderr_file.name), stderr_file)
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _close(handle)
            raise AssertionError(
                f"{' '.join(args)} exited with {process.returncode} before it was ready; "
                f"output tail:\n{handle.stderr_tail()}"
            )
        try:
            response = httpx.get(ready_url, timeout=1.0)
            if response.status_code == 200:
                return handle
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.1)
    tail = handle.stderr_tail()
    stop_process(handle)
    raise AssertionError(
        f"{' '.join(args)} was not ready at {ready_url} after {timeout} s (last: {last}); "
        f"output tail:\n{tail}"
    )


def stop_process(handle: ProcessHandle, *, timeout: float = 10.0) -> int:
    """SIGTERM, wait up to `timeout`, SIGKILL if needed; returns the exit code."""
    process = handle.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _close(handle)
    return process.returncode


def _close(handle: ProcessHandle) -> None:
    handle.stderr_file.close()


def start_stage(
    bundle: Path, stage: int | str, port: int, *, env: dict[str, str] | None = None, threads: int | None = 1
) -> ProcessHandle:
    """`python -m functions.stage` for one stage of `bundle` on 127.0.0.1:`port`, once ready."""
    args = [sys.executable, "-m", "functions.stage", "--bundle", str(bundle), "--stage", str(stage)]
    args += ["--port", str(port)] + (["--threads", str(threads)] if threads else [])
    return start_process(args, f"http://127.0.0.1:{port}/v2/health/ready", timeout=60, env=env)
