"""TokenizerCore (incl. streaming decode of split multi-byte characters) and the tokenizer function
served over real HTTP by `python -m functions.tokenizer`.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from functions.tokenizer_core import IncrementalDecoder, TokenizerCore, TokenizerInputError
from tests.helpers.bundles import EOS, make_tokenizer_bundle
from tests.helpers.procs import ProcessHandle, free_port, start_process, stop_process

pytestmark = pytest.mark.processes  # the HTTP tests run the tokenizer function as a process

TEXTS = ["é", "😀", "日本語", "Emoji: 😀 🚀 ok ñ 🦀 zebra 中 déjà", "plain ascii text"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tokenizer_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def core(bundle: Path) -> TokenizerCore:
    return TokenizerCore.from_bundle(bundle)


def test_core_basics(core: TokenizerCore, bundle: Path) -> None:
    assert core.model_id == "tiny"
    assert core.eos_token_id == core.tokenizer.token_to_id(EOS)
    assert core.vocab_size == 400
    ids = core.encode("Hello, how are you?")
    assert core.decode(ids) == "Hello, how are you?"
    assert core.count("Hello, how are you?") == len(ids)
    assert core.encode_batch(["a b", "Café"]) == [core.encode("a b"), core.encode("Café")]
    assert core.decode([*ids, core.eos_token_id], skip_special_tokens=True) == core.decode(ids)
    with pytest.raises(TokenizerInputError, match="outside the vocabulary"):
        core.decode([core.vocab_size])
    with pytest.raises(TokenizerInputError):
        core.decode([-1])


def test_core_without_manifest(tmp_path: Path) -> None:
    """The EOS ids come from the manifest only: no family's end-of-text token is assumed."""
    core = TokenizerCore.from_bundle(make_tokenizer_bundle(tmp_path, manifest=False))
    assert core.model_id is None
    assert core.eos_token_ids == () and core.eos_token_id is None


def test_core_with_several_eos_ids(tmp_path: Path) -> None:
    """A manifest's eos_token_ids list (Llama 3 has several) is what the core knows, in order."""
    import json

    bundle = make_tokenizer_bundle(tmp_path)
    doc = json.loads((bundle / "manifest.json").read_text())
    doc["tokenizer"]["eos_token_ids"] = [7, doc["tokenizer"]["eos_token_id"]]
    (bundle / "manifest.json").write_text(json.dumps(doc))
    core = TokenizerCore.from_bundle(bundle)
    assert core.eos_token_ids == (7, core.tokenizer.token_to_id(EOS)) and core.eos_token_id == 7


def test_multibyte_characters_are_split_across_tokens(core: TokenizerCore) -> None:
    # The premise of the streaming tests: some single token decodes to U+FFFD on its own.
    ids = core.encode("😀")
    assert len(ids) > 1 and "\ufffd" in core.decode(ids[:1])


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoder(core: TokenizerCore, text: str) -> None:
    ids = core.encode(text)
    decoder = IncrementalDecoder(core)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == core.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_incremental_decoder_flushes_incomplete_bytes(core: TokenizerCore) -> None:
    ids = core.encode("😀")[:1]  # the stream ends mid-character
    decoder = IncrementalDecoder(core)
    assert decoder.push(ids[0]) == ""
    assert decoder.flush() == core.decode(ids)
    with pytest.raises(TokenizerInputError):
        decoder.push(10_000)
    assert decoder.ids == ids  # a rejected id does not corrupt the stream


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[tuple[str, ProcessHandle]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = [sys.executable, "-m", "functions.tokenizer", "--bundle", str(bundle)]
    handle = start_process([*args, "--port", str(port)], f"{base}/v2/health/ready")
    yield base, handle
    stop_process(handle)


@pytest.fixture(scope="module")
def http(server: tuple[str, ProcessHandle]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=10) as client:
        yield client


def test_http_encode_decode_count(http: httpx.Client, core: TokenizerCore) -> None:
    text = TEXTS[3]
    ids = core.encode(text)
    assert http.post("/v1/encode", json={"text": text}).json() == {"ids": ids, "count": len(ids)}
    batch = http.post("/v1/encode", json={"text": [text, "é"]}).json()
    assert batch == {"ids": [ids, core.encode("é")], "count": [len(ids), len(core.encode("é"))]}
    assert http.post("/v1/decode", json={"ids": ids}).json() == {"text": text}
    assert http.post("/v1/decode", json={"ids": [ids, []]}).json() == {"text": [text, ""]}
    assert http.post("/v1/count", json={"text": text}).json() == {"count": len(ids)}


def test_http_decode_stream(http: httpx.Client, core: TokenizerCore) -> None:
    text = TEXTS[3]
    ids = core.encode(text)
    prefix = read = 0
    pieces = []
    for n in range(1, len(ids) + 1):
        body = {"ids": ids[:n], "prefix_offset": prefix, "read_offset": read}
        step = http.post("/v1/decode/stream", json=body).json()
        prefix, read = step["prefix_offset"], step["read_offset"]
        pieces.append(step["text"])
    final = {"ids": ids, "prefix_offset": prefix, "read_offset": read, "final": True}
    pieces.append(http.post("/v1/decode/stream", json=final).json()["text"])
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_http_tokenizer_and_info(http: httpx.Client, core: TokenizerCore, bundle: Path) -> None:
    response = http.get("/v1/tokenizer")
    assert response.content == (bundle / "tokenizer.json").read_bytes()
    assert response.headers["tandem-eos-token-ids"] == str(core.eos_token_id)
    info = http.get("/v1/info").json()
    eos = core.eos_token_id
    assert info == {"model_id": "tiny", "vocab_size": 400, "eos_token_id": eos, "eos_token_ids": [eos]}


def test_http_metrics_and_docs(http: httpx.Client) -> None:
    http.post("/v1/encode", json={"text": "metrics"})
    metrics = http.get("/metrics").text
    assert 'tandem_tokenizer_requests_total{op="encode"}' in metrics
    assert 'tandem_tokenizer_tokens_total{op="encode"}' in metrics
    assert "tandem_tokenizer_seconds_bucket" in metrics
    assert http.get("/docs").status_code == 200
    assert "/v1/decode/stream" in http.get("/docs/openapi.json").json()["paths"]


BAD_REQUESTS = [
    ("/v1/encode", b"not json"),
    ("/v1/encode", b'{"text": 5}'),
    ("/v1/encode", b'{"text": []}'),
    ("/v1/encode", b'{"txt": "a"}'),
    ("/v1/encode", b"[]"),
    ("/v1/decode", b'{"ids": [-1]}'),
    ("/v1/decode", b'{"ids": [400]}'),
    ("/v1/decode", b'{"ids": [1, [2]]}'),
    ("/v1/decode", b'{"ids": ["a"]}'),
    ("/v1/decode", b'{"ids": [true]}'),
    ("/v1/decode/stream", b'{"ids": [1, 2], "prefix_offset": 2, "read_offset": 1}'),
    ("/v1/decode/stream", b'{"ids": [1, 2], "read_offset": 5}'),
    ("/v1/count", b'{"text": null}'),
    ("/v1/count", b"\xff\xfe\x00garbage"),
]


@pytest.mark.parametrize(("path", "body"), BAD_REQUESTS)
def test_http_bad_requests(http: httpx.Client, path: str, body: bytes) -> None:
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")  # problem JSON, OIP-readable
    assert response.json()["error"] == response.json()["detail"]
    assert response.json()["detail"]


def test_http_text_too_long(http: httpx.Client) -> None:
    response = http.post("/v1/count", json={"text": "a" * 1_000_001})
    assert response.status_code == 400 and "at most 1000000" in response.json()["detail"]


def test_http_random_bodies_keep_the_service_alive(http: httpx.Client) -> None:
    rng = random.Random(7)
    for _ in range(50):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        path = rng.choice(["/v1/encode", "/v1/decode", "/v1/decode/stream", "/v1/count"])
        status = http.post(path, content=body).status_code
        assert 400 <= status < 500
    assert http.get("/v2/health/ready").status_code == 200


def test_large_prompts_do_not_hold_the_event_loop(server: tuple[str, ProcessHandle]) -> None:
    """Four ~1 MB prompts encode in worker threads: a health check sent meanwhile answers at once."""
    import asyncio
    import time

    base = server[0]
    text = "lorem ipsum dolor sit amet, " * 35_000  # ~1 MB

    async def main() -> tuple[float, float]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as c:
            t0 = time.monotonic()
            encodes = [asyncio.create_task(c.post("/v1/encode", json={"text": text})) for _ in range(4)]
            worst = 0.0
            for _ in range(3):  # while the encodes run (together about 2 s per prompt here)
                await asyncio.sleep(0.4)
                h0 = time.monotonic()
                assert (await c.get("/v2/health/live")).status_code == 200
                worst = max(worst, time.monotonic() - h0)
            assert all(r.status_code == 200 for r in await asyncio.gather(*encodes))
            return worst, time.monotonic() - t0

    health, encoding = asyncio.run(main())
    assert encoding > 2.0, f"the prompts encoded in {encoding:.2f} s: too fast to show anything"
    assert health < 0.5, f"a health check waited {health:.2f} s behind the encodes ({encoding:.2f} s)"


def test_zz_sigterm_exits_zero(server: tuple[str, ProcessHandle]) -> None:
    # Named to run last in this module: it stops the shared server.
    _, handle = server
    code = stop_process(handle, timeout=5)
    assert code == 0, f"exit code {code}; output tail:\n{handle.stderr_tail()}"
