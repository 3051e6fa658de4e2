"""Small real tokenizers for tests: a byte-level BPE trained in-process, saved like a bundle's."""

from __future__ import annotations

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
        doc = {"model": {"id": model_id}, "tokenizer": {"eos_token_id": eos}}
        (directory / "manifest.json").write_text(json.dumps(doc))
    return directory
