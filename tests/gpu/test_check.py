"""The GPU check command runs here too (tests/gpu/check.py): on a machine without a GPU it says
so in one line and exits 0, so the command cannot rot unseen between GPU sessions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.gpu.check import skip_reason
from tests.helpers.procs import REPO_ROOT


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "tests.gpu.check", *args]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(skip_reason() is None, reason="a GPU is here: run python -m tests.gpu.check itself")
def test_without_a_gpu_the_check_skips_with_one_line() -> None:
    r = _check("--size", "tiny")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu check: skipped: "), r.stdout
    assert lines[0] == f"gpu check: skipped: {skip_reason()}"
    assert "Traceback" not in r.stderr


def test_a_bad_argument_is_refused_before_anything_runs() -> None:
    r = _check("--size", "huge")
    assert r.returncode == 2 and "invalid choice: 'huge'" in r.stderr, r.stderr
