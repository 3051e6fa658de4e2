"""The bundle's tokenizer side: `tokenizer.json` covering every id the model can generate, the
special tokens (every EOS id, BOS), and the chat template, read from a model directory the way
transformers reads them (generation_config.json, config.json, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.errors import ExportError, read_json

TEMPLATE_FILE = "chat_template.jinja"
DEFAULT_TEMPLATE = Path(__file__).parent / "chat_templates" / "default.jinja"
FILLER = "<|tandem_unused_{}|>"  # ids the model has and the tokenizer had not (a padded vocabulary)


@dataclass
class TokenizerInfo:
    tokenizer: Any  # tokenizers.Tokenizer
    eos_ids: list[int]
    bos_id: int | None
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None  # the template's text
    source: str  # where the tokenizer came from, for the log and the manifest
    fillers: int = 0  # ids added so that every id the model can generate decodes

    def entry(self, work: Path, sha256: Any) -> dict[str, Any]:
        """Write tokenizer.json (and the chat template) into `work`; the manifest's tokenizer entry."""
        self.tokenizer.save(str(work / "tokenizer.json"))
        if self.chat_template is not None:
            (work / TEMPLATE_FILE).write_text(self.chat_template)
        with_special = self.tokenizer.encode("a", add_special_tokens=True).ids
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        return {
            "file": "tokenizer.json",
            "sha256": sha256(work / "tokenizer.json"),
            "vocab_size": self.tokenizer.get_vocab_size(),
            "eos_token_id": self.eos_ids[0] if self.eos_ids else None,
            "eos_token_ids": self.eos_ids,
            "eos_token": self.eos_token,
            "bos_token_id": self.bos_id,
            "bos_token": self.bos_token,
            "add_bos_token": bool(self.bos_id is not None and with_special[:1] == [self.bos_id] != plain[:1]),
            "chat_template": TEMPLATE_FILE if self.chat_template is not None else None,
            "chat_template_sha256": sha256(work / TEMPLATE_FILE) if self.chat_template is not None else None,
            "fillers": self.fillers,
            "source": self.source,
        }


def _json(path: Path) -> dict[str, Any]:
    data = read_json(path) if path.is_file() else {}
    return data if isinstance(data, dict) else {}


def _token(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def template_of(model_dir: Path, tok_config: dict[str, Any]) -> str | None:
    """The model's chat template: chat_template.jinja, else tokenizer_config.json's `chat_template`
    (a string, or a list of named templates of which "default" is taken)."""
    if (model_dir / TEMPLATE_FILE).is_file():
        return (model_dir / TEMPLATE_FILE).read_text()
    t = tok_config.get("chat_template")
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    return t if isinstance(t, str) else None


def describe(tokenizer: Any, model_dir: Path, config: Any, source: str) -> TokenizerInfo:
    """The special tokens and template of the model in `model_dir` (config: its transformers config)."""
    tok_config = _json(model_dir / "tokenizer_config.json")
    special = _json(model_dir / "special_tokens_map.json")
    gen = _json(model_dir / "generation_config.json")
    eos_token = _token(tok_config.get("eos_token")) or _token(special.get("eos_token"))
    bos_token = _token(tok_config.get("bos_token")) or _token(special.get("bos_token"))
    eos = _ids(gen.get("eos_token_id")) + _ids(getattr(config, "eos_token_id", None))
    if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
        eos.append(tokenizer.token_to_id(eos_token))
    bos = _ids(gen.get("bos_token_id")) or _ids(getattr(config, "bos_token_id", None))
    if not bos and bos_token is not None and tokenizer.token_to_id(bos_token) is not None:
        bos = [tokenizer.token_to_id(bos_token)]
    return TokenizerInfo(
        tokenizer,
        [i for i in dict.fromkeys(eos) if 0 <= i < int(config.vocab_size)],
        bos[0] if bos else None,
        bos_token,
        eos_token,
        template_of(model_dir, tok_config),
        source,
    )


def cover(info: TokenizerInfo, vocab_size: int) -> None:
    """Make every id below the model's `vocab_size` decodable: a tokenizer smaller than the model's
    vocabulary (an embedding padded to a round size, e.g. Qwen2.5's 151,936 rows for 151,665 tokens)
    gains special filler tokens; one larger than the model is refused (text could encode to ids the
    model cannot embed)."""
    from tokenizers import AddedToken

    have = info.tokenizer.get_vocab_size()
    if have > vocab_size:
        raise ExportError(
            f"the tokenizer has {have} ids but the model's vocab_size is {vocab_size}: text could encode to "
            f"ids the model cannot embed; pass the model's own tokenizer with --tokenizer"
        )
    missing = vocab_size - have
    if missing:
        info.tokenizer.add_special_tokens(
            [AddedToken(FILLER.format(i), special=True, normalized=False) for i in range(have, vocab_size)]
        )
        info.fillers += missing


def set_template(info: TokenizerInfo, path: Path | None, default: bool) -> None:
    """`--chat-template FILE` overrides the model's; a random-init bundle without one gets tandem's
    default (export/chat_templates/default.jinja)."""
    if path is not None:
        if not path.is_file():
            raise ExportError(f"--chat-template {path}: no such file")
        info.chat_template = path.read_text()
    elif default and info.chat_template is None:
        info.chat_template = DEFAULT_TEMPLATE.read_text()
