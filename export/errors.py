"""The one error the export command reports as a single clear line (exit status 2), and the JSON
input reader that raises it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ExportError(Exception):
    """Bad arguments, an unusable model, or a failed parity check."""


def read_json(path: Path) -> Any:
    """A JSON file's contents; ExportError naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from e
