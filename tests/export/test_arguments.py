"""`python -m export` refuses every bad argument with one clear line (no traceback) and leaves
nothing behind: an unreachable hub within 5 s, unsupported model kinds, bad splits and shapes; the
tokenizer's coverage of the vocabulary. (Each case is an export process that imports torch and
transformers before it refuses.)"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_export
from tests.helpers.procs import free_port

pytestmark = pytest.mark.export


def _bad(args: list[str], *expected: str) -> None:
    r = run_export(*args, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for e in expected:
        assert e in r.stderr, r.stderr


@contextlib.contextmanager
def _silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hub that hangs)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize("hub", ["refused", "hangs", "no-dns"])
def test_unreachable_hub_is_one_message_within_5_s(tmp_path: Path, hub: str) -> None:
    """No retries, no traceback: the export probes the hub once and names the offline options."""
    with contextlib.ExitStack() as stack:
        if hub == "refused":
            endpoint = f"http://127.0.0.1:{free_port()}"
        elif hub == "hangs":
            endpoint = f"http://127.0.0.1:{stack.enter_context(_silent_server())}"
        else:
            endpoint = "https://no-such-host.invalid"
        env = {**os.environ, "HF_ENDPOINT": endpoint}
        env.pop("HF_HUB_OFFLINE", None)
        t0 = time.monotonic()
        r = run_export(
            "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "x"), timeout=60, env=env
        )
        took = time.monotonic() - t0
    assert r.returncode == 2 and took < 5, (took, r.stdout + r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for part in ("'no-such-org/no-such-model'", "is unreachable", "--random-init FAMILY", "HF_HUB_OFFLINE=1"):
        assert part in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()


def test_offline_hub_and_model_not_cached(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1: the cache only, and a model not in it is one message naming the options."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    r = run_export("--model", "no-such-org/no-such-model", "--out", str(tmp_path / "x"), timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "not in the local Hugging Face cache" in r.stderr and "--random-init FAMILY" in r.stderr


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            {"model_type": "bert", "architectures": ["BertModel"]},
            "'bert' has no embed_tokens / layers / norm layout",
        ),
        ({"model_type": "t5", "is_encoder_decoder": True}, "'t5' is an encoder-decoder"),
        (
            {"model_type": "no-such-family"},
            "'no-such-family' is a model_type this transformers version does not know",
        ),
        ({"model_type": "granite", "embedding_multiplier": 12.0}, "an embedding multiplier"),
        ({"model_type": "mixtral", "num_local_experts": 8}, "'mixtral' has mixture-of-experts layers"),
    ],
)
def test_unsupported_kinds(tmp_path: Path, config: dict[str, object], expected: str) -> None:
    """An encoder, an encoder-decoder, an unknown model_type, a family that computes something at
    the model level: one message naming what is supported, exit 2, within 5 s."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    t0 = time.monotonic()
    _bad(["--model", str(d), "--out", str(tmp_path / "x")], expected, "llama (", "qwen2 (", "gemma (")
    assert time.monotonic() - t0 < 5


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
    _bad(["--random-init", "huge", "--out", str(tmp_path / "x")], "expected a shape (gpt2, tiny, llama,")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model_type": "bert"}))
    _bad(["--random-init", str(cfg), "--out", str(tmp_path / "x")], "'bert' has no embed_tokens")
    r = run_export(
        "--random-init", "tiny", "--tokenizer", str(tmp_path / "missing"), "--out", str(tmp_path / "x")
    )
    assert r.returncode == 2 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_cleanup_of_failed_build(tiny_hf_dir: Path, tmp_path: Path) -> None:
    """A failing export leaves neither a bundle nor a temporary directory."""
    _bad(["--model", str(tiny_hf_dir), "--out", str(tmp_path / "x"), "--stages", "9"], "--stages 9")
    assert list(tmp_path.iterdir()) == []
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_tokenizer_smaller_than_the_model_gains_fillers_and_a_larger_one_is_refused() -> None:
    """Every id the model can generate must decode: a vocabulary padded past the tokenizer (Qwen2.5's
    151,936 rows for 151,665 tokens) gets special filler tokens; a tokenizer with ids the model
    cannot embed is refused."""
    from export.errors import ExportError
    from export.source import train_tokenizer
    from export.tokenizer_meta import TokenizerInfo, cover

    tok = train_tokenizer(300)
    have = tok.get_vocab_size()
    info = TokenizerInfo(tok, [0], None, None, None, None, "test")
    cover(info, have + 64)
    assert info.fillers == 64 and tok.get_vocab_size() == have + 64
    assert tok.decode([have + 63], skip_special_tokens=False) == f"<|tandem_unused_{have + 63}|>"
    assert tok.encode("plain text").ids == train_tokenizer(300).encode("plain text").ids
    with pytest.raises(ExportError, match=f"has {have + 64} ids but the model's vocab_size is {have}"):
        cover(TokenizerInfo(tok, [], None, None, None, None, "test"), have)
