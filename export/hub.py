"""The Hugging Face hub, asked once and briefly: is it reachable, and the small files of a model
(config, tokenizer, generation config, chat template) next to what `from_pretrained` downloads.

An unreachable hub ends the export within a few seconds with one message listing the offline
options, instead of the retries and tracebacks of the hub client. HF_HUB_OFFLINE=1 skips the probe
and reads the local cache only.
"""

from __future__ import annotations

import os
import threading
import urllib.parse
from pathlib import Path

from export.errors import ExportError

PROBE_SECONDS = 2.0  # connect (DNS included), then the answer; the whole export must end within 5 s
SMALL_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
]
OFFLINE_OPTIONS = (
    "offline options: --random-init FAMILY (seeded random weights of a real shape, e.g. llama, "
    "qwen2, gpt2; `python -m export --help` lists them), --model DIR (a local model directory), or "
    "HF_HUB_OFFLINE=1 with the model already in the Hugging Face cache"
)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def probe(timeout: float = PROBE_SECONDS) -> str | None:
    """None when the hub answers within `timeout` seconds, else why not. Runs in a thread so a
    resolver that hangs (getaddrinfo has no timeout) cannot hold the export."""
    import httpx

    result: list[str | None] = []

    def ask() -> None:
        try:
            httpx.head(f"{endpoint()}/api/models", timeout=timeout, follow_redirects=False)
            result.append(None)
        except httpx.HTTPError as e:
            result.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(timeout + 0.2)
    if not result:
        return f"no answer within {timeout:.0f} s"
    return result[0]


def require(model: str) -> None:
    """Raise ExportError (one message, the offline options) unless the hub can be asked for `model`."""
    if offline():
        return
    why = probe()
    if why is not None:
        host = urllib.parse.urlsplit(endpoint()).netloc
        raise ExportError(
            f"{model!r} is not a local directory and the Hugging Face hub ({host}) is unreachable ({why}); {OFFLINE_OPTIONS}"
        )


def small_files(model: str, revision: str | None) -> Path:
    """A local directory with the model's small files (those it has): the hub cache's snapshot."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = snapshot_download(
            model, revision=revision, allow_patterns=SMALL_FILES, local_files_only=offline()
        )
    except RepositoryNotFoundError as e:
        raise ExportError(
            f"{model!r}: no such model on the Hugging Face hub (or it is private: log in with `hf auth login`)"
        ) from e
    except LocalEntryNotFoundError as e:
        raise ExportError(
            f"{model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {OFFLINE_OPTIONS}"
        ) from e
    except (HfHubHTTPError, OSError) as e:
        raise ExportError(f"could not fetch {model!r} from the Hugging Face hub: {e}") from e
    return Path(path)
