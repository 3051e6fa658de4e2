"""export/job.py, the export as a deployment's one-shot step: its arguments from the environment,
a usable bundle kept as it is, and any other (missing, broken, another stage count) re-exported."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from export import job
from functions.settings import SettingsError


def test_arguments_come_from_the_environment(tmp_path: Path) -> None:
    out = str(tmp_path / "b")
    assert job.export_args({"TANDEM_EXPORT_OUT": out}) == (
        Path(out),
        3,
        ["--model", "gpt2", "--out", out, "--stages", "3"],
    )
    env = {"TANDEM_EXPORT_OUT": out, "TANDEM_EXPORT_MODEL": "distilgpt2", "TANDEM_EXPORT_STAGES": "4"}
    assert job.export_args(env)[2] == ["--model", "distilgpt2", "--out", out, "--stages", "4"]
    env |= {"TANDEM_EXPORT_RANDOM_INIT": "tiny"}  # offline: random weights instead of the hub
    assert job.export_args(env)[2] == ["--random-init", "tiny", "--out", out, "--stages", "4"]
    with pytest.raises(SettingsError, match="TANDEM_EXPORT_OUT"):
        job.export_args({})
    with pytest.raises(SettingsError, match="TANDEM_EXPORT_STAGES"):
        job.export_args({"TANDEM_EXPORT_OUT": out, "TANDEM_EXPORT_STAGES": "0"})
    assert job.main({}) == 2


def test_a_usable_bundle_is_kept_and_any_other_is_not(
    tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    assert job.usable(out, 3) == f"no bundle at {out} yet"
    shutil.copytree(tiny_bundle, out)
    assert job.usable(out, 3) is None
    assert job.main({"TANDEM_EXPORT_OUT": str(out), "TANDEM_EXPORT_MODEL": "not-this-one"}) == 0
    assert "keeping the bundle" in capsys.readouterr().out  # nothing exported: the hub is not asked
    assert job.usable(out, 2) == f"{out} has 3 stages, the deployment runs 2"
    (out / "stage2.onnx").write_bytes(b"broken")
    assert "stage2.onnx does not match its sha256" in str(job.usable(out, 3))
    (out / "manifest.json").write_text("{")
    assert "not readable JSON" in str(job.usable(out, 3))
