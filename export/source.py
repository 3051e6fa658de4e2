"""Where the model comes from: a hub id, a local HF directory, or seeded random weights.

Random weights are written to a local HF directory first, so they load through exactly the
same `from_pretrained` code as a downloaded model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from export.errors import ExportError

# A wider init than GPT-2's 0.02 makes greedy output vary from step to step, so parity tests
# on the tiny model compare something (at 0.02 it repeats one token).
TINY = dict(n_layer=6, n_embd=64, n_head=4, n_positions=1024, initializer_range=0.3)
EOS = "<|endoftext|>"

_WORDS = (
    "the a model token stage pipeline gateway layer cache batch sequence function request stream "
    "quick brown fox jumps over lazy dog hello world how are you today tensor split serve fast "
    "café naïve déjà vu 東京 日本語 über straße emoji 🙂 🚀 ünïcödé ± × ÷ → ∞"
).split()


def _corpus(lines: int = 4000, seed: int = 0) -> list[str]:
    """A deterministic pseudo-text with ASCII and multi-byte characters, for training a BPE."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return out


def train_tokenizer(vocab_size: int) -> object:
    """A byte-level BPE trained on the spot (used when no tokenizer is given offline)."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        _corpus(), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    return tok


def load_tokenizer_path(path: Path) -> Any:
    """A tokenizer.json file, or a directory with vocab.json + merges.txt (or the equivalent
    encoder.json + vocab.bpe of OpenAI's original GPT-2 release)."""
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    if path.is_file():
        return Tokenizer.from_file(str(path))
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    for vocab, merges in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
        if (path / vocab).is_file() and (path / merges).is_file():
            tok = ByteLevelBPETokenizer.from_file(str(path / vocab), str(path / merges))
            if tok.token_to_id(EOS) is None:
                tok.add_special_tokens([EOS])
            return tok
    raise ExportError(
        f"--tokenizer {path}: expected a tokenizer.json, or a directory with vocab.json + "
        "merges.txt (or encoder.json + vocab.bpe)"
    )


def make_random_model(kind: str, out_dir: Path, tokenizer_path: Path | None, seed: int = 0) -> str:
    """Write a GPT-2-architecture HF model with seeded random weights (and its tokenizer) to
    out_dir; returns a line saying where the tokenizer came from."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if kind == "gpt2":
        overrides: dict[str, Any] = {}
    elif kind == "tiny":
        overrides = dict(TINY)
    else:
        cfg_path = Path(kind)
        if not cfg_path.is_file():
            raise ExportError(f"--random-init {kind}: expected gpt2, tiny, or a config JSON file")
        try:
            overrides = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise ExportError(f"--random-init {kind}: not valid JSON ({e})") from e
        if overrides.get("model_type", "gpt2") != "gpt2":
            raise ExportError(f"--random-init {kind}: model_type must be gpt2")
        overrides.pop("model_type", None)

    if tokenizer_path is not None:
        tok = load_tokenizer_path(tokenizer_path)
        how = f"tokenizer from {tokenizer_path}"
    else:
        tok = train_tokenizer(1000 if kind == "tiny" else 8000)
        how = "tokenizer: byte-level BPE trained on the spot (no --tokenizer given)"
    tok_vocab = tok.get_vocab_size()
    if "vocab_size" not in overrides:
        # The model takes the tokenizer's size: every id it can generate then decodes to text. With
        # the real GPT-2 BPE that is GPT-2's 50,257; with a BPE trained on the spot it is smaller
        # (a 50,257-row model over a 520-token BPE generated ids that decode to nothing).
        overrides["vocab_size"] = tok_vocab
    if tok_vocab > overrides["vocab_size"]:
        raise ExportError(
            f"the tokenizer has {tok_vocab} tokens but the model only {overrides['vocab_size']}"
        )
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise ExportError(f"the tokenizer has no {EOS} token")
    config = GPT2Config(**overrides, bos_token_id=eos, eos_token_id=eos)  # type: ignore[no-untyped-call]
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)  # type: ignore[no-untyped-call]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    return how


def load_model(model: str, revision: str | None) -> Any:
    """Load a GPT-2 LM (eager attention, eval mode) from a hub id or a local directory."""
    from transformers import AutoConfig, GPT2LMHeadModel

    local = Path(model).is_dir()
    try:
        config = AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as e:
        if local:
            raise ExportError(f"{model} is not a Hugging Face model directory: {e}") from e
        raise ExportError(
            f"could not load {model!r} from the Hugging Face hub (unknown model id, or the hub is "
            "unreachable). To work offline use --random-init gpt2 (random weights, real GPT-2 "
            "shapes), or pass a local model directory to --model."
        ) from e
    if config.model_type != "gpt2":
        raise ExportError(
            f"{model} is a {config.model_type!r} model; tandem exports GPT-2-architecture models only"
        )
    m = GPT2LMHeadModel.from_pretrained(model, revision=revision, attn_implementation="eager")
    return m.eval()


def load_model_tokenizer(model: str, revision: str | None) -> Any:
    """The tokenizer that belongs to the model (hub or local directory)."""
    from tokenizers import Tokenizer

    path = Path(model)
    if path.is_dir():
        return load_tokenizer_path(path)
    try:
        return Tokenizer.from_pretrained(model, revision=revision or "main")
    except Exception as e:  # the tokenizers library raises plain Exceptions for hub failures
        raise ExportError(f"could not fetch the tokenizer of {model!r}: {e}") from e
