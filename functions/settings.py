"""Settings from the environment: `Env`, the one reader of `TANDEM_*` variables (one boolean rule,
one error format) used by every service and the launcher; and the settings every function
process shares, read from `TANDEM_*` variables and `PORT`.

Built at call time (`FunctionSettings.from_env`), never at import, so tests pass them explicitly.
Standard library only: the launcher imports it too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from functions.auth import MIN_TOKEN_LENGTH

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
FAST_PATH_CHOICES = ("auto", "on", "off")
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
    # The per-token routes straight on ASGI in front of Litestar (functions.fastpath): "auto" (on
    # unless tracing is on), "on" or "off" (every request through Litestar's routing).
    fast_path: str = "auto"
    # TANDEM_AUTH_TOKEN: the functions require it from callers, the gateway sends it (functions.auth)
    auth_token: str | None = field(default=None, repr=False)  # never in logs
    # TANDEM_API_KEYS (comma-separated): the keys the gateway accepts from clients
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    # TANDEM_ALLOWED_HOSTS (comma-separated; `*.domain` for subdomains): the Host names answered
    allowed_hosts: tuple[str, ...] = ()
    # seconds a client may take for a request head, and per request body chunk (functions.timeouts)
    header_timeout: float = 10.0
    body_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be between 0 and 65535, got {self.port}")
        if self.max_body_bytes <= 0:
            raise SettingsError(f"max_body_bytes must be > 0, got {self.max_body_bytes}")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.fast_path not in FAST_PATH_CHOICES:
            raise SettingsError(
                f"fast_path must be one of {', '.join(FAST_PATH_CHOICES)}, got {self.fast_path!r}"
            )
        for name, secret in (
            ("TANDEM_AUTH_TOKEN", self.auth_token),
            *(("TANDEM_API_KEYS", k) for k in self.api_keys),
        ):
            if secret is not None and len(secret) < MIN_TOKEN_LENGTH:
                raise SettingsError(
                    f"{name}: a token must be at least {MIN_TOKEN_LENGTH} characters, got {len(secret)}"
                )
        if self.loop_cpu is not None and self.loop_cpu not in usable_cpus():
            raise SettingsError(
                f"TANDEM_LOOP_CPU must be one of this process's CPUs {sorted(usable_cpus())}, got {self.loop_cpu}"
            )

    @classmethod
    def from_env(
        cls, default_port: int, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> FunctionSettings:
        """Settings from `PORT`, `TANDEM_HOST`, `TANDEM_MAX_BODY_BYTES`, `TANDEM_LOG_LEVEL`,
        `TANDEM_LOOP_CPU` (a CPU number; empty or unset: no pinning), `TANDEM_FAST_PATH`,
        `TANDEM_AUTH_TOKEN`, `TANDEM_API_KEYS`, `TANDEM_ALLOWED_HOSTS`, `TANDEM_HEADER_TIMEOUT` and
        `TANDEM_BODY_TIMEOUT`.

        Overrides (e.g. command-line flags) win over the environment; None means "not given".
        """
        e = Env(env)
        settings = cls(
            port=e.integer("PORT", default_port),
            host=e.text("TANDEM_HOST", "127.0.0.1"),
            max_body_bytes=e.integer("TANDEM_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, minimum=1),
            log_level=e.choice("TANDEM_LOG_LEVEL", "info", LOG_LEVELS),
            loop_cpu=e.integer("TANDEM_LOOP_CPU", None),
            fast_path=e.choice("TANDEM_FAST_PATH", "auto", FAST_PATH_CHOICES),
            auth_token=e.text("TANDEM_AUTH_TOKEN", None),
            api_keys=tuple(e.items("TANDEM_API_KEYS", [])),
            allowed_hosts=tuple(e.items("TANDEM_ALLOWED_HOSTS", [])),
            header_timeout=e.number("TANDEM_HEADER_TIMEOUT", 10.0, minimum=0.001),
            body_timeout=e.number("TANDEM_BODY_TIMEOUT", 30.0, minimum=0.001),
        )
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity, not the machine's count)."""
    return os.sched_getaffinity(0)


TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


class Env:
    """Typed reads of environment variables. An unset or empty variable gives the default; a value
    that cannot be used raises SettingsError naming the variable, what it must be, and the value."""

    def __init__(self, env: Mapping[str, str] | None = None):
        self.env = os.environ if env is None else env

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def _fail(self, name: str, what: str, raw: str) -> SettingsError:
        return SettingsError(f"environment variable {name} must be {what}, got {raw!r}")

    def text(self, name: str, default: Any = None) -> Any:
        raw = self.raw(name)
        return default if raw is None else raw

    def integer(self, name: str, default: Any = None, *, minimum: int | None = None) -> Any:
        raw = self.raw(name)
        if raw is None:
            return default
        what = "an integer" + ("" if minimum is None else f" >= {minimum}")
        try:
            value = int(raw)
        except ValueError:
            raise self._fail(name, what, raw) from None
        if minimum is not None and value < minimum:
            raise self._fail(name, what, raw)
        return value

    def number(self, name: str, default: Any = None, *, minimum: float | None = None) -> Any:
        raw = self.raw(name)
        if raw is None:
            return default
        what = "a finite number" + ("" if minimum is None else f" >= {minimum:g}")
        try:
            value = float(raw)
        except ValueError:
            raise self._fail(name, what, raw) from None
        if not math.isfinite(value) or (minimum is not None and value < minimum):
            raise self._fail(name, what, raw)
        return value

    def flag(self, name: str, default: bool = False) -> bool:
        raw = self.raw(name)
        if raw is None:
            return default
        if raw.lower() in TRUE:
            return True
        if raw.lower() in FALSE:
            return False
        raise self._fail(name, f"one of {', '.join(TRUE + FALSE)}", raw)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.raw(name)
        if raw is None:
            return default
        if raw.lower() not in choices:
            raise self._fail(name, f"one of {', '.join(choices)}", raw)
        return raw.lower()

    def items(self, name: str, default: Any = None) -> Any:
        """A comma-separated list (items stripped, empty items dropped)."""
        raw = self.env.get(name)
        if raw is None:
            return default
        return [item.strip() for item in raw.split(",") if item.strip()]
