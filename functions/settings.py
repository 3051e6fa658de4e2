"""Settings shared by every function process, read from `TANDEM_*` variables and `PORT`.

Built at call time (`FunctionSettings.from_env`), never at import, so tests pass them explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


@dataclass(frozen=True, slots=True)
class FunctionSettings:
    port: int
    host: str = "127.0.0.1"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_level: str = "info"
    # Pin the serving thread (event loop, request handling) to this CPU; None: no pinning.
    # See functions.app.serve: on a small machine running the whole stack, every process's event
    # loop on one core and ONNX Runtime's compute threads on the others is much faster.
    loop_cpu: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be between 0 and 65535, got {self.port}")
        if self.max_body_bytes <= 0:
            raise SettingsError(f"max_body_bytes must be > 0, got {self.max_body_bytes}")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.loop_cpu is not None and self.loop_cpu not in usable_cpus():
            raise SettingsError(
                f"TANDEM_LOOP_CPU must be one of this process's CPUs {sorted(usable_cpus())}, got {self.loop_cpu}"
            )

    @classmethod
    def from_env(
        cls, default_port: int, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> FunctionSettings:
        """Settings from `PORT`, `TANDEM_HOST`, `TANDEM_MAX_BODY_BYTES`, `TANDEM_LOG_LEVEL`,
        `TANDEM_LOOP_CPU` (a CPU number; empty or unset: no pinning).

        Overrides (e.g. command-line flags) win over the environment; None means "not given".
        """
        env = os.environ if env is None else env
        settings = cls(
            port=_int(env, "PORT", default_port),
            host=env.get("TANDEM_HOST", "127.0.0.1"),
            max_body_bytes=_int(env, "TANDEM_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES),
            log_level=env.get("TANDEM_LOG_LEVEL", "info").lower(),
            loop_cpu=_int(env, "TANDEM_LOOP_CPU", None),
        )
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity, not the machine's count)."""
    return os.sched_getaffinity(0)


def _int(env: Mapping[str, str], name: str, default: Any) -> Any:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"environment variable {name} must be an integer, got {raw!r}") from None
