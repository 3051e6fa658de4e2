"""Tiny exported bundles, each built once and shared: by every test of a run, by every pytest-xdist
worker of it (a file lock per entry: the first worker to ask exports, the others wait for it), and
by later runs on the same code (entries live under a hash of everything that shapes a bundle).

An entry is the real `python -m export` run on a tiny random-weight model written as a local HF
directory (`from_pretrained` on it, as on a download). Before an entry is handed out its files are
checked against the manifest's sha256 (milliseconds): one that a test changed is exported again.
Tests that change a bundle work on a copy (shutil.copytree); tests of the export itself run it
into their own tmp_path.

Where: TANDEM_TEST_CACHE if set (a directory; `off` keeps the entries in this run's temporary
directory only), else .tandem/test-cache in the checkout (`make clean` removes it).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tests.helpers.procs import REPO_ROOT

CACHE_ENV = "TANDEM_TEST_CACHE"
DEFAULT_ROOT = REPO_ROOT / ".tandem" / "test-cache"
# what a bundle depends on besides the export's arguments: the code that makes one, and the pins
HASHED = ("export", "functions", "requirements/export.txt", "requirements/serve-common.txt")
PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxscript", "onnxruntime")
TINY_LAYERS = "0:2,2:4,4:6"  # the tiny GPT-2's 6 layers, 2 per stage (tiny_bundle's split)
STALE_S = 24 * 3600  # entries of other code versions are removed once this old


def _tiny_gpt2(directory: Path) -> None:
    from export.random_init import make_random_model

    make_random_model("tiny", directory, None, seed=0)


# family -> writes that family's tiny random-weight model (config + weights + tokenizer) into a
# directory, as save_pretrained does; a new family adds its writer here
TINY_MODELS: dict[str, Callable[[Path], None]] = {"gpt2": _tiny_gpt2}


def run_export(
    *args: str, timeout: float = 300, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m export ARGS` in the repository root, output captured (`env`: its whole
    environment, else this process's)."""
    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def code_hash() -> str:
    """sha256 of the sources and pins that shape a bundle, and of this file (16 hex digits)."""
    h = hashlib.sha256()
    files = [Path(__file__)]
    for rel in HASHED:
        path = REPO_ROOT / rel
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(REPO_ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    for pkg in PACKAGES:
        try:
            h.update(f"{pkg}=={md.version(pkg)}\0".encode())
        except md.PackageNotFoundError:
            h.update(f"{pkg} absent\0".encode())
    return h.hexdigest()[:16]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created), across processes; released on exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def intact(bundle: Path) -> bool:
    """A complete bundle whose every file matches the manifest's sha256."""
    from functions.bundle import BundleError, load_manifest, verify_files

    try:
        return verify_files(bundle, load_manifest(bundle)) == []
    except (BundleError, OSError, ValueError):
        return False


class ExportCache:
    """Exported tiny bundles by (family, stages or layers, export options); see the module doc."""

    def __init__(self, root: Path):
        self.root = root / code_hash()
        self.root.mkdir(parents=True, exist_ok=True)
        self._prune(root)

    def _prune(self, root: Path) -> None:
        """Remove other code versions' entries once they are a day old (the current run's code
        owns this directory; a day leaves any other run that is still going alone)."""
        for d in root.iterdir():
            if d.is_dir() and d != self.root and time.time() - d.stat().st_mtime > STALE_S:
                shutil.rmtree(d, ignore_errors=True)

    def hf_dir(self, family: str = "gpt2") -> Path:
        """The tiny random-weight `family` model as a local HF directory named `family`."""
        if family not in TINY_MODELS:
            raise KeyError(f"no tiny {family!r} model: add its writer to TINY_MODELS in {__name__}")
        # the folder's name is the bundle's model name (functions.bundle.short_name)
        out, done = self.root / "hf" / family, self.root / "hf" / f"{family}.complete"
        with locked(self.root / "hf" / f"{family}.lock"):
            if not done.is_file():
                shutil.rmtree(out, ignore_errors=True)
                TINY_MODELS[family](out)
                done.touch()
        return out

    def bundle(
        self, family: str = "gpt2", stages: int | None = 3, *options: str, layers: str | None = None
    ) -> Path:
        """The tiny `family` model exported with `--stages stages` (or `--layers layers`) and
        `options` (e.g. "--with-reference", "--quantize", "int8"); parity verified by the export."""
        split = ["--layers", layers] if layers else ["--stages", str(stages)] if stages else []
        args = [*split, *options]
        key = hashlib.sha256(json.dumps([family, args]).encode()).hexdigest()[:12]
        name = f"{family}-{'-'.join(a.lstrip('-') for a in args)}"[:60] + f"-{key}"
        out = self.root / name
        with locked(self.root / f"{name}.lock"):
            if not intact(out):
                shutil.rmtree(out, ignore_errors=True)
                r = run_export("--model", str(self.hf_dir(family)), "--out", str(out), *args)
                assert r.returncode == 0, f"export of {name} failed:\n{r.stdout}{r.stderr}"
        return out


def cache_root(run_dir: Path) -> Path:
    """Where the cache lives for this run (`run_dir`: the run's temporary directory, shared by its
    xdist workers), from TANDEM_TEST_CACHE."""
    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen.lower() == "off":
        return run_dir / "export-cache"
    return Path(chosen) if chosen else DEFAULT_ROOT
