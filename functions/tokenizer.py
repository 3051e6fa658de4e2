"""The tokenizer function: encode / decode / stream-decode / count over HTTP, on the shared factory.

Run: `python -m functions.tokenizer --bundle DIR [--port 8100] [--host 127.0.0.1]`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from litestar import Litestar, Response, get, post
from litestar.datastructures import State
from litestar.params import JSONBody
from prometheus_client import CollectorRegistry

from functions import contract
from functions.app import create_function_app
from functions.bundle import BundleError
from functions.bundle_fetch import TOKENIZER_ROLE, prepare_bundle
from functions.fastpath import ASGIApp
from functions.process import serve
from functions.settings import FunctionSettings, SettingsError
from functions.tokenizer_service import (
    DEFAULT_MAX_TEXT_CHARS,
    ChatTemplateResponse,
    CountRequest,
    CountResponse,
    DecodeRequest,
    DecodeResponse,
    DecodeStreamRequest,
    DecodeStreamResponse,
    EncodeRequest,
    EncodeResponse,
    InfoResponse,
    TokenizerService,
)

SERVICE_NAME = "tokenizer"
DEFAULT_PORT = 8100


def create_tokenizer_app(
    bundle: str | Path,
    settings: FunctionSettings,
    *,
    registry: CollectorRegistry | None = None,
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
) -> ASGIApp:
    """The tokenizer app; the tokenizer loads in the lifespan, readiness follows a warm-up."""
    registry = registry if registry is not None else CollectorRegistry()
    service = TokenizerService(bundle, registry, max_text_chars)

    @contextlib.asynccontextmanager
    async def load(_app: Litestar) -> AsyncIterator[None]:
        service.load()
        yield

    return create_function_app(
        service_name=SERVICE_NAME,
        route_handlers=[encode, decode, decode_stream, count, tokenizer_json, chat_template, info],
        settings=settings,
        lifespan=[load],
        is_ready=service.is_ready,
        registry=registry,
        openapi_title="tandem tokenizer",
        state={"tokenizer": service},
    )


def _service(state: State) -> TokenizerService:
    service: TokenizerService = state.tokenizer
    return service


# In a worker thread: a few megabyte-sized prompts would otherwise hold the event loop (and every
# other request, health checks included) for seconds; the Rust tokenizer releases the GIL.
@post("/v1/encode", status_code=200, sync_to_thread=True, tags=["tokenizer"])
def encode(data: JSONBody[EncodeRequest], state: State) -> EncodeResponse:
    """Text (or a batch of texts) to token ids."""
    return _service(state).encode(data)


@post("/v1/decode", status_code=200, sync_to_thread=False, tags=["tokenizer"])
def decode(data: JSONBody[DecodeRequest], state: State) -> DecodeResponse:
    """Token ids (or a batch of id lists) to text."""
    return _service(state).decode(data)


@post("/v1/decode/stream", status_code=200, sync_to_thread=False, tags=["tokenizer"])
def decode_stream(data: JSONBody[DecodeStreamRequest], state: State) -> DecodeStreamResponse:
    """One stateless incremental-decoding step: the text completed since the last step.

    Send all ids so far with the offsets the previous step returned (0 and 0 at first, or
    both the prompt length to skip the prompt). `ids[:read_offset]` was already emitted; the
    answer holds back a trailing incomplete UTF-8 character until a later token completes it;
    `final: true` flushes what is held back (invalid bytes become U+FFFD).
    """
    return _service(state).decode_stream(data)


@post("/v1/count", status_code=200, sync_to_thread=False, tags=["tokenizer"])
def count(data: JSONBody[CountRequest], state: State) -> CountResponse:
    """How many tokens a text encodes to."""
    return _service(state).count(data)


@get("/v1/tokenizer", sync_to_thread=False, tags=["tokenizer"])
def tokenizer_json(state: State) -> Response[bytes]:
    """The raw `tokenizer.json`, so a gateway can tokenize locally with the same rules."""
    raw, headers = _service(state).tokenizer_json()
    return Response(raw, media_type="application/json", headers=headers)


@get(contract.CHAT_TEMPLATE_PATH, sync_to_thread=False, tags=["tokenizer"])
def chat_template(state: State) -> ChatTemplateResponse:
    """The model's chat template (null when the bundle has none) and the special tokens' strings it
    is rendered with; the gateway renders it for /v1/chat/completions."""
    return _service(state).chat_template()


@get("/v1/info", sync_to_thread=False, tags=["tokenizer"])
def info(state: State) -> InfoResponse:
    """Vocabulary size, end-of-text id and model id of the loaded tokenizer."""
    return _service(state).info()


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
