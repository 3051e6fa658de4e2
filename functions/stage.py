"""The stage function: one ONNX pipeline stage behind the Open Inference Protocol v2 REST API.

Run: `python -m functions.stage --bundle DIR --stage K [--port P] [--provider cpu|cuda] [--threads N]`.
The session loads in the background after the port opens; /v2/health/ready is 503 until a
warm-up inference has run. This module wires the app (loader, metrics, the one service object
functions.stage_service, the routes functions.stage_routes) and runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from litestar import Litestar
from prometheus_client import CollectorRegistry

from functions.app import create_function_app
from functions.bundle import BundleError, load_manifest
from functions.bundle_fetch import prepare_bundle
from functions.device import ProviderError, require_available
from functions.fastpath import ASGIApp
from functions.process import serve
from functions.settings import FunctionSettings, SettingsError
from functions.stage_routes import fast_routes, stage_routes
from functions.stage_service import StageService
from functions.stage_state import PROVIDERS, Loader, StageMetrics, StageSettings

DEFAULT_PORT_BASE = 8100  # stage K listens on 8100 + K by default


def create_stage_app(
    settings: StageSettings,
    fn_settings: FunctionSettings,
    *,
    fast_path: bool | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> ASGIApp:
    """The stage function's ASGI app; `fast_path` as in `create_function_app` (None: auto);
    `on_fatal` is called with a one-line reason when the stage can never become ready (the CUDA
    provider asked for is not what the session got; None: readiness reports it)."""
    manifest = load_manifest(settings.bundle)
    name = manifest.stage(settings.stage).name
    loader = Loader(settings, manifest, on_fatal)
    registry = CollectorRegistry()
    service = StageService(settings, manifest, loader, StageMetrics(registry, name, loader))

    @contextlib.asynccontextmanager
    async def load_in_background(app: Litestar) -> AsyncIterator[None]:
        threading.Thread(target=loader.run, name=f"load-{name}", daemon=True).start()
        expiry = asyncio.create_task(expire_idle())
        try:
            yield
        finally:
            expiry.cancel()

    async def expire_idle() -> None:
        """Idle sequences leave even when no request comes to trigger it."""
        interval = max(1.0, min(30.0, settings.idle_seconds / 4))
        while True:
            await asyncio.sleep(interval)
            service.expire_idle()

    return create_function_app(
        service_name=name,
        route_handlers=stage_routes(service),
        settings=fn_settings,
        lifespan=[load_in_background],
        is_ready=loader.ready,
        registry=registry,
        openapi_title=f"tandem {name}",
        state={"loader": loader, "service": service},
        # the per-token route, straight on ASGI (functions.fastpath); the Litestar route documents
        # it and serves it when tracing is on
        fast_routes=fast_routes(service),
        fast_path=fast_path,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m functions.stage", description=__doc__)
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--stage", required=True, help="stage number (1-based) or name, e.g. 2 or stage-2")
    p.add_argument("--port", type=int)
    p.add_argument("--host")
    p.add_argument("--provider", choices=PROVIDERS)
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's)")
    args = p.parse_args(argv)
    try:
        settings = StageSettings.from_env(
            bundle=args.bundle, stage=args.stage, provider=args.provider, threads=args.threads
        )
        require_available(settings.provider)  # before the port opens: CUDA asked for, none installed
        # fetched when TANDEM_BUNDLE_URL says so; a bundle in place is verified by the loader
        prepare_bundle(settings.bundle, settings.stage, verify_in_place=False)
        manifest = load_manifest(settings.bundle)
        index = manifest.stage(settings.stage).index
        fn = FunctionSettings.from_env(DEFAULT_PORT_BASE + index + 1, port=args.port, host=args.host)
        app = create_stage_app(settings, fn, on_fatal=exit_at_once)
    except (BundleError, SettingsError, ProviderError) as e:
        print(f"stage: error: {e}", file=sys.stderr)
        return 2
    return serve(app, fn)


def exit_at_once(reason: str) -> None:
    """The session came up without the provider asked for: say why in one line and end the
    process (the loader thread runs before the stage was ever ready, so no request is in flight)."""
    print(f"stage: error: {reason}", file=sys.stderr, flush=True)
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
