"""Connection timeouts on a real function process (the tokenizer; every service runs the same
`functions.process.serve`): a request head that does not arrive in time closes the connection, a
body that stalls is a 408 naming the setting, a slow but steady client is served."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers.bundles import make_tokenizer_bundle
from tests.helpers.procs import ProcessHandle, free_port, start_process, stop_process

pytestmark = pytest.mark.processes
LIMIT = 0.6  # seconds, for both the head and each body chunk


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, ProcessHandle]]:
    bundle: Path = make_tokenizer_bundle(tmp_path_factory.mktemp("bundle"))
    port = free_port()
    args = [sys.executable, "-m", "functions.tokenizer", "--bundle", str(bundle), "--port", str(port)]
    env = {"TANDEM_HEADER_TIMEOUT": str(LIMIT), "TANDEM_BODY_TIMEOUT": str(LIMIT)}
    handle = start_process(args, f"http://127.0.0.1:{port}/v2/health/ready", env=env)
    yield port, handle
    stop_process(handle)


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing; fails if it kept the connection open longer."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {seconds} s; got {data[:200]!r}")
    return data


def test_a_slow_request_head_closes_the_connection(server: tuple[int, ProcessHandle]) -> None:
    port, _ = server
    for partial in (b"", b"POST /v1/encode HTTP/1.1\r\nHost: x\r\n"):  # silent, then slowloris
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(partial)
            t0 = time.monotonic()
            assert closed_within(s, 5 * LIMIT) == b""
            assert time.monotonic() - t0 >= LIMIT * 0.8


def test_a_stalled_body_is_a_408(server: tuple[int, ProcessHandle]) -> None:
    port, _ = server
    with socket.create_connection(("127.0.0.1", port)) as s:
        head = "POST /v1/encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        s.sendall(head.encode() + b'{"text": "hel')
        answer = closed_within(s, 5 * LIMIT)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"TANDEM_BODY_TIMEOUT" in answer


def test_a_slow_but_steady_client_is_served(server: tuple[int, ProcessHandle]) -> None:
    port, handle = server

    def chunks() -> Iterator[bytes]:
        for part in (b'{"text": ', b'"hello world"', b"}"):
            time.sleep(LIMIT / 3)
            yield part

    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/encode", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 200 and r.json()["count"] > 0, r.text
    assert handle.process.poll() is None
