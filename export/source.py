"""Where the model comes from: a hub id or a local HF directory (random weights are written to a
local directory first: export/random_init.py), loaded as a causal LM of a supported family
(export/families.py), and its tokenizer.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from export.errors import ExportError

EOS = "<|endoftext|>"  # GPT-2's end of text: OpenAI's BPE files do not mark it special

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


def train_tokenizer(vocab_size: int, specials: list[str] | None = None) -> Any:
    """A byte-level BPE trained on the spot (used when no tokenizer is given offline); `specials`
    take the first ids."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(
        _corpus(),
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials or [EOS],
        show_progress=False,
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


def model_dir(model: str, revision: str | None) -> Path:
    """A local directory holding the model's config and tokenizer files: `model` itself when it is
    one, else the hub cache's copy of them (the hub probed first: an unreachable hub ends here)."""
    from export import hub

    path = Path(model)
    if path.is_dir():
        return path
    if path.suffix == ".json" or path.exists() or model.startswith((".", "/")):
        raise ExportError(
            f"--model {model}: not a model directory (a config.json file goes to --random-init)"
        )
    hub.require(model)
    return hub.small_files(model, revision)


def load_config(directory: Path) -> Any:
    """The model's transformers config, checked to be a family tandem splits."""
    from export.precheck import quick_check

    kind = str(quick_check(directory)["model_type"])  # what is certainly unsupported, in a blink
    from transformers import AutoConfig

    from export.families import check_config, refusal

    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(refusal(kind, f"cannot be read by transformers ({e})")) from None
    check_config(config)
    return config


def load_model(model: str, revision: str | None, config: Any) -> Any:
    """The causal LM (eager attention, float32, eval mode) from a hub id or a local directory."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(
            model, revision=revision, config=config, attn_implementation="eager", torch_dtype=torch.float32
        )
    except (OSError, ValueError) as e:
        raise ExportError(f"could not load the weights of {model!r}: {e}") from e
    return m.eval()  # type: ignore[no-untyped-call]


def load_model_tokenizer(directory: Path) -> Any:
    """The tokenizer that belongs to the model in `directory` (a model dir or the hub's snapshot)."""
    return load_tokenizer_path(directory)
