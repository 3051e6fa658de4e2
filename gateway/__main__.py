"""`python -m gateway --config config.json [--port P] [--host H]`: the tandem gateway."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from functions.process import serve
from functions.settings import FunctionSettings, SettingsError
from gateway.app import create_gateway_app
from gateway.chat_template import ChatTemplate, ChatTemplateSyntaxError
from gateway.config import ConfigError, load_config
from gateway.cors import cors_origins
from gateway.discovery import ChatOverride
from gateway.id_tokens import google_id_tokens

DEFAULT_PORT = 8000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    p.add_argument("--config", required=True, help="config.json: model_name, tokenizer, nodes")
    p.add_argument("--port", type=int)
    p.add_argument("--host")
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a Jinja chat template for /v1/chat/completions instead of the model's own "
        "(default: $TANDEM_CHAT_TEMPLATE, else the one in the bundle)",
    )
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
        settings = FunctionSettings.from_env(DEFAULT_PORT, port=args.port, host=args.host)
        origins = cors_origins()
        id_tokens = google_id_tokens()
        chat = chat_override(args.chat_template or os.environ.get("TANDEM_CHAT_TEMPLATE") or None)
    except (ConfigError, SettingsError, ChatTemplateSyntaxError) as e:
        print(f"gateway: error: {e}", file=sys.stderr)
        return 2
    app = create_gateway_app(cfg, settings, cors_origins=origins, id_tokens=id_tokens, chat_template=chat)
    return serve(app, settings)


def chat_override(path: str | None) -> ChatOverride | None:
    """The template in FILE, checked now: a file that is missing or does not compile stops the
    gateway at start, not at the first chat request."""
    if path is None:
        return None
    try:
        source = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"--chat-template {path}: cannot read it ({e})") from None
    ChatTemplate.compile(source, origin=path)
    return ChatOverride(source, path)


if __name__ == "__main__":
    sys.exit(main())
