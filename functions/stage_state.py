"""What a stage process holds besides its routes: its settings, the loader that builds the ONNX
session off the event loop (readiness follows it), its own metrics, and the KV cache and device
figures read at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from functions import contract
from functions.app import LATENCY_BUCKETS
from functions.bundle import BundleError, Manifest, verify_files
from functions.device import ProviderError, gpu_memory
from functions.engine import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_RESPONSE_BYTES, StageEngine, StageResult
from functions.kvstore import KV_STORE_CHOICES
from functions.process import unpin_this_thread
from functions.settings import Env, SettingsError

logger = logging.getLogger("tandem.stage")
PROVIDERS = ("cpu", "cuda")


@dataclass(frozen=True)
class StageSettings:
    bundle: Path
    stage: str  # "stage-2" (the manifest's name), also accepted as "2"
    provider: str = "cpu"
    threads: int | None = None
    cache_bytes: int = 2 << 30
    idle_seconds: float = 600.0
    verify_hashes: bool = False  # sha256 of the stage file before loading (slow for big files)
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # rows x new positions per call (413 beyond)
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES  # tensor bytes of one answer (413 beyond)
    kv_store: str = "auto"  # host | device | auto (device with CUDA): functions.kvstore

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> StageSettings:
        """`TANDEM_PROVIDER`, `TANDEM_THREADS`, `TANDEM_KV_CACHE_BYTES`, `TANDEM_KV_IDLE_SECONDS`,
        `TANDEM_VERIFY_HASHES`, `TANDEM_MAX_BATCH_TOKENS`, `TANDEM_MAX_RESPONSE_BYTES`, `TANDEM_KV_STORE`;
        overrides (command-line flags) win, None means "not given"."""
        e = Env(env)
        values: dict[str, Any] = {
            "provider": e.choice("TANDEM_PROVIDER", "cpu", PROVIDERS),
            "threads": e.integer("TANDEM_THREADS", None, minimum=1),
            "cache_bytes": e.integer("TANDEM_KV_CACHE_BYTES", 2 << 30, minimum=0),
            "idle_seconds": e.number("TANDEM_KV_IDLE_SECONDS", 600.0, minimum=0),
            "verify_hashes": e.flag("TANDEM_VERIFY_HASHES"),
            "max_batch_tokens": e.integer("TANDEM_MAX_BATCH_TOKENS", DEFAULT_MAX_BATCH_TOKENS, minimum=1),
            "max_response_bytes": e.integer(
                "TANDEM_MAX_RESPONSE_BYTES", DEFAULT_MAX_RESPONSE_BYTES, minimum=1
            ),
            "kv_store": e.choice("TANDEM_KV_STORE", "auto", KV_STORE_CHOICES),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["provider"] not in PROVIDERS:
            raise SettingsError(f"provider must be one of {', '.join(PROVIDERS)}, got {values['provider']!r}")
        values["stage"] = contract.normalize_stage_name(str(values["stage"]))
        return cls(**values)


class Loader:
    """Loads the session off the event loop; readiness reflects where it got to."""

    def __init__(
        self, settings: StageSettings, manifest: Manifest, on_fatal: Callable[[str], None] | None = None
    ):
        self.settings, self.manifest = settings, manifest
        # called with a one-line reason when the stage can never become ready on the provider asked
        # for (the process exits; an orchestrator cannot tell "never" from a slow load)
        self.on_fatal = on_fatal
        self.engine: StageEngine | None = None
        self.error: str | None = None
        self.status = "loading the ONNX session"

    def run(self) -> None:
        s, m = self.settings, self.manifest
        unpin_this_thread()  # ONNX Runtime's compute threads start here: all of the process's CPUs
        try:
            entry = m.stage(s.stage)
            if s.verify_hashes:
                problems = verify_files(s.bundle, m, only=list(entry.files))
                if problems:
                    raise BundleError("; ".join(problems))
            engine = StageEngine(
                s.bundle,
                m,
                entry,
                provider=s.provider,
                threads=s.threads,
                cache_bytes=s.cache_bytes,
                max_batch_tokens=s.max_batch_tokens,
                max_response_bytes=s.max_response_bytes,
                idle_seconds=s.idle_seconds,
                kv_store=s.kv_store,
            )
            self.status = "running the warm-up inference"
            engine.warm_up()
            self.engine = engine
            logger.info("%s ready (providers %s, KV store %s)", entry.name, engine.providers, engine.kv.kind)
        except ProviderError as e:
            self.error = f"loading failed: {e}"
            if self.on_fatal is not None:
                self.on_fatal(str(e))
        except Exception as e:  # readiness reports it; the process stays up for /v2/health/live
            logger.exception("loading %s failed", s.stage)
            self.error = f"loading failed: {e}"

    def ready(self) -> tuple[bool, str]:
        if self.engine is not None:
            return True, "ready"
        return False, self.error or self.status


class StageMetrics:
    """The stage's own series in `registry` (the app adds the HTTP ones), with the KV cache and
    device collectors; label lookups are done once here, not per call (each takes a lock)."""

    def __init__(self, registry: CollectorRegistry, stage: str, loader: Loader):
        infer_seconds = Histogram(
            "tandem_stage_infer_seconds",
            "Time in the ONNX session per batch.",
            ["stage", "phase"],
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        batch_size = Histogram(
            "tandem_stage_batch_size",
            "Rows per inference batch.",
            ["stage"],
            registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        forks = Counter(
            "tandem_stage_forked_sequences",
            "Sequences started as a copy of another's KV cache (the choices of one prompt share its prefill).",
            ["stage"],
            registry=registry,
        )
        self.infer_seconds = {phase: infer_seconds.labels(stage, phase) for phase in ("prefill", "decode")}
        self.batch_size = batch_size.labels(stage)
        self.forks = forks.labels(stage)
        registry.register(CacheCollector(loader, stage))
        registry.register(DeviceCollector(loader, stage))

    def observe(self, result: StageResult) -> None:
        self.infer_seconds[result.phase].observe(result.seconds)
        self.batch_size.observe(result.batch_size)


# name, help, how to read it off the KV cache, metric family
_CACHE_FIGURES = (
    ("tandem_kv_cache_sequences", "Sequences held in the KV cache.", len, GaugeMetricFamily),
    ("tandem_kv_cache_bytes", "Bytes of keys/values held.", lambda c: c.bytes, GaugeMetricFamily),
    (
        "tandem_kv_cache_evictions",
        "Sequences evicted for the byte budget.",
        lambda c: c.evictions,
        CounterMetricFamily,
    ),
    (
        "tandem_kv_cache_expirations",
        "Sequences dropped for idleness.",
        lambda c: c.expirations,
        CounterMetricFamily,
    ),
    (
        "tandem_kv_cache_misses",
        "Rows refused (409) for a past length the stage does not hold.",
        lambda c: c.misses,
        CounterMetricFamily,
    ),
)


class CacheCollector:
    """KV cache figures read at scrape time, so they are never stale."""

    def __init__(self, loader: Loader, stage: str):
        self.loader, self.stage = loader, stage

    def collect(self) -> Iterator[Metric]:
        cache = self.loader.engine.cache if self.loader.engine else None
        for name, doc, read, family in _CACHE_FIGURES:
            m = family(name, doc, labels=["stage"])
            m.add_metric([self.stage], read(cache) if cache is not None else 0)
            yield m


class DeviceCollector:
    """What the stage computes on, read at scrape time once the session is loaded:
    tandem_stage_runtime_info (the provider asked for, the providers the session uses, the KV
    store) and, on CUDA, the GPU's memory (absent on the CPU)."""

    def __init__(self, loader: Loader, stage: str):
        self.loader, self.stage = loader, stage

    def collect(self) -> Iterator[Metric]:
        engine = self.loader.engine
        if engine is None:
            return
        info = InfoMetricFamily("tandem_stage_runtime", "Where this stage computes.", labels=["stage"])
        runtime = {
            "provider": self.loader.settings.provider,
            "providers": ",".join(engine.providers),
            "kv_store": engine.kv.kind,
        }
        info.add_metric([self.stage], runtime)
        yield info
        memory = gpu_memory() if self.loader.settings.provider == "cuda" else None
        if memory is not None:
            for name, doc, value in (
                ("tandem_gpu_memory_used_bytes", "GPU memory in use (every process on the GPU).", memory[0]),
                ("tandem_gpu_memory_total_bytes", "GPU memory in all.", memory[1]),
            ):
                g = GaugeMetricFamily(name, doc, labels=["stage", "device"])
                g.add_metric([self.stage, "0"], value)
                yield g
