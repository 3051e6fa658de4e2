"""Where a bundle ends: the progress log, the up-to-date check that makes a re-run a no-op, and the
atomic swap that never leaves a half-written bundle in place."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from functions.bundle import MANIFEST, BundleError, load_manifest, verify_files


def log(msg: str) -> None:
    print(f"[export] {msg}", flush=True)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in (
        "torch",
        "transformers",
        "onnx",
        "onnxruntime",
        "onnxscript",
        "optimum",
        "optimum-onnx",
        "tokenizers",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def up_to_date(out: Path, export_args: dict[str, Any]) -> bool:
    """True when `out` is an intact bundle built with the same arguments; says why otherwise."""
    if not (out / MANIFEST).exists():
        if out.exists() and any(out.iterdir()):
            log(f"{out} exists but has no manifest: partial bundle, rebuilding")
        return False
    try:
        m = load_manifest(out)
    except BundleError as e:
        log(f"{e}; rebuilding")
        return False
    if m.head is None:
        log("bundle predates the scoring head (echo + logprobs); rebuilding")
        return False
    want = dict(export_args)
    if m.export_args.get("with_reference") and not want.get("with_reference"):
        want["with_reference"] = True  # a bundle with the reference serves a run without it too
    if m.export_args != want:
        log("bundle was built with other arguments; rebuilding")
        return False
    problems = verify_files(out, m)
    if problems:
        log(f"bundle is corrupt ({'; '.join(problems)}); rebuilding")
        return False
    return True


def publish(tmp: Path, out: Path) -> None:
    """Swap the finished bundle into place so `out` is never half-written."""
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.chmod(0o755)  # mkdtemp made it private
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
