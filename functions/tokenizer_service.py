"""The tokenizer function's one service object: what each route answers (encode, decode, one
stream-decoding step, count, the raw tokenizer.json, info), with the span, timing and counters around
every operation; the routes (functions.tokenizer) are thin over it. No HTTP framework here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram

from functions import contract
from functions.app import LATENCY_BUCKETS
from functions.errors import BadRequestError, NotReadyError
from functions.telemetry import get_tracer
from functions.tokenizer_core import TokenizerCore, TokenizerInputError

DEFAULT_MAX_TEXT_CHARS = 1_000_000


class EncodeRequest(msgspec.Struct, forbid_unknown_fields=True):
    text: str | list[str]
    add_special_tokens: bool = False


class EncodeResponse(msgspec.Struct):
    # One list for a single text, a list of lists for a batch. (msgspec and the OpenAPI schema
    # cannot express `list[int] | list[list[int]]`: a union may hold one array type only.)
    ids: list[int | list[int]]
    count: int | list[int]


class DecodeRequest(msgspec.Struct, forbid_unknown_fields=True):
    ids: list[int | list[int]]
    skip_special_tokens: bool = False


class DecodeResponse(msgspec.Struct):
    text: str | list[str]


class DecodeStreamRequest(msgspec.Struct, forbid_unknown_fields=True):
    """All ids of the sequence so far plus the offsets the previous step returned."""

    ids: list[int]
    prefix_offset: int = 0
    read_offset: int = 0
    skip_special_tokens: bool = False
    final: bool = False


class DecodeStreamResponse(msgspec.Struct):
    text: str
    prefix_offset: int
    read_offset: int


class CountRequest(msgspec.Struct, forbid_unknown_fields=True):
    text: str


class CountResponse(msgspec.Struct):
    count: int


class ChatTemplateResponse(msgspec.Struct):
    chat_template: str | None  # Jinja source; null when the model has none
    bos_token: str | None
    eos_token: str | None


class InfoResponse(msgspec.Struct):
    model_id: str | None
    vocab_size: int
    eos_token_id: int | None  # the first of eos_token_ids
    eos_token_ids: list[int]


class TokenizerService:
    """The loaded tokenizer (after `load`) and the operations on it."""

    def __init__(self, bundle: str | Path, registry: CollectorRegistry, max_text_chars: int):
        self.bundle, self.max_text_chars = bundle, max_text_chars
        self.loaded: TokenizerCore | None = None
        self.tracer = get_tracer("tandem.tokenizer")
        self.requests = Counter(
            "tandem_tokenizer_requests_total", "Tokenizer operations.", ["op"], registry=registry
        )
        self.seconds = Histogram(
            "tandem_tokenizer_seconds",
            "Tokenizer operation time.",
            ["op"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.tokens = Counter(
            "tandem_tokenizer_tokens_total", "Tokens encoded or decoded.", ["op"], registry=registry
        )

    def load(self) -> None:
        core = TokenizerCore.from_bundle(self.bundle)
        core.encode("Hello, world! warm-up")  # first call builds caches: pay it before ready
        self.loaded = core

    def is_ready(self) -> tuple[bool, str]:
        return (self.loaded is not None, "the tokenizer is still loading")

    def core(self) -> TokenizerCore:
        if self.loaded is None:
            raise NotReadyError("the tokenizer is still loading; retry after GET /v2/health/ready")
        return self.loaded

    @contextlib.contextmanager
    def operation(self, op: str) -> Iterator[dict[str, int]]:
        """Span, timing and counters around one operation; the body sets counts["tokens"]."""
        counts = {"tokens": 0}
        start = time.perf_counter()
        with self.tracer.start_as_current_span(f"tokenizer.{op}") as span:
            try:
                yield counts
            except TokenizerInputError as exc:
                raise BadRequestError(str(exc)) from None
            finally:
                span.set_attribute("tandem.tokens", counts["tokens"])
                self.requests.labels(op).inc()
                self.tokens.labels(op).inc(counts["tokens"])
                self.seconds.labels(op).observe(time.perf_counter() - start)

    def check_texts(self, texts: list[str]) -> None:
        if not texts:
            raise BadRequestError("'text' is an empty list; send at least one string")
        total = sum(len(t) for t in texts)
        if total > self.max_text_chars:
            raise BadRequestError(
                f"text has {total} characters; this tokenizer accepts at most {self.max_text_chars}"
            )

    def encode(self, data: EncodeRequest) -> EncodeResponse:
        batch = isinstance(data.text, list)
        texts = data.text if isinstance(data.text, list) else [data.text]
        self.check_texts(texts)
        with self.operation("encode") as counts:
            ids = self.core().encode_batch(texts, add_special_tokens=data.add_special_tokens)
            counts["tokens"] = sum(len(i) for i in ids)
        if batch:
            return EncodeResponse(ids=list(ids), count=[len(i) for i in ids])
        return EncodeResponse(ids=list(ids[0]), count=len(ids[0]))

    def decode(self, data: DecodeRequest) -> DecodeResponse:
        kinds = {isinstance(i, list) for i in data.ids}
        if len(kinds) > 1:
            raise BadRequestError("'ids' mixes ids and lists of ids; send one or the other")
        skip = data.skip_special_tokens
        with self.operation("decode") as counts:
            if kinds == {True}:
                rows: list[list[int]] = data.ids  # type: ignore[assignment]
                counts["tokens"] = sum(len(r) for r in rows)
                return DecodeResponse(text=[self.core().decode(r, skip_special_tokens=skip) for r in rows])
            flat: list[int] = data.ids  # type: ignore[assignment]
            counts["tokens"] = len(flat)
            return DecodeResponse(self.core().decode(flat, skip_special_tokens=skip))

    def decode_stream(self, data: DecodeStreamRequest) -> DecodeStreamResponse:
        with self.operation("decode_stream") as counts:
            text, prefix, read = self.core().decode_step(
                data.ids,
                data.prefix_offset,
                data.read_offset,
                skip_special_tokens=data.skip_special_tokens,
                final=data.final,
            )
            counts["tokens"] = read - data.read_offset
        return DecodeStreamResponse(text=text, prefix_offset=prefix, read_offset=read)

    def count(self, data: CountRequest) -> CountResponse:
        self.check_texts([data.text])
        with self.operation("count") as counts:
            counts["tokens"] = self.core().count(data.text)
        return CountResponse(count=counts["tokens"])

    def tokenizer_json(self) -> tuple[bytes, dict[str, str]]:
        """The raw tokenizer.json and the header that carries the end-of-sequence ids."""
        tok = self.core()
        return tok.raw_json, contract.eos_header(tok.eos_token_ids)

    def info(self) -> InfoResponse:
        tok = self.core()
        return InfoResponse(
            model_id=tok.model_id,
            vocab_size=tok.vocab_size,
            eos_token_id=tok.eos_token_id,
            eos_token_ids=list(tok.eos_token_ids),
        )

    def chat_template(self) -> ChatTemplateResponse:
        tok = self.core()
        bos, eos = tok.special_tokens.get("bos_token"), tok.special_tokens.get("eos_token")
        return ChatTemplateResponse(chat_template=tok.chat_template, bos_token=bos, eos_token=eos)
