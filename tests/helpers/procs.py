"""Start a service as a real process on 127.0.0.1, wait until it is ready, stop it gracefully.

stderr goes to a temp file whose tail is put in every failure message, so a crash explains itself.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
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


def read_until(stream: IO[str] | None, done: Callable[[str], bool], timeout: float) -> str:
    """What a process printed on `stream`, up to and including the first line `done` accepts; less
    when the stream ends or `timeout` seconds pass (checked between lines)."""
    assert stream is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            break
        lines.append(line)
        if done(line):
            break
    return "".join(lines)


def free_port() -> int:
    """A port that was free a moment ago (the usual small race is acceptable in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(args: list[str], *, env: Mapping[str, str | None] | None = None) -> ProcessHandle:
    """Start `args` in the repository root, output to a temp file; `env` adds variables to this
    process's environment (a None value removes one). Does not wait: see wait_ready."""
    stderr_file = tempfile.NamedTemporaryFile(prefix="tandem-proc-", suffix=".log", delete=False)
    merged: dict[str, str | None] = {**os.environ, **(env or {})}
    process = subprocess.Popen(
        args,
        cwd=REPO_ROOT,
        env={k: v for k, v in merged.items() if v is not None},
        stdin=subprocess.DEVNULL,
        stdout=stderr_file,
        stderr=subprocess.STDOUT,
    )
    return ProcessHandle(process, args, Path(stderr_file.name), stderr_file)


def wait_ready(handle: ProcessHandle, ready_url: str, timeout: float = 30.0) -> ProcessHandle:
    """Poll `ready_url` until it answers 200; a process that exits first, or is not ready within
    `timeout`, is stopped and fails with its output's tail."""
    process, args = handle.process, handle.args
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
        time.sleep(0.05)
    tail = handle.stderr_tail()
    stop_process(handle)
    raise AssertionError(
        f"{' '.join(args)} was not ready at {ready_url} after {timeout} s (last: {last}); "
        f"output tail:\n{tail}"
    )


def port_run(n: int) -> list[int]:
    """n consecutive ports, each free a moment ago, below the kernel's ephemeral range (from 32768),
    where no client connection can take one as its source port before the launcher binds it."""
    rng = random.Random()
    while True:
        base = rng.randrange(20000, 32000 - n)
        try:
            for port in range(base, base + n):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(base, base + n))


def start_process(
    args: list[str],
    ready_url: str,
    *,
    timeout: float = 30.0,
    env: Mapping[str, str | None] | None = None,
) -> ProcessHandle:
    """Start `args` in the repository root and poll `ready_url` until it answers 200."""
    return wait_ready(launch(args, env=env), ready_url, timeout)


@dataclass
class Command:
    """A process to start and the URL that answers 200 once it is ready; `env` as for launch()."""

    args: list[str]
    ready_url: str
    env: Mapping[str, str | None] | None = None


def start_all(commands: Mapping[str, Command], *, timeout: float = 60.0) -> dict[str, ProcessHandle]:
    """Start every command at once and wait until all are ready (process start is mostly imports:
    in parallel, a stack is up in the time of its slowest process). If one fails, the others are
    stopped and the failure names it."""
    handles = {name: launch(c.args, env=c.env) for name, c in commands.items()}
    errors: list[str] = []
    with ThreadPoolExecutor(max(1, len(handles))) as pool:
        waits = {n: pool.submit(wait_ready, h, commands[n].ready_url, timeout) for n, h in handles.items()}
        for name, future in waits.items():
            try:
                future.result()
            except AssertionError as e:
                errors.append(f"{name}: {e}")
    if errors:
        for h in handles.values():
            stop_process(h)
        raise AssertionError("\n".join(errors))
    return handles


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


def stage_command(
    bundle: Path,
    stage: int | str,
    port: int,
    *,
    env: Mapping[str, str | None] | None = None,
    threads: int | None = 1,
) -> Command:
    """`python -m functions.stage` for one stage of `bundle` on 127.0.0.1:`port`."""
    args = [sys.executable, "-m", "functions.stage", "--bundle", str(bundle), "--stage", str(stage)]
    args += ["--port", str(port)] + (["--threads", str(threads)] if threads else [])
    return Command(args, f"http://127.0.0.1:{port}/v2/health/ready", env)


def start_stage(
    bundle: Path,
    stage: int | str,
    port: int,
    *,
    env: Mapping[str, str | None] | None = None,
    threads: int | None = 1,
) -> ProcessHandle:
    """One stage process of `bundle` on 127.0.0.1:`port`, once ready."""
    c = stage_command(bundle, stage, port, env=env, threads=threads)
    return start_process(c.args, c.ready_url, timeout=60, env=c.env)
