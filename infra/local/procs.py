"""Process supervision for the local launcher: stop signals that never orphan a child, process
groups stopped with a grace period, readiness polling with the failing service's log tail.
Stdlib and httpx only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE_S = 10.0


def shown(path: Path) -> str:
    """A path as printed: relative to the repository when it is inside it."""
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


class Stop(Exception):
    """Raised by the SIGINT/SIGTERM handler so every wait unwinds into one shutdown path."""


class Signals:
    """While `defer` is set (between a Popen and its bookkeeping, where raising would orphan a
    process) a stop signal is only noted; `resume()` raises it then. Blocking the signals instead
    would not do: children inherit the signal mask and would then ignore SIGTERM."""

    defer = False
    pending = False

    @classmethod
    def handle(cls, signum: int, frame: object) -> None:
        if cls.defer:
            cls.pending = True
        else:
            raise Stop(signum)

    @classmethod
    def resume(cls) -> None:
        cls.defer = False
        if cls.pending:
            raise Stop()


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def report_failure(logs: Path, name: str, what: str, lines: int = 30) -> None:
    """Say what went wrong with a service, followed by the tail of its log (in `logs`)."""
    path = logs / f"{name}.log"
    tail = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
    print(f"[stack] {name} {what}; log tail ({shown(path)}):", file=sys.stderr)
    print("\n".join(f"    {line}" for line in tail), file=sys.stderr, flush=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    return True


def _quietly(fn: Any, *args: Any) -> None:
    """Signal or reap a process that may be gone already."""
    try:
        fn(*args)
    except (ProcessLookupError, ChildProcessError):
        pass


def stop_groups(pids: list[int]) -> None:
    """SIGTERM each process group, wait up to STOP_GRACE_S in all, then SIGKILL the rest."""
    for pid in pids:
        _quietly(os.killpg, pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        for p in pids:  # reap our own children, or they stay "alive" as zombies
            _quietly(os.waitpid, p, os.WNOHANG)
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            print(f"[stack] pid {pid} ignored SIGTERM for {STOP_GRACE_S:.0f} s; SIGKILL", file=sys.stderr)
            _quietly(os.killpg, pid, signal.SIGKILL)


def wait_ready(
    procs: dict[str, subprocess.Popen[bytes]], urls: dict[str, str], timeout: float, logs: Path
) -> str | None:
    """Poll readiness; print one line per ready service. Returns the first failed service or None."""
    start, pending = time.monotonic(), dict(urls)
    with httpx.Client(timeout=1.0) as client:
        while pending:
            for name, url in list(pending.items()):
                if procs[name].poll() is not None:
                    report_failure(logs, name, f"exited with {procs[name].returncode} before it was ready")
                    return name
                try:
                    ok = client.get(url).status_code == 200
                except httpx.TransportError:
                    ok = False
                if ok:
                    print(f"[stack] ready  {name:<12} {url}  ({time.monotonic() - start:.1f} s)", flush=True)
                    del pending[name]
            if pending and time.monotonic() - start > timeout:
                for name, url in pending.items():
                    report_failure(logs, name, f"was not ready at {url} after {timeout:.0f} s")
                return next(iter(pending))
            time.sleep(0.2)
    return None


def leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False
