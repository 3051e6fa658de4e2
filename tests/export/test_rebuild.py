"""`python -m export` run again on its own bundle: an explicit --layers split exported once, then
left alone when up to date, and rebuilt when a file is corrupt or the manifest is gone (three full
exports: the rebuilds are what is tested)."""

from __future__ import annotations

from pathlib import Path

import pytest

from functions.bundle import load_manifest, verify_files
from tests.conftest import run_export
from tests.export.test_export import _check_parity

pytestmark = [pytest.mark.export, pytest.mark.timeout(900)]  # three exports: minutes on a busy host


def test_explicit_split_idempotent_rerun_and_corruption(tiny_hf_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    args = ("--model", str(tiny_hf_dir), "--out", str(out), "--layers", "0:1,1:5,5:6")
    r = run_export(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    _check_parity(out, 3, [[0, 1], [1, 5], [5, 6]])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = run_export(*args)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert "stage-1" not in again.stdout  # nothing was exported
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # flip one byte in the middle of a stage file: detected and rebuilt
    p = out / "stage2.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    assert verify_files(out, load_manifest(out)) == ["stage2.onnx does not match its sha256 in the manifest"]
    fixed = run_export(*args)
    assert fixed.returncode == 0, fixed.stderr
    assert "corrupt" in fixed.stdout and "stage2.onnx" in fixed.stdout
    assert verify_files(out, load_manifest(out)) == []

    # a partial bundle (manifest gone) is rebuilt too, and no temporary directory is left behind
    (out / "manifest.json").unlink()
    partial = run_export(*args)
    assert partial.returncode == 0 and "partial bundle" in partial.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
