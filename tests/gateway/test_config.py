"""gateway/config.py: the original config.json shape, strict validation naming the offending key,
TANDEM_* environment overrides, and `python -m gateway` refusing a bad file cleanly. (Long because
it is mostly tables of bad configurations, one case per rule.)"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, GatewayConfig, Node, check_served_model, load_config, parse_config
from tests.helpers.procs import REPO_ROOT

NO_ENV: dict[str, str] = {}

# the example of docs/usage.md (Gateway configuration): the original shape (model_name, nodes with
# id/address/model_part) plus a tokenizer and some knobs; here with two replicas of the middle stage
CONFIG: dict[str, Any] = {
    "model_name": "gpt2",
    "tokenizer": {"address": "127.0.0.1:8100"},
    "nodes": [
        {"id": "node1", "address": "127.0.0.1:8101", "model_part": 0},
        {"id": "node2a", "address": "127.0.0.1:8102", "model_part": 1},
        {"id": "node3", "address": "https://stage3.example:8443", "model_part": 2},
        {"id": "node2b", "address": "127.0.0.1:8104", "model_part": 1},
    ],
    "max_running": 32,
    "max_waiting": 256,
    "call_timeout": 60,
    "stage_wait": 30,
}


def config(**changes: Any) -> dict[str, Any]:
    """A copy of CONFIG with top-level keys replaced (None deletes the key)."""
    out = copy.deepcopy(CONFIG)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def with_node(i: int, **changes: Any) -> dict[str, Any]:
    out = config()
    for key, value in changes.items():
        if value is None:
            out["nodes"][i].pop(key, None)
        else:
            out["nodes"][i][key] = value
    return out


def rejected(data: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, NO_ENV if env is None else env)
    return str(info.value)


# ---- the shape that must work ----
def test_readme_shape_parses_with_replicas_grouped_by_model_part() -> None:
    cfg = parse_config(CONFIG, NO_ENV)
    assert isinstance(cfg, GatewayConfig)
    assert cfg.model_name == "gpt2" and cfg.stages == 3
    assert cfg.tokenizer == "127.0.0.1:8100" and cfg.tokenizer_url == "http://127.0.0.1:8100"
    assert [n.id for n in cfg.replicas(0)] == ["node1"]
    assert [n.id for n in cfg.replicas(1)] == ["node2a", "node2b"]  # config order kept
    assert cfg.replicas(2) == [Node("node3", "https://stage3.example:8443", 2)]
    assert cfg.replicas(3) == []
    assert cfg.replicas(1)[0].url == "http://127.0.0.1:8102"
    assert cfg.replicas(2)[0].url == "https://stage3.example:8443"  # a full URL is kept as it is
    assert (cfg.max_running, cfg.max_waiting, cfg.call_timeout, cfg.stage_wait) == (32, 256, 60.0, 30.0)
    assert isinstance(cfg.max_running, int) and isinstance(cfg.call_timeout, float)
    defaults = GatewayConfig("m", "t", ())
    assert cfg.retries == defaults.retries and cfg.health_interval == defaults.health_interval


def test_original_shape_takes_the_default_tokenizer_address() -> None:
    """config.json as the original system writes it (no tokenizer): the compose service
    tokenizer:8100, or port 8100 on the nodes' host when they all share one loopback host."""
    original = {
        "model_name": "gpt2",
        "nodes": [
            {"id": "node1", "address": "node1:8001", "model_part": 0},
            {"id": "node2", "address": "http://node2:8002", "model_part": 1},
            {"id": "node3", "address": "node3:8003", "model_part": 2},
        ],
    }
    cfg = parse_config(original, NO_ENV)
    assert cfg.stages == 3 and [len(cfg.replicas(k)) for k in range(3)] == [1, 1, 1]
    assert cfg.tokenizer_url == "http://tokenizer:8100"
    local = {
        **original,
        "nodes": [{**n, "address": f"127.0.0.1:{8101 + i}"} for i, n in enumerate(original["nodes"])],
    }
    assert parse_config(local, NO_ENV).tokenizer_url == "http://127.0.0.1:8100"
    ipv6 = {**original, "nodes": [{**n, "address": "http://[::1]:8101"} for n in original["nodes"]]}
    assert parse_config(ipv6, NO_ENV).tokenizer_url == "http://[::1]:8100"
    mixed = {**original, "nodes": [*local["nodes"][:2], original["nodes"][2]]}
    assert parse_config(mixed, NO_ENV).tokenizer_url == "http://tokenizer:8100"
    assert parse_config(original, {"TANDEM_TOKENIZER_ADDRESS": "tok:9"}).tokenizer_url == "http://tok:9"
    # the tokenizer may also be given as a bare address string
    assert parse_config({**original, "tokenizer": "tok:1"}, NO_ENV).tokenizer_url == "http://tok:1"


def test_one_stage_model_parses() -> None:
    cfg = parse_config(config(nodes=[{"id": "only", "address": "h:1", "model_part": 0}]), NO_ENV)
    assert cfg.stages == 1 and cfg.replicas(0)[0].id == "only"


# ---- rejected, naming the key ----
@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (config(bogus=1), ["bogus"]),
        (config(Max_Running=3), ["Max_Running"]),
        (config(stages=5), ["stages"]),  # derived, not configurable
        (config(tokenizer={"address": "h:1", "port": 2}), ["port", "tokenizer"]),
        (with_node(1, weight=2), ["weight", "nodes[1]"]),
        (with_node(0, host="x"), ["host", "nodes[0]"]),
    ],
    ids=["top-level", "case-sensitive", "derived-stages", "tokenizer", "node", "node-0"],
)
def test_unknown_keys_are_rejected_by_name(data: dict, fragments: list[str]) -> None:
    msg = rejected(data)
    for fragment in fragments:
        assert fragment in msg, msg


@pytest.mark.parametrize(
    "data",
    [config(model_name=None), config(model_name=""), config(model_name=7), config(model_name=["gpt2"])],
    ids=["missing", "empty", "int", "list"],
)
def test_model_name_is_required(data: dict) -> None:
    assert "model_name" in rejected(data)


@pytest.mark.parametrize(
    "data",
    [
        config(tokenizer={}),
        config(tokenizer={"address": ""}),
        config(tokenizer={"address": 8100}),
        config(tokenizer=8100),
    ],
    ids=["no-address", "empty", "int-address", "int"],
)
def test_a_tokenizer_given_needs_an_address(data: dict) -> None:
    assert "tokenizer" in rejected(data)


@pytest.mark.parametrize(
    ("name", "model_id"),
    [
        ("gpt2", "gpt2"),
        ("gpt2", "openai-community/gpt2"),
        ("openai-community/gpt2", "openai-community/gpt2"),
        ("gpt2", "random-init:gpt2"),
        ("tiny", "random-init:tiny"),
        ("small", "random-init:cfg/small.json"),
        ("distilgpt2", "/models/distilgpt2"),
    ],
)
def test_model_name_names_the_bundle(name: str, model_id: str) -> None:
    check_served_model(name, [model_id, model_id, model_id])


@pytest.mark.parametrize(
    ("name", "ids", "fragment"),
    [
        ("gpt2", ["distilgpt2"], "'distilgpt2'"),
        ("gpt2", ["random-init:tiny"], "short name 'tiny'"),
        ("gpt2-medium", ["openai-community/gpt2"], "model_name 'gpt2-medium'"),
        ("gpt2", ["gpt2", "distilgpt2", "gpt2"], "different bundles"),
    ],
)
def test_model_name_that_does_not_name_the_bundle_is_refused(
    name: str, ids: list[str], fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        check_served_model(name, ids)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "nodes",
    [None, [], {}, "node1", {"id": "a", "address": "h:1", "model_part": 0}],
    ids=["missing", "empty", "object", "string", "single-object"],
)
def test_nodes_must_be_a_non_empty_list(nodes: Any) -> None:
    assert "nodes" in rejected(config(nodes=nodes))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (config(nodes=["node1"]), "nodes[0] must be an object"),
        (with_node(2, id=None), "nodes[2]"),
        (with_node(2, address=None), "nodes[2]"),
        (with_node(1, id=5), "nodes[1]"),
        (with_node(1, address=8102), "nodes[1]"),
        (with_node(3, model_part=None), "nodes[3].model_part"),
        (with_node(3, model_part="1"), "nodes[3].model_part"),
        (with_node(3, model_part=1.0), "nodes[3].model_part"),
        (with_node(0, model_part=-1), "nodes[0].model_part"),
    ],
)
def test_bad_nodes_are_named(data: dict, fragment: str) -> None:
    msg = rejected(data)
    assert fragment in msg, msg


@pytest.mark.parametrize(
    ("parts", "fragment"),
    [
        ([0, 2], "[0, 2]"),
        ([1, 2], "[1, 2]"),
        ([0, 1, 3, 3], "[0, 1, 3]"),
        ([5], "[5]"),
    ],
)
def test_gaps_in_model_part_are_rejected(parts: list[int], fragment: str) -> None:
    nodes = [{"id": f"n{i}", "address": f"h:{8000 + i}", "model_part": p} for i, p in enumerate(parts)]
    msg = rejected(config(nodes=nodes))
    assert "model_part" in msg and fragment in msg, msg


def test_duplicate_node_ids_are_rejected() -> None:
    data = config()
    data["nodes"][3]["id"] = "node2a"
    assert "unique" in rejected(data)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("max_running", -1, "max_running"),
        ("max_running", 0, "max_running must be positive"),
        ("max_prefill_batch", 0, "max_prefill_batch must be positive"),
        ("max_waiting", -5, "max_waiting"),
        ("retries", -1, "retries"),
        ("backoff", -0.05, "backoff"),
        ("stage_wait", -0.5, "stage_wait"),
        ("call_timeout", -60, "call_timeout"),
        ("connect_timeout", -1, "connect_timeout"),
        ("health_interval", -1, "health_interval"),
        ("default_max_tokens", -16, "default_max_tokens"),
        ("max_running", "lots", "max_running must be a number"),
        ("stage_wait", [30], "stage_wait must be a number"),
        ("call_timeout", {"s": 1}, "call_timeout must be a number"),
    ],
)
def test_bad_numbers_are_named(key: str, value: Any, fragment: str) -> None:
    msg = rejected(config(**{key: value}))
    assert fragment in msg, msg


def test_zero_is_allowed_where_it_means_something() -> None:
    cfg = parse_config(config(retries=0, backoff=0, stage_wait=0), NO_ENV)
    assert (cfg.retries, cfg.backoff, cfg.stage_wait) == (0, 0.0, 0.0)


@pytest.mark.parametrize("data", [[], "gpt2", None, 3], ids=["list", "string", "null", "number"])
def test_top_level_must_be_an_object(data: Any) -> None:
    assert "JSON object" in rejected(data)


# ---- values a gateway could not work with ----
@pytest.mark.parametrize(
    ("data", "env"),
    [
        # _number() uses int(value): 2.5 silently becomes 2, 0.9 retries become 0
        (config(max_running=2.5), NO_ENV),
        # bool is an int subclass: true becomes 1 (for a knob and for a model_part)
        (config(max_running=True), NO_ENV),
        (with_node(3, model_part=True), NO_ENV),
        # float("nan") passes the `v < 0` check
        (config(), {"TANDEM_STAGE_WAIT": "nan"}),
        # an empty address yields the URL "http://"
        (with_node(0, address=""), NO_ENV),
        # every request that leaves out max_tokens then fails with "max_tokens must be at least 1, got 0"
        (config(default_max_tokens=0), NO_ENV),
    ],
    ids=[
        "float-for-int",
        "bool-for-int",
        "bool-model-part",
        "nan",
        "empty-address",
        "default-max-tokens-0",
    ],
)
def test_unusable_values_are_rejected(data: dict, env: dict[str, str]) -> None:
    rejected(data, env)


# ---- environment overrides ----
def test_environment_overrides_win_over_the_file() -> None:
    env = {
        "TANDEM_MAX_RUNNING": "3",
        "TANDEM_TOKENIZER_ADDRESS": "http://tok.internal:9000",
        "TANDEM_MODEL_NAME": "gpt2-medium",
        "TANDEM_STAGE_WAIT": "0.5",
        "TANDEM_MAX_WAITING": "7",
        "TANDEM_RETRIES": "0",
        "TANDEM_HEALTH_INTERVAL": "2.5",
        "TANDEM_DEFAULT_MAX_TOKENS": "40",
    }
    cfg = parse_config(CONFIG, env)
    assert cfg.max_running == 3 and isinstance(cfg.max_running, int)
    assert cfg.tokenizer_url == "http://tok.internal:9000"
    assert cfg.model_name == "gpt2-medium"
    assert (cfg.stage_wait, cfg.max_waiting, cfg.retries, cfg.health_interval, cfg.default_max_tokens) == (
        0.5,
        7,
        0,
        2.5,
        40,
    )
    assert cfg.call_timeout == 60.0  # not overridden: the file's value
    assert [n.id for n in cfg.replicas(1)] == ["node2a", "node2b"]


def test_environment_override_supplies_a_missing_tokenizer_and_knob() -> None:
    cfg = parse_config(
        config(tokenizer=None, max_running=None),
        {"TANDEM_TOKENIZER_ADDRESS": "t:1", "TANDEM_MAX_RUNNING": "4"},
    )
    assert cfg.tokenizer == "t:1" and cfg.max_running == 4


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"TANDEM_MAX_RUNNING": "abc"}, "TANDEM_MAX_RUNNING must be an integer, got 'abc'"),
        ({"TANDEM_MAX_RUNNING": "0"}, "TANDEM_MAX_RUNNING must be positive"),
        ({"TANDEM_MAX_RUNNING": "1.5"}, "TANDEM_MAX_RUNNING"),
        ({"TANDEM_STAGE_WAIT": "-1"}, "TANDEM_STAGE_WAIT"),
    ],
)
def test_bad_environment_overrides_are_named(env: dict[str, str], fragment: str) -> None:
    msg = rejected(CONFIG, env)
    assert fragment in msg, msg


def test_an_empty_variable_counts_as_unset() -> None:
    # one rule for every TANDEM_* variable (functions.settings.Env): compose files often pass
    # `${VAR:-}`, which must mean "not given", not "empty"
    env = {"TANDEM_TOKENIZER_ADDRESS": "", "TANDEM_MODEL_NAME": " ", "TANDEM_MAX_RUNNING": ""}
    assert parse_config(CONFIG, env) == parse_config(CONFIG, NO_ENV)


def test_process_environment_is_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_MAX_RUNNING", "5")
    monkeypatch.setenv("TANDEM_MODEL_NAME", "from-env")
    cfg = parse_config(CONFIG)
    assert cfg.max_running == 5 and cfg.model_name == "from-env"
    assert parse_config(CONFIG, NO_ENV).max_running == 32  # an explicit env mapping replaces os.environ


# ---- files ----
def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(CONFIG))
    cfg = load_config(path, {"TANDEM_MAX_RUNNING": "2"})
    assert cfg.stages == 3 and cfg.max_running == 2
    assert load_config(str(path), NO_ENV) == parse_config(CONFIG, NO_ENV)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"model_name": "gpt2",', "is not valid JSON"),
        (b"", "is not valid JSON"),
        (b"model_name: gpt2\n", "is not valid JSON"),
        (b"\xff\xfe{}", "is not valid JSON"),
        (b"[1, 2]", "JSON object"),
    ],
)
def test_invalid_json_file_names_the_file(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "broken-config.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, NO_ENV)
    assert fragment in str(info.value)
    if fragment != "JSON object":
        assert "broken-config.json" in str(info.value)


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    for path in (tmp_path / "nowhere.json", tmp_path):
        with pytest.raises(ConfigError, match="cannot read") as info:
            load_config(path, NO_ENV)
        assert str(path) in str(info.value)


# ---- the command line ----
@pytest.mark.processes  # a Python process per case
@pytest.mark.parametrize(
    ("content", "env", "fragment"),
    [
        ('{"model_name": ', {}, "is not valid JSON"),
        (None, {}, "cannot read"),
        (json.dumps(config(bogus=True)), {}, "bogus"),
        (json.dumps(CONFIG), {"TANDEM_MAX_RUNNING": "many"}, "TANDEM_MAX_RUNNING"),
    ],
    ids=["invalid-json", "missing-file", "unknown-key", "bad-env"],
)
def test_cli_refuses_a_bad_config_in_one_line(
    tmp_path: Path, content: str | None, env: dict[str, str], fragment: str
) -> None:
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(path), "--port", "1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("gateway: error:") and fragment in lines[0], lines
    assert "Traceback" not in r.stderr and r.stdout == ""
