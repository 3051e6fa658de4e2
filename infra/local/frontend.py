"""The web UI in the local stack: `build_if_stale()` makes frontend/dist (npm ci, then the Vite
build) the first time and again whenever a source is newer than the build, and
`python -m infra.local.frontend --gateway-url URL` serves it (stdlib static server, default
127.0.0.1:5173). The page finds the gateway through a meta tag this server
fills in, so a stack on other ports needs no rebuild. Stdlib and functions.settings only."""

from __future__ import annotations

import argparse
import functools
import html
import os
import shutil
import subprocess
import sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from functions.settings import Env, SettingsError

REPO_ROOT = Path(__file__).resolve().parents[2]
FRONTEND_DIR = REPO_ROOT / "frontend"
DIST = FRONTEND_DIR / "dist"
DEFAULT_PORT = 5173
# index.html carries this tag empty; the server puts the gateway's URL in it (frontend/src/settings.ts)
GATEWAY_META = '<meta name="tandem-gateway-url" content="" />'


def cors_origins(port: int) -> str:
    """What the gateway must allow for a UI served on `port` (TANDEM_CORS_ORIGINS)."""
    return f"http://127.0.0.1:{port},http://localhost:{port}"


# what the build reads: a change to any of them makes dist/ stale
SOURCES = ("src", "index.html", "package.json", "package-lock.json", "vite.config.ts", "tsconfig.json")


def newest_source(frontend: Path) -> float:
    """The latest modification time among the UI's sources (0 when there are none)."""
    times = [0.0]
    for name in SOURCES:
        path = frontend / name
        if path.is_dir():
            times += [p.stat().st_mtime for p in path.rglob("*") if p.is_file()]
        elif path.is_file():
            times.append(path.stat().st_mtime)
    return max(times)


def build_if_stale(frontend: Path = FRONTEND_DIR, npm: str | None = None) -> str | None:
    """Build the UI unless dist/index.html exists and is newer than every source; None when the
    build is there, else why it is not (a stale build after `git pull` would serve the old UI)."""
    index = frontend / "dist" / "index.html"
    if index.is_file() and index.stat().st_mtime >= newest_source(frontend):
        return None
    npm = npm or shutil.which("npm")
    if npm is None:
        return "npm is not installed (Node 20 brings it), so the web UI cannot be built"
    steps = [] if (frontend / "node_modules").is_dir() else [[npm, "ci", "--no-audit", "--no-fund"]]
    for cmd in [*steps, [npm, "run", "build"]]:
        print(f"[stack] web UI: {' '.join(cmd[1:])} (in frontend/)", flush=True)
        done = subprocess.run(cmd, cwd=frontend, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            tail = "\n".join(f"    {line}" for line in done.stdout.splitlines()[-15:])
            return f"`npm {' '.join(cmd[1:])}` failed (exit {done.returncode}):\n{tail}"
    return None


class UIHandler(SimpleHTTPRequestHandler):
    """Static files from dist/, index.html with the gateway's URL filled in."""

    gateway_url = ""

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
        if self.path.split("?", 1)[0] in ("/", "/index.html"):
            self._index()
        else:
            super().do_GET()

    def _index(self) -> None:
        page = Path(self.directory, "index.html").read_text()
        meta = GATEWAY_META.replace('content=""', f'content="{html.escape(self.gateway_url)}"')
        body = page.replace(GATEWAY_META, meta).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's signature)
        pass  # the page's few requests are not worth a log line each


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.local.frontend", description=__doc__)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--dir", type=Path, default=DIST, help="the built UI (default frontend/dist)")
    p.add_argument("--gateway-url", default="", help="where the page finds the gateway")
    args = p.parse_args(argv)
    if not (args.dir / "index.html").is_file():
        print(f"frontend: error: {args.dir} has no index.html; build it (npm run build)", file=sys.stderr)
        return 2
    try:
        cpu = Env().integer("TANDEM_LOOP_CPU")  # pinned like every other service of the stack
    except SettingsError as e:
        print(f"frontend: error: {e}", file=sys.stderr)
        return 2
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    handler = functools.partial(
        type("Handler", (UIHandler,), {"gateway_url": args.gateway_url}), directory=str(args.dir)
    )
    with ThreadingHTTPServer((args.host, args.port), handler) as server:
        print(f"frontend: serving {args.dir} on http://{args.host}:{args.port}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
