"""`python -m export` refuses every bad argument with one clear line (no traceback) and leaves
nothing behind; the tokenizer checks; the serving side never imports torch. (Each case is an
export process that imports torch and transformers before it refuses.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_export
from tests.helpers.procs import REPO_ROOT

pytestmark = pytest.mark.export


def _bad(args: list[str], *expected: str) -> None:
    r = run_export(*args, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for e in expected:
        assert e in r.stderr, r.stderr


def test_unknown_model_or_unreachable_hub(tmp_path: Path) -> None:
    env_before = dict(os.environ)
    os.environ["HF_HUB_OFFLINE"] = "1"  # what "unreachable" looks like, without waiting for DNS
    try:
        _bad(
            ["--model", "no-such-org/no-such-model", "--out", str(tmp_path / "x")],
            "--random-init",
            "no-such-org/no-such-model",
        )
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert not (tmp_path / "x").exists()


def test_not_gpt2(tmp_path: Path) -> None:
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    _bad(["--model", str(d), "--out", str(tmp_path / "x")], "'bert'", "GPT-2")


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        (["--stages", "7"], "between 1 and the number of layers (6)"),
        (["--stages", "0"], "between 1 and the number of layers"),
        (["--layers", "0:2,3:6"], "must cover layers 0..6 exactly"),
        (["--layers", "0:2,2:5"], "ends at 5"),
        (["--layers", "0:4,2:6"], "must cover layers"),
        (["--layers", "a:b"], "expected ranges like 0:4"),
    ],
)
def test_bad_splits(tiny_hf_dir: Path, tmp_path: Path, split: list[str], expected: str) -> None:
    _bad(["--model", str(tiny_hf_dir), "--out", str(tmp_path / "x"), *split], expected)


def test_bad_random_init_and_tokenizer(tmp_path: Path) -> None:
    _bad(["--random-init", "huge", "--out", str(tmp_path / "x")], "expected gpt2, tiny, or a config JSON")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model_type": "llama"}))
    _bad(["--random-init", str(cfg), "--out", str(tmp_path / "x")], "model_type must be gpt2")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "--random-init",
            "tiny",
            "--tokenizer",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "x"),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_cleanup_of_failed_build(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """A failing export leaves neither a bundle nor a temporary directory."""
    _bad(["--model", str(tiny_hf_dir), "--out", str(tmp_path / "x"), "--stages", "9"], "--stages 9")
    assert list(tmp_path.iterdir()) == []
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_tokenizer_smaller_than_the_model_is_refused(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """Every id the model can generate must decode: a model with more rows than its tokenizer has
    ids is refused before anything is exported."""
    d = tmp_path / "padded"
    shutil.copytree(tiny_hf_dir, d)
    config = json.loads((d / "config.json").read_text())
    tokens = config["vocab_size"]
    config["vocab_size"] = tokens + 64  # as if the embedding had been padded
    (d / "config.json").write_text(json.dumps(config))
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(d, ignore_mismatched_sizes=True).save_pretrained(d)
    _bad(
        ["--model", str(d), "--out", str(tmp_path / "x")],
        f"covers {tokens} ids",
        f"vocab_size is {tokens + 64}",
    )
