"""The tokenizer function: encode / decode / stream-decode / count over HTTP, on the shared factory.

Run: `python -m functions.tokenizer --bundle DIR [--port 8100] [--host 127.0.0.1]`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
from litestar import Litestar, Response, get, post
from litestar.params import JSONBody
from prometheus_client import CollectorRegistry, Counter, Histogram

from functions import contract
from functions.app import LATENCY_BUCKETS, create_function_app
from functions.bundle import BundleError
from functions.bundle_fetch import TOKENIZER_ROLE, prepare_bundle
from functions.errors import BadRequestError, NotReadyError
from functions.fastpath import ASGIApp
from functions.process import serve
from functions.settings import FunctionSettings, SettingsError
from functions.telemetry import get_tracer
from functions.tokenizer_core import TokenizerCore, TokenizerInputError

SERVICE_NAME = "tokenizer"
DEFAULT_PORT = 8100
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


class InfoResponse(msgspec.Struct):
    model_id: str | None
    vocab_size: int
    eos_token_id: int | None  # the first of eos_token_ids
    eos_token_ids: list[int]


def create_tokenizer_app(
    bundle: str | Path,
    settings: FunctionSettings,
    *,
    registry: CollectorRegistry | None = None,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
) -> ASGIApp:
    """The tokenizer app; the tokenizer loads in the lifespan, readiness follows a warm-up."""
    registry = registry if registry is not None else CollectorRegistry()
    loaded: dict[str, TokenizerCore] = {}
    tracer = get_tracer("tandem.tokenizer")
    requests = Counter("tandem_tokenizer_requests_total", "Tokenizer operations.", ["op"], registry=registry)
    seconds = Histogram(
        "tandem_tokenizer_seconds",
        "Tokenizer operation time.",
        ["op"],
        registry=registry,
        buckets=LATENCY_BUCKETS,
    )
    tokens = Counter("tandem_tokenizer_tokens_total", "Tokens encoded or decoded.", ["op"], registry=registry)

    @contextlib.asynccontextmanager
    async def load(_app: Litestar) -> AsyncIterator[None]:
        core = TokenizerCore.from_bundle(bundle)
        core.encode("Hello, world! warm-up")  # first call builds caches: pay it before ready
        loaded["core"] = core
        yield

    def is_ready() -> tuple[bool, str]:
        return ("core" in loaded, "the tokenizer is still loading")

    def core() -> TokenizerCore:
        if "core" not in loaded:
            raise NotReadyError("the tokenizer is still loading; retry after GET /v2/health/ready")
        return loaded["core"]

    @contextlib.contextmanager
    def operation(op: str) -> Iterator[dict[str, int]]:
        """Span, timing and counters around one operation; the body sets counts["tokens"]."""
        counts = {"tokens": 0}
        start = time.perf_counter()
        with tracer.start_as_current_span(f"tokenizer.{op}") as span:
            try:
                yield counts
            except TokenizerInputError as exc:
                raise BadRequestError(str(exc)) from None
            finally:
                span.set_attribute("tandem.tokens", counts["tokens"])
                requests.labels(op).inc()
                tokens.labels(op).inc(counts["tokens"])
                seconds.labels(op).observe(time.perf_counter() - start)

    def check_texts(texts: list[str]) -> None:
        if not texts:
            raise BadRequestError("'text' is an empty list; send at least one string")
        total = sum(len(t) for t in texts)
        if total > max_text_chars:
            raise BadRequestError(
                f"text has {total} characters; this tokenizer accepts at most {max_text_chars}"
            )

    # In a worker thread: a few megabyte-sized prompts would otherwise hold the event loop (and every
    # other request, health checks included) for seconds; the Rust tokenizer releases the GIL.
    @post("/v1/encode", status_code=200, sync_to_thread=True, tags=["tokenizer"])
    def encode(data: JSONBody[EncodeRequest]) -> EncodeResponse:
        """Text (or a batch of texts) to token ids."""
        batch = isinstance(data.text, list)
        texts = data.text if isinstance(data.text, list) else [data.text]
        check_texts(texts)
        with operation("encode") as counts:
            ids = core().encode_batch(texts, add_special_tokens=data.add_special_tokens)
            counts["tokens"] = sum(len(i) for i in ids)
        if batch:
            return EncodeResponse(ids=list(ids), count=[len(i) for i in ids])
        return EncodeResponse(ids=list(ids[0]), count=len(ids[0]))

    @post("/v1/decode", status_code=200, sync_to_thread=False, tags=["tokenizer"])
    def decode(data: JSONBody[DecodeRequest]) -> DecodeResponse:
        """Token ids (or a batch of id lists) to text."""
        kinds = {isinstance(i, list) for i in data.ids}
        if len(kinds) > 1:
            raise BadRequestError("'ids' mixes ids and lists of ids; send one or the other")
        with operation("decode") as counts:
            if kinds == {True}:
                rows: list[list[int]] = data.ids  # type: ignore[assignment]
                counts["tokens"] = sum(len(r) for r in rows)
                texts = [core().decode(r, skip_special_tokens=data.skip_special_tokens) for r in rows]
                return DecodeResponse(text=texts)
            flat: list[int] = data.ids  # type: ignore[assignment]
            counts["tokens"] = len(flat)
            return DecodeResponse(core().decode(flat, skip_special_tokens=data.skip_special_tokens))

    @post("/v1/decode/stream", status_code=200, sync_to_thread=False, tags=["tokenizer"])
    def decode_stream(data: JSONBody[DecodeStreamRequest]) -> DecodeStreamResponse:
        """One stateless incremental-decoding step: the text completed since the last step.

        Send all ids so far with the offsets the previous step returned (0 and 0 at first, or
        both the prompt length to skip the prompt). `ids[:read_offset]` was already emitted; the
        answer holds back a trailing incomplete UTF-8 character until a later token completes it;
        `final: true` flushes what is held back (invalid bytes become U+FFFD).
        """
        with operation("decode_stream") as counts:
            text, prefix, read = core().decode_step(
                data.ids,
                data.prefix_offset,
                data.read_offset,
                skip_special_tokens=data.skip_special_tokens,
                final=data.final,
            )
            counts["tokens"] = read - data.read_offset
        return DecodeStreamResponse(text=text, prefix_offset=prefix, read_offset=read)

    @post("/v1/count", status_code=200, sync_to_thread=False, tags=["tokenizer"])
    def count(data: JSONBody[CountRequest]) -> CountResponse:
        """How many tokens a text encodes to."""
        check_texts([data.text])
        with operation("count") as counts:
            counts["tokens"] = core().count(data.text)
        return CountResponse(count=counts["tokens"])

    @get("/v1/tokenizer", sync_to_thread=False, tags=["tokenizer"])
    def tokenizer_json() -> Response[bytes]:
        """The raw `tokenizer.json`, so a gateway can tokenize locally with the same rules."""
        tok = core()
        eos = ",".join(str(i) for i in tok.eos_token_ids)
        headers = {contract.EOS_HEADER: eos} if eos else {}
        return Response(tok.raw_json, media_type="application/json", headers=headers)

    @get("/v1/info", sync_to_thread=False, tags=["tokenizer"])
    def info() -> InfoResponse:
        """Vocabulary size, end-of-sequence ids and model id of the loaded tokenizer."""
        tok = core()
        return InfoResponse(
            model_id=tok.model_id,
            vocab_size=tok.vocab_size,
            eos_token_id=tok.eos_token_id,
            eos_token_ids=list(tok.eos_token_ids),
        )

    return create_function_app(
        service_name=SERVICE_NAME,
        route_handlers=[encode, decode, decode_stream, count, tokenizer_json, info],
        settings=settings,
        lifespan=[load],
        is_ready=is_ready,
        registry=registry,
        openapi_title="tandem tokenizer",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m functions.tokenizer", description=__doc__)
    parser.add_argument("--bundle", required=True, type=Path, help="model bundle directory")
    parser.add_argument("--port", type=int, help=f"default: $PORT or {DEFAULT_PORT}")
    parser.add_argument("--host", help="default: $TANDEM_HOST or 127.0.0.1")
    parser.add_argument("--max-text-chars", type=int, default=DEFAULT_MAX_TEXT_CHARS)
    args = parser.parse_args(argv)
    try:
        # TANDEM_BUNDLE_URL: fetched and checked; TANDEM_VERIFY_HASHES: checked in place
        prepare_bundle(args.bundle, TOKENIZER_ROLE)
    except (BundleError, SettingsError) as e:
        print(f"tokenizer: error: {e}", file=sys.stderr)
        return 2
    if not (args.bundle / "tokenizer.json").is_file():
        parser.error(f"{args.bundle / 'tokenizer.json'} does not exist; pass a bundle directory")
    try:
        settings = FunctionSettings.from_env(DEFAULT_PORT, port=args.port, host=args.host)
    except SettingsError as e:
        print(f"tokenizer: error: {e}", file=sys.stderr)
        return 2
    app = create_tokenizer_app(args.bundle, settings, max_text_chars=args.max_text_chars)
    return serve(app, settings)


if __name__ == "__main__":
    sys.exit(main())
