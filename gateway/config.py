"""Gateway configuration: the original config.json shape (model_name, nodes with id, address,
model_part), extended with a tokenizer address (optional: `default_tokenizer`) and tuning knobs;
every knob can be overridden by a `TANDEM_*` environment variable. Unknown keys are rejected,
naming the key. `check_served_model` holds model_name against the bundle the stages serve.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from functions.bundle import names_model, short_name
from functions.settings import Env, SettingsError


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and why."""


TOKENIZER_PORT = 8100  # the tokenizer's port when config.json names no tokenizer
TOKENIZER_SERVICE = "tokenizer"  # its host then, unless every node is on one loopback host


@dataclass(frozen=True)
class Node:
    id: str
    address: str  # host:port or a full http(s):// URL
    model_part: int  # 0-based stage index

    @property
    def url(self) -> str:
        return self.address if "://" in self.address else f"http://{self.address}"


@dataclass(frozen=True)
class GatewayConfig:
    model_name: str
    tokenizer: str  # address of the tokenizer function
    nodes: tuple[Node, ...]
    max_running: int = 32  # sequences decoding together
    max_waiting: int = 256  # queued behind them; beyond that, 429
    max_prefill_batch: int = 16  # new sequences admitted per step
    connect_timeout: float = 2.0
    call_timeout: float = 60.0  # one stage call, prefill included (the most any deadline allows)
    # per-call deadline: this many times the stage's slowest recent seconds per position, x the
    # call's positions, at least call_deadline_floor (gateway.deadlines); factor 0 = call_timeout only
    call_deadline_factor: float = 10.0
    call_deadline_floor: float = 5.0
    retries: int = 3  # transport-level retries per stage call, with backoff
    backoff: float = 0.05  # seconds, doubled per retry
    request_timeout: float = 600.0  # a request running longer fails with 504 (its stages are freed)
    stage_wait: float = 10.0  # how long a batch waits for a stage with no ready replica (one wait for all)
    health_interval: float = 1.0
    default_max_tokens: int = 16
    # running sequences spread over this many lanes that advance independently, so that the stages
    # work on different lanes at the same time (gateway.scheduler); 1 = one batch for all
    pipeline_depth: int = 1
    # a prompt longer than this is prefilled this many positions per step (the lane's prompts being
    # chunked share that budget), so that the running sequences keep getting a token per step
    # (gateway.prefill); shorter prompts run whole; 0 = every prompt whole in one step
    prefill_chunk: int = 256
    # benchmark only: seconds added to every stage call, as if the stages were on other machines
    simulated_hop_delay: float = 0.0
    strict_fields: bool = False  # refuse unknown request fields (default: ignore them, named in a header)
    stages: int = field(default=0)  # derived: number of model parts

    @property
    def tokenizer_url(self) -> str:
        return self.tokenizer if "://" in self.tokenizer else f"http://{self.tokenizer}"

    def replicas(self, part: int) -> list[Node]:
        return [n for n in self.nodes if n.model_part == part]


_TUNABLE = {
    f.name: f.type
    for f in fields(GatewayConfig)
    if f.name not in ("model_name", "tokenizer", "nodes", "stages", "strict_fields")
}


_POSITIVE = {
    "max_running",
    "max_prefill_batch",
    "default_max_tokens",
    "connect_timeout",
    "call_timeout",
    "health_interval",
    "request_timeout",
    "pipeline_depth",
}  # zero would make no sense; the rest may be zero


def _number(key: str, value: Any, kind: str, name: str | None = None) -> int | float:
    """A finite number of the right kind (a bool is not a number here, nor 2.5 an integer);
    `name` is how messages call it (the environment variable it came from), default `key`."""
    label = name or key
    if isinstance(value, str):
        try:
            value = int(value) if kind == "int" else float(value)
        except ValueError:
            raise ConfigError(
                f"{label} must be a number{' (an integer)' if kind == 'int' else ''}, got {value!r}"
            ) from None
    ok = isinstance(value, int) if kind == "int" else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        raise ConfigError(
            f"{label} must be a number ({'an integer' if kind == 'int' else 'finite'}), got {value!r}"
        )
    if value < 0 or (key in _POSITIVE and value == 0):
        raise ConfigError(f"{label} must be {'positive' if key in _POSITIVE else '>= 0'}, got {value!r}")
    return value if kind == "int" else float(value)


def parse_config(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> GatewayConfig:
    if not isinstance(data, Mapping):
        raise ConfigError("the configuration must be a JSON object")
    e = Env(os.environ if env is None else env)
    allowed = {"model_name", "tokenizer", "nodes", "strict_fields", *_TUNABLE}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown configuration key(s) {unknown}; allowed: {sorted(allowed)}")
    if not isinstance(data.get("model_name"), str) or not data["model_name"]:
        raise ConfigError("model_name must be a non-empty string")
    tok = _tokenizer_address(data, e)
    nodes = _nodes(data.get("nodes"))
    stages = len({n.model_part for n in nodes})
    model = e.text("TANDEM_MODEL_NAME", data["model_name"])
    tok = tok or default_tokenizer(nodes)
    return GatewayConfig(
        model, tok, tuple(nodes), stages=stages, strict_fields=_strict(data, e), **_tuned(data, e)
    )


def _tokenizer_address(data: Mapping[str, Any], e: Env) -> str | None:
    """`tokenizer.address` (or TANDEM_TOKENIZER_ADDRESS); None when neither says (the default)."""
    tok = data.get("tokenizer")
    if isinstance(tok, Mapping):
        extra = sorted(set(tok) - {"address"})
        if extra:
            raise ConfigError(f"unknown key(s) {extra} in tokenizer; it takes only address")
        tok = tok.get("address")
    tok = e.text("TANDEM_TOKENIZER_ADDRESS", tok)
    if (tok is not None or "tokenizer" in data) and (not isinstance(tok, str) or not tok):
        raise ConfigError('tokenizer must be {"address": "host:port"}, or left out (then tokenizer:8100)')
    return tok


def _node(i: int, n: Any) -> Node:
    if not isinstance(n, Mapping):
        raise ConfigError(f"nodes[{i}] must be an object")
    extra = sorted(set(n) - {"id", "address", "model_part"})
    if extra:
        raise ConfigError(f"unknown key(s) {extra} in nodes[{i}]; allowed: id, address, model_part")
    node_id, address = n.get("id"), n.get("address")
    if not isinstance(node_id, str) or not isinstance(address, str) or not node_id or not address:
        raise ConfigError(f"nodes[{i}] needs a non-empty string id and address")
    part = n.get("model_part")
    if not isinstance(part, int) or isinstance(part, bool) or part < 0:
        raise ConfigError(f"nodes[{i}].model_part must be an integer >= 0")
    return Node(node_id, address, part)


def _nodes(raw: Any) -> list[Node]:
    """The replicas, checked: unique ids, model_part values 0..N-1 without gaps."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("nodes must be a non-empty list of {id, address, model_part}")
    nodes = [_node(i, n) for i, n in enumerate(raw)]
    if len({n.id for n in nodes}) != len(nodes):
        raise ConfigError("node ids must be unique")
    parts = sorted({n.model_part for n in nodes})
    if parts != list(range(len(parts))):
        raise ConfigError(f"model_part values must cover 0..{parts[-1]} without gaps; got {parts}")
    return nodes


def _tuned(data: Mapping[str, Any], e: Env) -> dict[str, Any]:
    """The tunables given, each from TANDEM_<KEY> (which wins) or the file."""
    tuned: dict[str, Any] = {}
    for key, kind in _TUNABLE.items():
        integer = kind in (int, "int")
        var = f"TANDEM_{key.upper()}"
        try:  # the environment wins over the file
            from_env = e.integer(var) if integer else e.number(var)
        except SettingsError as err:
            raise ConfigError(str(err)) from None
        raw = from_env if from_env is not None else data.get(key)
        if raw is not None:
            name = var if from_env is not None else None
            tuned[key] = _number(key, raw, "int" if integer else "float", name)
    return tuned


def _strict(data: Mapping[str, Any], e: Env) -> bool:
    strict = data.get("strict_fields", False)
    if not isinstance(strict, bool):
        raise ConfigError(f"strict_fields must be true or false, got {strict!r}")
    try:
        return e.flag("TANDEM_STRICT_FIELDS", strict)
    except SettingsError as err:
        raise ConfigError(str(err)) from None


def default_tokenizer(nodes: list[Node]) -> str:
    """The tokenizer's address when config.json (the original shape) names none: port 8100 on the
    nodes' host when every node is on the same loopback host (one machine: localhost, 127.x.y.z,
    ::1), else the compose service, `tokenizer:8100`."""
    hosts = {urlsplit(n.url).hostname or "" for n in nodes}
    host = hosts.pop() if len(hosts) == 1 else ""
    if host == "localhost" or _is_loopback_ip(host):
        return f"[{host}]:{TOKENIZER_PORT}" if ":" in host else f"{host}:{TOKENIZER_PORT}"
    return f"{TOKENIZER_SERVICE}:{TOKENIZER_PORT}"


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return False


def check_served_model(model_name: str, model_ids: list[str]) -> None:
    """Raise ConfigError unless every stage serves one bundle and model_name names its model
    (the id in its manifest, or the short name: "gpt2" for "openai-community/gpt2" or
    "random-init:gpt2")."""
    if len(set(model_ids)) > 1:
        raise ConfigError(
            f"the stages serve different bundles (models {sorted(set(model_ids))}); export once"
        )
    if model_ids and not names_model(model_name, model_ids[0]):
        raise ConfigError(
            f"config.json's model_name {model_name!r} does not name the model the stages serve "
            f"({model_ids[0]!r}, short name {short_name(model_ids[0])!r}); fix model_name or the bundle"
        )


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"{p} is not valid JSON: {e}") from None
    return parse_config(data, env)
