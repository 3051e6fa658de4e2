"""`python -m gateway --config config.json [--port P] [--host H]`: the tandem gateway."""

from __future__ import annotations

import argparse
import sys

from functions.process import serve
from functions.settings import FunctionSettings, SettingsError
from gateway.app import create_gateway_app
from gateway.config import ConfigError, load_config
from gateway.cors import cors_origins
from gateway.id_tokens import google_id_tokens

DEFAULT_PORT = 8000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    p.add_argument("--config", required=True, help="config.json: model_name, tokenizer, nodes")
    p.add_argument("--port", type=int)
    p.add_argument("--host")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
        settings = FunctionSettings.from_env(DEFAULT_PORT, port=args.port, host=args.host)
        origins = cors_origins()
        id_tokens = google_id_tokens()
    except (ConfigError, SettingsError) as e:
        print(f"gateway: error: {e}", file=sys.stderr)
        return 2
    return serve(create_gateway_app(cfg, settings, cors_origins=origins, id_tokens=id_tokens), settings)


if __name__ == "__main__":
    sys.exit(main())
