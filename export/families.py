"""Which decoder-only families the export splits, and where each keeps its parts.

A causal LM is split by its layout (as transformers' `base_model_pp_plan` names it): the token
embedding, the list of decoder layers, the final norm, plus the LM head. What a model computes once
for all its layers is rebuilt in every stage (export/stages.py): position ids, the rotary tables,
the causal and sliding-window masks. A family needs code here only for what it adds at the model
level: GPT-2's learned positions, Gemma's embedding scale, Gemma 2's final logit soft-cap.

Any other `model_type` with the same layout and nothing at the model level is accepted as it is
(the export's parity check against PyTorch then vouches for it); config fields that mean a
model-level computation tandem does not rebuild are refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from export.errors import ExportError

# model_type -> what its checkpoints are called, for messages and the README
NAMED = {
    "gpt2": "GPT-2",
    "llama": "Llama 2/3.x, TinyLlama, SmolLM2",
    "qwen2": "Qwen2 / Qwen2.5",
    "mistral": "Mistral (sliding window)",
    "phi3": "Phi-3 / Phi-3.5",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
}
EMBED_SCALED = {"gemma", "gemma2"}  # the embedding output is multiplied by sqrt(hidden_size)
# config fields whose non-default value means something computed at the model level (or a layer
# layout) that the stage wrapper does not rebuild: refused rather than exported wrong
MODEL_LEVEL = {
    "embedding_multiplier": "an embedding multiplier",
    "logits_scaling": "a logits scaling",
    "logit_scale": "a logit scale",
    "rope_local_base_freq": "a second (local) rotary embedding",
    "attention_chunk_size": "chunked attention",
    "no_rope_layer_interval": "layers without rotary positions",
}
LAYER_TYPES = {"full_attention", "sliding_attention"}
# a mixture of experts routes each token with a data-dependent loop that torch.export cannot trace
EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts")
SUPPORTED = "; ".join(f"{k} ({v})" for k, v in NAMED.items())


@dataclass(frozen=True)
class Shape:
    """The config fields the stages and the serving side need, family-independent."""

    family: str  # the config's model_type
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    vocab_size: int
    # per layer: the sliding window (attend to the last `window` positions) or None (full)
    windows: list[int | None] = field(default_factory=list)
    tied: bool = False  # the LM head is the token embedding matrix
    logit_softcap: float | None = None
    rope: str | None = None  # the rotary scaling type, None for plain RoPE or none at all

    @property
    def sliding_window(self) -> int | None:
        ws = [w for w in self.windows if w is not None]
        return max(ws) if ws else None

    def manifest(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_positions": self.max_positions,
            "vocab_size": self.vocab_size,
            "sliding_window": self.sliding_window,
            "layer_windows": self.windows,
            "tie_word_embeddings": self.tied,
            "final_logit_softcapping": self.logit_softcap,
            "rope_scaling": self.rope,
        }


def refusal(kind: str, why: str) -> str:
    """The one message for a model tandem does not split: what it is, and what is supported."""
    return (
        f"{kind!r} {why}; tandem splits decoder-only causal LMs: {SUPPORTED}, and other families with the "
        "same layout (embedding, decoder layers, final norm) that compute nothing else at the model level"
    )


def check_config(cfg: Any) -> None:
    """Refuse, with one message naming what is supported, a config the split cannot serve."""
    kind = getattr(cfg, "model_type", None) or "unknown"
    if kind == "gpt2":
        return
    if getattr(cfg, "is_encoder_decoder", False):
        raise ExportError(refusal(kind, "is an encoder-decoder model"))
    plan = getattr(cfg, "base_model_pp_plan", None) or {}
    if not {"embed_tokens", "layers", "norm"} <= set(plan):
        raise ExportError(refusal(kind, "has no embed_tokens / layers / norm layout to split (an encoder?)"))
    for name, what in MODEL_LEVEL.items():
        if getattr(cfg, name, None) not in (None, 1, 1.0, False, 0):
            raise ExportError(
                refusal(kind, f"computes {what} at the model level ({name}), which tandem does not rebuild")
            )
    if any((getattr(cfg, name, None) or 0) > 1 for name in EXPERTS):
        raise ExportError(
            refusal(kind, "has mixture-of-experts layers (their routing cannot be exported as a graph)")
        )
    odd = set(getattr(cfg, "layer_types", None) or []) - LAYER_TYPES
    if odd:
        raise ExportError(
            refusal(
                kind, f"has layer types {sorted(odd)} (tandem rebuilds full and sliding-window attention)"
            )
        )
    if getattr(cfg, "final_logit_softcapping", None) and kind not in NAMED:
        raise ExportError(refusal(kind, "soft-caps its final logits (tandem does that for gemma2)"))


def layer_windows(cfg: Any) -> list[int | None]:
    """Each layer's sliding window: by `layer_types` where the config has them (Qwen2, Gemma 2), else
    the one `sliding_window` on every layer (Mistral, Phi-3), else None (full attention)."""
    n = int(cfg.num_hidden_layers if cfg.model_type != "gpt2" else cfg.n_layer)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types:
        return [int(window) if t == "sliding_attention" and window else None for t in types]
    return [int(window) if window else None] * n


def shape_of(cfg: Any) -> Shape:
    """The family-independent view of a transformers config (checked with `check_config` first)."""
    if cfg.model_type == "gpt2":
        return Shape(
            "gpt2",
            cfg.n_embd,
            cfg.n_layer,
            cfg.n_head,
            cfg.n_head,
            cfg.n_embd // cfg.n_head,
            cfg.n_positions,
            cfg.vocab_size,
            [None] * cfg.n_layer,
            bool(cfg.tie_word_embeddings),
        )
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = (getattr(cfg, "rope_scaling", None) or {}).get("rope_type") or (
        getattr(cfg, "rope_scaling", None) or {}
    ).get("type")
    max_positions = int(cfg.max_position_embeddings)
    if rope == "longrope":
        # the long factors switch in past the original context (per batch, in PyTorch): serve the
        # original context, where the short factors are exactly what PyTorch computes
        max_positions = int(getattr(cfg, "original_max_position_embeddings", None) or max_positions)
    return Shape(
        cfg.model_type,
        int(cfg.hidden_size),
        int(cfg.num_hidden_layers),
        heads,
        int(getattr(cfg, "num_key_value_heads", None) or heads),
        int(head_dim),
        max_positions,
        int(cfg.vocab_size),
        layer_windows(cfg),
        bool(getattr(cfg, "tie_word_embeddings", False)),
        getattr(cfg, "final_logit_softcapping", None),
        rope,
    )


@dataclass
class Parts:
    """A loaded causal LM's parts, as the stage wrapper and the scoring head use them."""

    shape: Shape
    embed: Any  # nn.Embedding: token ids -> (B, S, C)
    layers: Any  # nn.ModuleList of decoder layers
    norm: Any  # the final norm
    lm_head: Any  # nn.Linear C -> V
    positions: Any = None  # GPT-2's learned position embedding
    rotary: Any = None  # the model-level rotary embedding: (hidden, position_ids) -> (cos, sin)
    embed_scale: float | None = None  # Gemma: sqrt(hidden_size)
    # GPT-2's blocks apply causality themselves: the stage passes only the padding bias
    causal_in_layers: bool = False
    config: Any = None  # the transformers config the layers read (their attention implementation)

    def rotary_tables(self, h: Any, position_ids: Any) -> Any:
        """(cos, sin) for these positions, without transformers' dynamic-RoPE update (a branch on the
        batch's largest position, which an exported graph cannot keep; see Shape.max_positions)."""
        forward = type(self.rotary).forward
        forward = getattr(forward, "__wrapped__", forward)
        return forward(self.rotary, h, position_ids)


def parts_of(model: Any) -> Parts:
    cfg = model.config
    shape = shape_of(cfg)
    if cfg.model_type == "gpt2":
        t = model.transformer
        return Parts(
            shape, t.wte, t.h, t.ln_f, model.lm_head, positions=t.wpe, causal_in_layers=True, config=cfg
        )
    base = model.base_model
    plan = cfg.base_model_pp_plan
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise ExportError(
            f"{cfg.model_type!r} has no model-level rotary embedding (rotary_emb); supported: {SUPPORTED}"
        )
    embed, layers, norm = (getattr(base, k) for k in ("embed_tokens", "layers", "norm"))
    assert set(plan) >= {"embed_tokens", "layers", "norm"}
    scale = math.sqrt(shape.hidden_size) if cfg.model_type in EMBED_SCALED else None
    head = model.get_output_embeddings()
    return Parts(shape, embed, layers, norm, head, rotary=rotary, embed_scale=scale, config=cfg)
