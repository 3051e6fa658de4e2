"""Running a function app in a process: uvicorn, logging, graceful stop on SIGINT/SIGTERM, and
pinning the serving thread to one CPU. Nothing here is needed to build or test an app in-process.
"""

from __future__ import annotations

import gc
import logging
import os
import signal

import uvicorn

from functions.fastpath import ASGIApp
from functions.settings import FunctionSettings
from functions.timeouts import IDLE_KEEP_ALIVE, BodyTimeout, header_timeout_protocol

__all__ = ["serve", "unpin_this_thread"]

logger = logging.getLogger("tandem.functions")


def serve(app: ASGIApp, settings: FunctionSettings) -> int:
    """Run `app` (what a `create_*_app` factory returned) under uvicorn until SIGINT/SIGTERM, then
    drain gracefully; returns exit code 0."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per stage call is noise
    config = uvicorn.Config(
        BodyTimeout(app, settings.body_timeout),
        http=header_timeout_protocol(settings.header_timeout),
        timeout_keep_alive=int(IDLE_KEEP_ALIVE),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=10,
        access_log=False,
    )
    if settings.loop_cpu is not None:
        pin_serving_thread(settings.loop_cpu)
    # uvicorn re-raises the stop signal after its graceful shutdown, which would end the process
    # with -15 instead of 0; a handler installed before it is restored and receives that signal.
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    # What startup built (modules, the app, its routes: ~80,000 objects, a 45 ms full collection
    # on the 2-core machine) never becomes garbage: keep it out of every later collection, so a
    # full collection mid-generation costs what the requests allocated, not what the process is.
    gc.collect()
    gc.freeze()
    uvicorn.Server(config).run()
    if received:
        logger.info("stopped by signal %s after a graceful shutdown", received[0])
    return 0


# The CPUs the process had before `serve` pinned its serving thread; None while nothing is pinned.
_process_cpus: set[int] | None = None


def pin_serving_thread(cpu: int) -> None:
    """Keep the calling thread (the event loop) on `cpu`; threads it starts later inherit that, so
    a thread that computes (ONNX Runtime's pool is created by the stage's loader thread) calls
    `unpin_this_thread` first.

    Why: on the 2-core machine the whole stack shares, one token crosses five processes. With every
    event loop on one core, handing a request from one process to the next is a wake-up on the same
    core instead of an interrupt to the other, and ONNX Runtime's worker threads have the other core
    to themselves: the stack's single-stream rate went from 0.79x to 0.83-0.85x the monolith's
    (paired benchmark runs, docs/benchmarks.md).
    """
    global _process_cpus
    if _process_cpus is None:
        _process_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    logger.info("serving thread pinned to CPU %d (TANDEM_LOOP_CPU)", cpu)


def unpin_this_thread() -> None:
    """Give the calling thread back every CPU the process had (no-op when nothing was pinned)."""
    if _process_cpus is not None:
        os.sched_setaffinity(0, _process_cpus)
