"""The bundle's tokenizer entry from a model directory, read the way transformers reads it: every EOS
id (generation_config.json's list first, as Llama 3 has several), BOS, and the chat template
(chat_template.jinja over tokenizer_config.json's key; a list of named templates gives "default")."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from export.errors import ExportError
from export.source import train_tokenizer
from export.tokenizer_meta import DEFAULT_TEMPLATE, TEMPLATE_FILE, describe, set_template
from functions.bundle import sha256_file

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return train_tokenizer(300, SPECIALS)


def _dir(tmp_path: Path, **files: object) -> Path:
    for name, doc in files.items():
        path = tmp_path / name.replace("__", ".")
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return tmp_path


def test_llama3_eos_list_bos_and_template(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = _dir(
        tmp_path,
        generation_config__json={"bos_token_id": 0, "eos_token_id": [1, 3, 2]},
        tokenizer_config__json={
            "bos_token": "<|begin_of_text|>",
            "eos_token": {"content": "<|eot_id|>", "special": True},
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        },
    )
    info = describe(
        tok, d, SimpleNamespace(eos_token_id=1, bos_token_id=0, vocab_size=tok.get_vocab_size()), "t"
    )
    assert info.eos_ids == [1, 3, 2] and info.bos_id == 0  # config's 1 and the token's 2 already listed
    assert (info.bos_token, info.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert info.chat_template is not None and info.chat_template.startswith("{{ bos_token }}")
    entry = info.entry(tmp_path, sha256_file)
    assert entry["eos_token_id"] == 1 and entry["eos_token_ids"] == [1, 3, 2]
    assert (
        entry["chat_template"] == TEMPLATE_FILE
        and (tmp_path / TEMPLATE_FILE).read_text() == info.chat_template
    )
    assert entry["chat_template_sha256"] == sha256_file(tmp_path / TEMPLATE_FILE)
    assert entry["add_bos_token"] is False  # a trained BPE has no post-processor adding it


def test_template_file_wins_and_named_templates(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = SimpleNamespace(eos_token_id=None, bos_token_id=None, vocab_size=tok.get_vocab_size())
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    d = _dir(tmp_path, tokenizer_config__json={"chat_template": named})
    assert describe(tok, d, cfg, "t").chat_template == "D"
    (d / TEMPLATE_FILE).write_text("FILE")
    info = describe(tok, d, cfg, "t")
    assert info.chat_template == "FILE" and info.eos_ids == [] and info.bos_id is None
    given = tmp_path / "mine.jinja"
    given.write_text("MINE")
    set_template(info, given, default=True)
    assert info.chat_template == "MINE"
    with pytest.raises(ExportError, match="no such file"):
        set_template(info, tmp_path / "missing.jinja", default=False)


def test_random_init_bundles_get_the_default_template(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = SimpleNamespace(eos_token_id=2, bos_token_id=None, vocab_size=tok.get_vocab_size())
    info = describe(tok, _dir(tmp_path), cfg, "t")
    assert info.chat_template is None
    set_template(info, None, default=False)
    assert info.chat_template is None  # a model without a template gets none
    set_template(info, None, default=True)
    text = DEFAULT_TEMPLATE.read_text()
    assert info.chat_template == text and "<|im_start|>" in text and "add_generation_prompt" in text
