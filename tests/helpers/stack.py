"""A whole tandem stack as real processes on 127.0.0.1: tokenizer, stage replicas, gateway, started
in parallel; and the pool of stacks that test modules share (StackPool, the `stacks` fixture)."""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec

from functions import contract
from functions import stage_api as api
from functions.bundle import load_manifest, short_name
from tests.helpers.procs import (
    Command,
    ProcessHandle,
    free_port,
    stage_command,
    start_all,
    start_process,
    start_stage,
    stop_process,
)


@dataclass
class Stack:
    bundle: Path
    config_path: Path
    gateway_url: str = ""
    tokenizer_url: str = ""
    stage_urls: dict[str, list[str]] = field(default_factory=dict)  # "stage-2" -> replica URLs
    procs: dict[str, ProcessHandle] = field(default_factory=dict)  # service id -> process
    # the environment of every stage process (start_stack's env), kept for restarts
    stage_env: Mapping[str, str | None] | None = None

    def start_stage(self, node_id: str, stage: int, port: int) -> None:
        self.procs[node_id] = start_stage(self.bundle, stage, port, env=self.stage_env)

    def held(self) -> dict[str, dict[str, int]]:
        """Sequences held by every stage replica (url -> {sequence id: length})."""
        out = {}
        for name, urls in self.stage_urls.items():
            for url in urls:
                out[url] = held_by(url, name)
        return out

    def config(self) -> dict:
        """The gateway configuration start_stack wrote (a fresh copy to edit)."""
        return json.loads(self.config_path.read_text())

    def start_gateway(
        self, name: str, config: dict, *, env: dict[str, str] | None = None, ready_path: str = "/readyz"
    ) -> str:
        """Another gateway over (some of) these functions, with its own config file next to the
        stack's; stopped with the stack. Waits until `ready_path` answers 200; returns its URL."""
        path = self.config_path.with_name(f"{name}.json")
        path.write_text(json.dumps(config))
        url = f"http://127.0.0.1:{free_port()}"
        self.procs[name] = start_process(
            [sys.executable, "-m", "gateway", "--config", str(path), "--port", url.rsplit(":", 1)[1]],
            f"{url}{ready_path}",
            timeout=60,
            env=env,
        )
        return url

    def stop(self) -> None:
        for h in reversed(list(self.procs.values())):
            stop_process(h)


def start_stack(
    bundle: Path,
    workdir: Path,
    *,
    replicas: tuple[int, ...] = (1, 1, 1),
    gateway_env: Mapping[str, str | None] | None = None,
    env: Mapping[str, str | None] | None = None,
) -> Stack:
    """Tokenizer and `replicas[k]` replicas of stage k + 1, all started at once, then a gateway.
    `env` goes to every process (a None value removes a variable), `gateway_env` to the gateway."""
    cfg_path = workdir / "config.json"
    stack = Stack(bundle, cfg_path, stage_env=env)
    tok_port, gw_port = free_port(), free_port()
    stack.tokenizer_url = f"http://127.0.0.1:{tok_port}"
    stack.gateway_url = f"http://127.0.0.1:{gw_port}"
    tokenizer = [sys.executable, "-m", "functions.tokenizer", "--bundle", str(bundle)]
    tokenizer += ["--port", str(tok_port)]
    commands = {"tokenizer": Command(tokenizer, f"{stack.tokenizer_url}/v2/health/ready", env)}
    nodes = []
    for k, n in enumerate(replicas):
        name = contract.stage_name(k + 1)
        for r in range(n):
            port = free_port()
            node_id = f"{name}-r{r + 1}"
            nodes.append({"id": node_id, "address": f"127.0.0.1:{port}", "model_part": k})
            stack.stage_urls.setdefault(name, []).append(f"http://127.0.0.1:{port}")
            commands[node_id] = stage_command(bundle, k + 1, port, env=env)
    config = {
        # what clients call the bundle's model (the gateway checks it against what the stages serve)
        "model_name": short_name(load_manifest(bundle).model["id"]),
        "tokenizer": {"address": f"127.0.0.1:{tok_port}"},
        "nodes": nodes,
        "health_interval": 0.2,
    }
    cfg_path.write_text(json.dumps(config))
    gateway = [sys.executable, "-m", "gateway", "--config", str(cfg_path), "--port", str(gw_port)]
    gateway_vars = {**(env or {}), **(gateway_env or {})}
    stack.procs.update(start_all(commands))
    # the gateway once every function is ready, so that its first health round finds every replica
    # up (its /readyz needs only one per stage)
    try:
        stack.procs["gateway"] = start_process(
            gateway, f"{stack.gateway_url}/readyz", timeout=60, env=gateway_vars
        )
    except AssertionError:
        stack.stop()
        raise
    return stack


def hermetic_env() -> dict[str, str | None]:
    """Removes the caller's OTEL_* and TANDEM_* variables: a shared stack runs on its defaults
    (tracing off), whatever the shell that started pytest had set."""
    return {k: None for k in os.environ if k.startswith(("OTEL_", "TANDEM_"))}


class StackPool:
    """Running stacks shared by every test module that only reads them (a session fixture, one
    pool per pytest-xdist worker): one stack per (bundle, replicas, gateway env), started on first
    use and stopped at the end of the run. A stack whose process died (a test must not stop one:
    a test that changes a stack starts its own with start_stack) is started again for the next
    user."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.stacks: dict[tuple[object, ...], Stack] = {}

    def get(
        self,
        bundle: Path,
        *,
        replicas: tuple[int, ...] = (1, 1, 1),
        gateway_env: Mapping[str, str] | None = None,
    ) -> Stack:
        key = (str(bundle), tuple(replicas), tuple(sorted((gateway_env or {}).items())))
        stack = self.stacks.get(key)
        if stack is not None and all(h.process.poll() is None for h in stack.procs.values()):
            return stack
        if stack is not None:
            stack.stop()
        workdir = self.workdir / f"stack-{len(self.stacks)}-{secrets.token_hex(3)}"
        workdir.mkdir(parents=True)
        stack = start_stack(bundle, workdir, replicas=replicas, gateway_env=gateway_env, env=hermetic_env())
        self.stacks[key] = stack
        return stack

    def stop(self) -> None:
        for stack in self.stacks.values():
            stack.stop()
        self.stacks.clear()


def held_by(url: str, stage: str) -> dict[str, int]:
    """Sequence id -> positions held, as one stage replica lists them."""
    r = httpx.get(url + api.sequences_path(stage), timeout=5)
    r.raise_for_status()
    return msgspec.json.decode(r.content, type=api.SequencesAnswer).sequences
