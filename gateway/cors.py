"""Which browser origins may call the gateway (the UI on :5173 is another origin): the
comma-separated TANDEM_CORS_ORIGINS, none when unset. The UI reads X-Trace-Id (to link the trace)
and Retry-After (after a 429), so those two headers are exposed to it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from litestar.config.cors import CORSConfig

from functions.settings import Env, SettingsError

ENV_VAR = "TANDEM_CORS_ORIGINS"
EXPOSED = ["X-Trace-Id", "Retry-After"]


def cors_origins(env: Mapping[str, str] | None = None) -> list[str]:
    """The configured origins ("scheme://host[:port]" each, or "*" for any), checked."""
    origins: list[str] = Env(env).items(ENV_VAR, [])
    for o in origins:
        scheme, sep, rest = o.partition("://")
        if o != "*" and (not sep or scheme not in ("http", "https") or not rest or "/" in rest):
            raise SettingsError(
                f"environment variable {ENV_VAR} must list origins like http://127.0.0.1:5173 "
                f"(scheme, host, optional port; no path), got {o!r}"
            )
    return origins


def cors_config(origins: Sequence[str]) -> CORSConfig | None:
    """Litestar's CORS for these origins; None (no CORS headers at all) when there are none."""
    if not origins:
        return None
    return CORSConfig(
        allow_origins=list(origins),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Content-Type", "Authorization", "traceparent"],
        expose_headers=EXPOSED,
        max_age=600,
    )
