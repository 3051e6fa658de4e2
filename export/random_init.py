"""Seeded random weights of a named shape (`--random-init FAMILY`, `FAMILY-tiny`) or of a config
JSON file of any supported family, written as a local model directory with a tokenizer that needs
no hub, so it loads through exactly the same `from_pretrained` code as a downloaded model.

Real-size shapes keep the real vocabulary size (the LM head's cost is what a benchmark measures):
the tokenizer is a byte-level BPE trained on the spot (or the one given) whose ids are padded with
filler tokens up to the model's vocabulary, so any sampled id decodes. GPT-2 shapes take the
tokenizer's own size instead, as before (with OpenAI's BPE that is GPT-2's 50,257).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from export.errors import ExportError

# A wider init than the usual 0.02 makes greedy output vary from step to step, so parity tests on
# tiny shapes compare something (at 0.02 a tiny model repeats one token).
TINY_INIT = 0.3
_TINY = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=256, initializer_range=TINY_INIT,
)  # fmt: skip
# name -> (model_type, config overrides). Tiny shapes turn each family's quirks on: q/k/v bias and
# tied embeddings (qwen2), a sliding window shorter than a test's sequence (qwen2, mistral, gemma2),
# an explicit head_dim (gemma), heads > KV heads (all).
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", {}),  # GPT-2 124M
    "tiny": ("gpt2", dict(n_layer=6, n_embd=64, n_head=4, n_positions=1024, initializer_range=TINY_INIT)),
    "llama": ("llama", dict(  # SmolLM2-135M
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(  # Qwen2.5-0.5B
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(  # Mistral-7B-v0.1 (29 GB of float32 weights)
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768, sliding_window=4096)),
    "phi3": ("phi3", dict(  # Phi-3-mini-4k (15 GB)
        hidden_size=3072, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=8192, vocab_size=32064, max_position_embeddings=4096, sliding_window=2047)),
    "gemma": ("gemma", dict(  # Gemma-2B (10 GB)
        hidden_size=2048, num_hidden_layers=18, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
        intermediate_size=16384, vocab_size=256000, max_position_embeddings=8192)),
    "gemma2": ("gemma2", dict(  # Gemma-2-2B (10 GB)
        hidden_size=2304, num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        intermediate_size=9216, vocab_size=256000, max_position_embeddings=8192, sliding_window=4096)),
    "llama-tiny": ("llama", dict(_TINY)),
    "qwen2-tiny": ("qwen2", dict(_TINY, tie_word_embeddings=True, use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    "mistral-tiny": ("mistral", dict(_TINY, sliding_window=8)),
    "phi3-tiny": ("phi3", dict(_TINY)),
    "gemma-tiny": ("gemma", dict(_TINY, head_dim=32, tie_word_embeddings=True)),
    "gemma2-tiny": ("gemma2", dict(_TINY, head_dim=32, sliding_window=8, final_logit_softcapping=30.0)),
}  # fmt: skip
ALIASES = {"gpt2-tiny": "tiny"}
# special tokens of a trained tokenizer, at ids 0, 1, 2 (as SmolLM2 has them); both <|endoftext|>
# and <|im_end|> end a sequence, so a random-init bundle carries a list of EOS ids
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GPT2_EOS = "<|endoftext|>"


def names() -> str:
    return ", ".join([*SHAPES, *ALIASES])


def resolve(kind: str) -> tuple[str, dict[str, Any]]:
    """(model_type, config fields) of a shape name or a config JSON file."""
    kind = ALIASES.get(kind, kind)
    if kind in SHAPES:
        model_type, fields = SHAPES[kind]
        return model_type, dict(fields)
    path = Path(kind)
    if not path.is_file():
        raise ExportError(f"--random-init {kind}: expected a shape ({names()}) or a config JSON file")
    try:
        fields = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"--random-init {kind}: not valid JSON ({e})") from e
    if not isinstance(fields, dict):
        raise ExportError(f"--random-init {kind}: expected a JSON object of config fields")
    fields.pop("architectures", None)
    return str(fields.pop("model_type", "gpt2")), fields


def _tokenizer(model_type: str, given: Path | None, vocab_size: int | None) -> tuple[Any, str]:
    from export.source import load_tokenizer_path, train_tokenizer

    if given is not None:
        return load_tokenizer_path(given), f"tokenizer from {given}"
    specials = [GPT2_EOS] if model_type == "gpt2" else SPECIALS
    size = 1000 if vocab_size is None or vocab_size <= 4096 else 8000
    tok = train_tokenizer(min(size, vocab_size or size), specials)
    return tok, "tokenizer: byte-level BPE trained on the spot (no --tokenizer given)"


def _special_ids(tok: Any, model_type: str) -> dict[str, Any]:
    """The config's and generation config's special ids, and tokenizer_config.json's strings."""
    if model_type == "gpt2":
        eos = tok.token_to_id(GPT2_EOS)
        if eos is None:
            raise ExportError(f"the tokenizer has no {GPT2_EOS} token")
        return {"bos_token_id": eos, "eos_token_id": eos, "bos": GPT2_EOS, "eos": GPT2_EOS, "gen_eos": eos}
    ids = [tok.token_to_id(t) for t in SPECIALS]
    if None in ids:  # a given tokenizer without them: its own end of text, or none
        end = tok.token_to_id(GPT2_EOS)
        return {"bos_token_id": end, "eos_token_id": end, "bos": None, "eos": None, "gen_eos": end}
    return {
        "bos_token_id": ids[0],
        "eos_token_id": ids[2],
        "bos": SPECIALS[0],
        "eos": SPECIALS[2],
        "gen_eos": [ids[2], ids[0]],
    }


def _pad_vocab(tok: Any, size: int) -> Any:
    """The BPE with vocabulary entries up to `size` that no merge produces: they decode (to their
    own name) but text never encodes to them. Entries of the model's vocabulary rather than added
    tokens, so tokenizer.json stays a few MB at Qwen2.5's 151,936 ids."""
    from tokenizers import Tokenizer

    from export.tokenizer_meta import FILLER

    doc = json.loads(tok.to_str())
    vocab = doc["model"]["vocab"]
    for i in range(tok.get_vocab_size(), size):
        vocab[FILLER.format(i)] = i
    return Tokenizer.from_str(json.dumps(doc))


def make_random_model(kind: str, out_dir: Path, tokenizer_path: Path | None, seed: int = 0) -> str:
    """Write a model of shape `kind` with seeded random weights (and its tokenizer) to out_dir;
    returns a line saying where the tokenizer came from."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from export.families import check_config

    model_type, fields = resolve(kind)
    tok, how = _tokenizer(model_type, tokenizer_path, fields.get("vocab_size"))
    have = tok.get_vocab_size()
    if "vocab_size" not in fields:
        # the model takes the tokenizer's size: every id it can generate decodes to text
        fields["vocab_size"] = have
    if have > fields["vocab_size"]:
        raise ExportError(f"the tokenizer has {have} tokens but the model only {fields['vocab_size']}")
    if have < fields["vocab_size"]:
        tok = _pad_vocab(tok, fields["vocab_size"])
        how += f"; {fields['vocab_size'] - have} filler tokens up to the model's vocabulary of {fields['vocab_size']}"
    special = _special_ids(tok, model_type)
    ids = {k: special[k] for k in ("bos_token_id", "eos_token_id")}
    try:
        config = AutoConfig.for_model(model_type, **fields, **ids, pad_token_id=ids["eos_token_id"])
    except (ValueError, TypeError) as e:
        raise ExportError(f"--random-init {kind}: {e}") from e
    check_config(config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids["bos_token_id"], eos_token_id=special["gen_eos"]
    ).save_pretrained(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    tok_config = {"bos_token": special["bos"], "eos_token": special["eos"]}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return how
