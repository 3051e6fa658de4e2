"""Tokenizer logic without HTTP: load a bundle's `tokenizer.json` (and its chat template, when the
bundle carries one), encode, decode, and stream-decode token by token without ever emitting half a
UTF-8 character. Importable by the gateway.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from functions.bundle import eos_ids

# the manifest's tokenizer fields a chat template is rendered with (the bundle interface)
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token")
REPLACEMENT = "\ufffd"  # what a byte-level decode yields for an incomplete UTF-8 sequence


class TokenizerInputError(ValueError):
    """Input the tokenizer cannot take (e.g. an id outside the vocabulary)."""


class TokenizerCore:
    """A loaded tokenizer plus what serving needs to know about it."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        eos_token_ids: Sequence[int] = (),
        model_id: str | None = None,
        raw_json: bytes | None = None,
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        # the model's chat template (Jinja source) and the special tokens' strings it is rendered
        # with (bos_token, eos_token); the gateway renders it (gateway.chat_template)
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        # every id that ends a sequence (the bundle's manifest lists them; Llama 3 has several)
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        self.model_id = model_id
        self.raw_json = raw_json if raw_json is not None else tokenizer.to_str().encode()

    @property
    def eos_token_id(self) -> int | None:
        """The first EOS id (what older readers know as the one)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        eos_token_ids: Sequence[int] = (),
        model_id: str | None = None,
        chat_template: str | None = None,
        special_tokens: dict[str, str | None] | None = None,
    ) -> TokenizerCore:
        """Load an HF `tokenizers` JSON file."""
        raw = Path(path).read_bytes()
        return cls(
            Tokenizer.from_str(raw.decode()),
            eos_token_ids=eos_token_ids,
            model_id=model_id,
            raw_json=raw,
            chat_template=chat_template,
            special_tokens=special_tokens,
        )

    @classmethod
    def from_bundle(cls, bundle: str | Path) -> TokenizerCore:
        """Load `tokenizer.json` of a model bundle; `manifest.json` is optional."""
        bundle = Path(bundle)
        path = bundle / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in bundle directory {bundle}; export a bundle first")
        info: dict[str, Any] = {}
        model_id = None
        manifest_path = bundle / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            info = manifest.get("tokenizer") or {}
            model_id = (manifest.get("model") or {}).get("id")
        return cls.from_file(
            path,
            eos_token_ids=eos_ids(info),
            model_id=model_id,
            chat_template=_chat_template(bundle, info.get("chat_template")),
            special_tokens={key: info.get(key) for key in SPECIAL_TOKEN_KEYS},
        )

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        self.check_ids(ids)
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def check_ids(self, ids: Sequence[int]) -> None:
        """Raise TokenizerInputError unless every id is in [0, vocab_size)."""
        for i, token_id in enumerate(ids):
            if not 0 <= token_id < self.vocab_size:
                raise TokenizerInputError(
                    f"token id {token_id} at position {i} is outside the vocabulary [0, {self.vocab_size})"
                )

    def decode_step(
        self,
        ids: Sequence[int],
        prefix_offset: int,
        read_offset: int,
        *,
        skip_special_tokens: bool = False,
        final: bool = False,
    ) -> tuple[str, int, int]:
        """One stateless incremental-decoding step over all ids so far.

        `ids[:read_offset]` has already been emitted as text; `ids[prefix_offset:read_offset]` is
        a short context window decoded again so that the new text is cut at a character boundary.
        Returns (new text, new prefix_offset, new read_offset). New text is held back (returned
        as "") while it ends in an incomplete UTF-8 sequence, unless `final`, which flushes.
        Start a stream with both offsets 0, or both equal to the prompt length to skip the prompt.
        """
        if not 0 <= prefix_offset <= read_offset <= len(ids):
            raise TokenizerInputError(
                f"offsets must satisfy 0 <= prefix_offset ({prefix_offset}) <= read_offset "
                f"({read_offset}) <= len(ids) ({len(ids)})"
            )
        window = ids[prefix_offset:]
        self.check_ids(window)
        prefix_text = self.tokenizer.decode(
            list(ids[prefix_offset:read_offset]), skip_special_tokens=skip_special_tokens
        )
        full_text = self.tokenizer.decode(list(window), skip_special_tokens=skip_special_tokens)
        if final or (len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT)):
            return full_text[len(prefix_text) :], read_offset, len(ids)
        return "", prefix_offset, read_offset


def _chat_template(bundle: Path, name: Any) -> str | None:
    """The text of the chat template file the manifest names (None: the model has no template)."""
    if not name:
        return None
    path = bundle / str(name)
    if not path.is_file():
        raise FileNotFoundError(f"the manifest names the chat template {name!r}, which is not in {bundle}")
    return path.read_text(encoding="utf-8")


class IncrementalDecoder:
    """Stream decoder: `push` each generated id, get only newly completed text; `flush` at end."""

    def __init__(self, core: TokenizerCore, *, skip_special_tokens: bool = False) -> None:
        self.core = core
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.core.check_ids([token_id])  # before appending, so a bad id leaves the stream intact
        self.ids.append(token_id)
        return self._step(final=False)

    def flush(self) -> str:
        """Emit whatever is held back, with invalid bytes replaced by U+FFFD."""
        return self._step(final=True)

    def _step(self, *, final: bool) -> str:
        text, self.prefix_offset, self.read_offset = self.core.decode_step(
            self.ids,
            self.prefix_offset,
            self.read_offset,
            skip_special_tokens=self.skip_special_tokens,
            final=final,
        )
        return text
