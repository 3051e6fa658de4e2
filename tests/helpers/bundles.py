"""Small real tokenizers for tests: a byte-level BPE trained in-process, saved like a bundle's."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer

EOS = "<|endoftext|>"
# Multi-byte characters on purpose: with a small vocabulary they stay split across tokens.
CORPUS = [
    "Hello, how are you? The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve résumé, déjà vu.",
    "日本語のテキストと中文文本。",
    "Emoji: 😀 🚀 🎉 and more text after them.",
    "Numbers 12345 and symbols #$%&*() are fine too.",
] * 20


def make_tokenizer_bundle(directory: Path, *, manifest: bool = True, model_id: str = "tiny") -> Path:
    """Write tokenizer.json (and manifest.json) into `directory`; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(
        CORPUS,
        vocab_size=400,
        min_frequency=2,
        special_tokens=[EOS],
        show_progress=False,
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    if manifest:
        eos = tokenizer.token_to_id(EOS)
        doc = {"model": {"id": model_id}, "tokenizer": {"eos_token_id": eos, "eos_token_ids": [eos]}}
        (directory / "manifest.json").write_text(json.dumps(doc))
    return directory


def make_fake_bundle(directory: Path, stages: int = 3) -> Path:
    """A bundle in the export's manifest format whose stage files are placeholder bytes (distinct
    per stage, listed with their sha256): for what reads the manifest and files but never runs
    ONNX (fetching, verifying, building an app). Returns the directory."""
    from functions import contract
    from functions.bundle import FORMAT_VERSION

    make_tokenizer_bundle(directory, manifest=False)
    entries = []
    for k in range(1, stages + 1):
        data = f"stage {k} weights ".encode() * 1000
        (directory / f"stage{k}.onnx").write_bytes(data)
        entries.append(
            {
                "index": k - 1,
                "name": contract.stage_name(k),
                "file": f"stage{k}.onnx",
                "layers": [k - 1, k],
                "inputs": [],
                "outputs": [],
                "files": {f"stage{k}.onnx": hashlib.sha256(data).hexdigest()},
            }
        )
    tokenizer = (directory / "tokenizer.json").read_bytes()
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": {"id": "fake"},
        "config": {
            "family": "gpt2",
            "num_layers": stages,
            "hidden_size": 8,
            "num_attention_heads": 2,
            "num_kv_heads": 2,
            "head_dim": 4,
            "max_positions": 64,
            "vocab_size": 400,
        },
        "dtype": "float32",
        "quantization": None,
        "opset": 18,
        "stages": entries,
        "tokenizer": {
            "file": "tokenizer.json",
            "sha256": hashlib.sha256(tokenizer).hexdigest(),
            "eos_token_id": 0,
            "eos_token_ids": [0],
        },
        "versions": {},
        "parity": {},
        "export_args": {},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


def bundle_without_scoring_head(src: Path, dst: Path) -> Path:
    """A copy of an exported bundle as the export made it before the scoring head existed: no
    head file or manifest entry, and a last stage graph without the final hidden states output."""
    import shutil

    import onnx

    from functions import contract
    from functions.bundle import MANIFEST, sha256_file

    shutil.copytree(src, dst)
    doc = json.loads((dst / MANIFEST).read_text())
    doc.pop("head", None)
    last = doc["stages"][-1]
    model = onnx.load(str(dst / last["file"]))
    kept = [o for o in model.graph.output if o.name != contract.FINAL_HIDDEN]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(dst / last["file"]))
    (dst / contract.HEAD_FILE).unlink()
    last["outputs"] = [t for t in last["outputs"] if t["name"] != contract.FINAL_HIDDEN]
    last["files"] = {last["file"]: sha256_file(dst / last["file"])}
    (dst / MANIFEST).write_text(json.dumps(doc, indent=2))
    return dst
