"""A whole tandem stack as real processes on 127.0.0.1: tokenizer, stage replicas, gateway."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec

from functions import contract
from functions import stage_api as api
from functions.bundle import load_manifest, short_name
from tests.helpers.procs import ProcessHandle, free_port, start_process, start_stage, stop_process


@dataclass
class Stack:
    bundle: Path
    config_path: Path
    gateway_url: str = ""
    tokenizer_url: str = ""
    stage_urls: dict[str, list[str]] = field(default_factory=dict)  # "stage-2" -> replica URLs
    procs: dict[str, ProcessHandle] = field(default_factory=dict)  # service id -> process
    stage_env: dict[str, str] | None = None  # extra environment of every stage process

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
    gateway_env: dict[str, str] | None = None,
    stage_env: dict[str, str] | None = None,
) -> Stack:
    cfg_path = workdir / "config.json"
    stack = Stack(bundle, cfg_path, stage_env=stage_env)
    tok_port = free_port()
    stack.tokenizer_url = f"http://127.0.0.1:{tok_port}"
    stack.procs["tokenizer"] = start_process(
        [sys.executable, "-m", "functions.tokenizer", "--bundle", str(bundle), "--port", str(tok_port)],
        f"{stack.tokenizer_url}/v2/health/ready",
        timeout=60,
    )
    nodes = []
    for k, n in enumerate(replicas):
        name = contract.stage_name(k + 1)
        for r in range(n):
            port = free_port()
            node_id = f"{name}-r{r + 1}"
            nodes.append({"id": node_id, "address": f"127.0.0.1:{port}", "model_part": k})
            stack.stage_urls.setdefault(name, []).append(f"http://127.0.0.1:{port}")
            stack.start_stage(node_id, k + 1, port)
    config = {
        # what clients call the bundle's model (the gateway checks it against what the stages serve)
        "model_name": short_name(load_manifest(bundle).model["id"]),
        "tokenizer": {"address": f"127.0.0.1:{tok_port}"},
        "nodes": nodes,
        "health_interval": 0.2,
    }
    cfg_path.write_text(json.dumps(config))
    stack.gateway_url = stack.start_gateway("gateway", config, env=gateway_env)
    return stack


def held_by(url: str, stage: str) -> dict[str, int]:
    """Sequence id -> positions held, as one stage replica lists them."""
    r = httpx.get(url + api.sequences_path(stage), timeout=5)
    r.raise_for_status()
    return msgspec.json.decode(r.content, type=api.SequencesAnswer).sequences
