"""Chat fixtures' building blocks: a byte-level BPE with a chat model's special tokens, the same
tokenizer as transformers sees it (for `apply_chat_template`), and a copy of an exported bundle
that carries a chat template the way the export writes one (the file, its sha256 and the
manifest's tokenizer fields of the agreed bundle interface).

The served chat bundle swaps the tiny model's tokenizer for one trained on the same corpus with
the chat special tokens among its ids and the same vocabulary size, so a rendered prompt's special
tokens reach the model as their own ids (the weights are random: which text an id stands for does
not change what the model computes from ids, which is what the PyTorch reference compares). Its
post-processor adds BOS when asked to add special tokens, as Llama's does: a prompt encoded with
special tokens added would start with two BOS, which the tests would see.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from tokenizers import ByteLevelBPETokenizer, Tokenizer
from tokenizers.processors import TemplateProcessing

from export.source import _corpus
from functions.bundle import MANIFEST, sha256_file

TEMPLATES = Path(__file__).resolve().parents[1] / "gateway" / "chat_templates"
EOS = "<|endoftext|>"
BOS = "<s>"
CHAT_SPECIALS = [EOS, BOS, "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"]
CHAT_SPECIALS += ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]"]
CHAT_SPECIALS += ["<bos>", "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_SPECIALS += ["<|end|>", "<think>", "</think>"]


def chat_tokenizer(vocab_size: int, specials: list[str] = CHAT_SPECIALS, bos: str | None = BOS) -> Tokenizer:
    """A BPE trained on the tiny model's corpus with `specials` first (EOS at id 0, as the tiny
    model's own tokenizer); `bos`, when given, is added in front when special tokens are added."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _corpus(), vocab_size=vocab_size, min_frequency=2, special_tokens=specials, show_progress=False
    )
    tok = Tokenizer.from_str(bpe.to_str())
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok


def hf_tokenizer(tok: Tokenizer, template: str, bos: str | None, eos: str) -> Any:
    """The same tokenizer in transformers, with the chat template set."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.to_str()), bos_token=bos, eos_token=eos
    )
    hf.chat_template = template
    return hf


def chat_bundle(src: Path, dst: Path, template: str | None, *, bos: str | None = BOS) -> Path:
    """A copy of the exported bundle `src` with the chat tokenizer (same vocabulary size) and, when
    given, `template` as its chat_template.jinja, listed in the manifest with its sha256."""
    shutil.copytree(src, dst)
    doc = json.loads((dst / MANIFEST).read_text())
    vocab = int(doc["config"]["vocab_size"])
    tok = chat_tokenizer(vocab, bos=bos)
    assert tok.get_vocab_size() == vocab, (tok.get_vocab_size(), vocab)
    assert tok.token_to_id(EOS) == doc["tokenizer"]["eos_token_id"]
    tok.save(str(dst / "tokenizer.json"))
    info = doc["tokenizer"]
    info["sha256"] = sha256_file(dst / "tokenizer.json")
    info |= {
        "bos_token": bos,
        "eos_token": EOS,
        "bos_token_id": None if bos is None else tok.token_to_id(bos),
    }
    info |= {"eos_token_ids": [info["eos_token_id"]], "add_bos_token": bos is not None, "chat_template": None}
    if template is not None:
        (dst / "chat_template.jinja").write_text(template)
        info["chat_template"] = "chat_template.jinja"
        info["chat_template_sha256"] = sha256_file(dst / "chat_template.jinja")
    (dst / MANIFEST).write_text(json.dumps(doc, indent=2))
    return dst
