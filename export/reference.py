"""The monolithic baseline: the whole model exported by optimum (text-generation-with-past)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from functions.bundle import sha256_file


def export_reference(model_ref: str, revision: str | None, bundle: Path) -> dict[str, Any]:
    from optimum.exporters.onnx import main_export

    out = bundle / "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(
            model_ref,
            output=out,
            task="text-generation-with-past",
            revision=revision or "main",
            no_post_process=False,
        )
    files = {str(p.relative_to(bundle)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    return {
        "exporter": "optimum main_export, task text-generation-with-past",
        "file": "reference/model.onnx",
        "files": files,
    }
