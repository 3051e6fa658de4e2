"""`python -m functions.healthcheck PATH`: exit 0 when this container's service answers 200 on PATH
(its readiness route), else 1 with the reason on stderr. Docker's HEALTHCHECK runs it: the serving
images have no curl, and the port comes from `PORT` like the service's own. Standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0


def check(path: str, port: int, host: str = "127.0.0.1") -> str | None:
    """None when http://host:port/path answers 200, else why not."""
    url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return None if response.status == 200 else f"{url} answered {response.status}"
    except urllib.error.HTTPError as e:
        return f"{url} answered {e.code}: {e.read(300).decode(errors='replace')}"
    except (OSError, ValueError) as e:
        return f"{url}: {e}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].startswith("/"):
        print("usage: python -m functions.healthcheck /path (the port is $PORT)", file=sys.stderr)
        return 2
    raw = os.environ.get("PORT", "").strip()
    if not raw.isdigit():
        print(f"healthcheck: PORT must be set to the service's port, got {raw!r}", file=sys.stderr)
        return 2
    problem = check(args[0], int(raw))
    if problem:
        print(f"healthcheck: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
