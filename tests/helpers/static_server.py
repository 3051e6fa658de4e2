"""A directory served over real HTTP on 127.0.0.1 (a stand-in for an object store), recording the
paths it was asked for."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class _Recording(http.server.SimpleHTTPRequestHandler):
    paths: list[str]

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.paths.append(self.path)
        super().do_GET()


@contextlib.contextmanager
def serve_directory(
    directory: Path, host: str = "127.0.0.1", port: int = 0
) -> Iterator[tuple[str, list[str]]]:
    """Yields the base URL (ending in /) and the list of paths requested so far. `port` 0: any free
    one; another that is taken: any free one too."""
    paths: list[str] = []
    handler = functools.partial(type("Handler", (_Recording,), {"paths": paths}), directory=str(directory))
    try:
        httpd = http.server.ThreadingHTTPServer((host, port), handler)
    except OSError:
        httpd = http.server.ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{httpd.server_address[1]}/", paths
    finally:
        httpd.shutdown()
        httpd.server_close()
