"""A model directory refused before transformers loads: importing it (and torch with it) takes
seconds, so what is certainly unsupported (no config, an encoder-decoder, a model_type transformers
does not know, a config class without the decoder layout, a model-level computation tandem does not
rebuild) is told from config.json and transformers' own source files, read as text.

Whatever this cannot decide goes on to the full check (export/families.py check_config).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

from export.errors import ExportError, read_json
from export.families import EXPERTS, NAMED, refusal


def _transformers_dir() -> Path | None:
    spec = importlib.util.find_spec("transformers")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def known_types(root: Path) -> set[str] | None:
    """The model types transformers' AutoConfig knows, from its source (None if unreadable)."""
    try:
        text = (root / "models" / "auto" / "configuration_auto.py").read_text()
    except OSError:
        return None
    start = text.find("CONFIG_MAPPING_NAMES")
    end = text.find("\n)", start)
    if start < 0 or end < 0:
        return None
    return set(re.findall(r'\(\s*"([^"]+)",\s*"\w+"\s*\)', text[start:end])) or None


def has_layout(root: Path, model_type: str) -> bool | None:
    """Whether the family's config class declares the embed_tokens / layers / norm layout; None
    when its module is not where the model type's name says."""
    name = model_type.replace("-", "_")
    path = root / "models" / name / f"configuration_{name}.py"
    if not path.is_file():
        return None
    text = path.read_text()
    plan = text.find("base_model_pp_plan")
    return plan >= 0 and all(f'"{k}"' in text[plan : plan + 600] for k in ("embed_tokens", "layers", "norm"))


def quick_check(directory: Path) -> dict[str, Any]:
    """config.json of a local model directory, refused at once when it is certainly unsupported."""
    path = directory / "config.json"
    if not path.is_file():
        raise ExportError(f"{directory} is not a Hugging Face model directory: it has no config.json")
    config = read_json(path)
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ExportError(refusal("unknown", f"{path} names no model_type"))
    kind = str(config["model_type"])
    if config.get("is_encoder_decoder"):
        raise ExportError(refusal(kind, "is an encoder-decoder model"))
    fields = refusal_for_fields(kind, config)
    if fields:
        raise ExportError(fields)
    root = _transformers_dir()
    if kind in NAMED or root is None:
        return config
    known = known_types(root)
    if known is not None and kind not in known:
        raise ExportError(refusal(kind, "is a model_type this transformers version does not know"))
    if has_layout(root, kind) is False:
        raise ExportError(refusal(kind, "has no embed_tokens / layers / norm layout to split (an encoder?)"))
    return config


def refusal_for_fields(kind: str, config: dict[str, Any]) -> str | None:
    """The refusal for config fields that mean a model-level computation, or None."""
    from export.families import MODEL_LEVEL

    for name, what in MODEL_LEVEL.items():
        if config.get(name) not in (None, 1, 1.0, False, 0):
            return refusal(
                kind, f"computes {what} at the model level ({name}), which tandem does not rebuild"
            )
    if any(isinstance(config.get(n), int) and config[n] > 1 for n in EXPERTS):
        return refusal(kind, "has mixture-of-experts layers (their routing cannot be exported as a graph)")
    return None
