"""The attention the stage graphs compute: transformers' eager attention, without copying the keys
and values once per query head.

With grouped-query attention (H query heads over H_kv key/value heads) transformers' eager path
repeats every key and value head H / H_kv times before its matmuls: a copy of the whole cache per
layer and step (at 16 rows of SmolLM2-135M and 96 positions, 210 MB a step against 540 MB of
weights). Here the query heads of one group are stacked along the sequence axis instead, so each
key/value head is read once; the arithmetic is the same (checked against PyTorch's eager model by
every export's parity check). It is registered with transformers' AttentionInterface and selected
only while a stage is exported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from functions import contract as c

NAME = "tandem_grouped"
# keyword arguments the layers pass that change nothing here (the mask carries the window)
_IGNORED = {"sliding_window", c.POSITION_IDS, "cache_position", "use_cache", "output_attentions"}


def grouped_attention(
    module: Any,
    query: torch.Tensor,  # (B, H, S, D)
    key: torch.Tensor,  # (B, H_kv, T, D)
    value: torch.Tensor,  # (B, H_kv, T, D)
    attention_mask: torch.Tensor | None,  # (B, 1, S, T) additive
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    unknown = set(kwargs) - _IGNORED
    if unknown:
        raise NotImplementedError(f"tandem's attention does not implement {sorted(unknown)}")
    B, H, S, D = query.shape
    kv = key.shape[1]
    T = key.shape[2]
    scale = scaling if scaling is not None else D**-0.5
    q = query.reshape(B, kv, (H // kv) * S, D)  # heads kv*g .. kv*g+g-1 share key/value head kv
    w = torch.matmul(q, key.transpose(2, 3)) * scale  # (B, H_kv, g*S, T)
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    w = w.reshape(B, H, S, T)
    if attention_mask is not None:
        w = w + attention_mask[:, :, :, :T]
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(w.reshape(B, kv, (H // kv) * S, T), value)  # (B, H_kv, g*S, D)
    return out.reshape(B, H, S, D).transpose(1, 2).contiguous(), None  # (B, S, H, D)


@contextlib.contextmanager
def selected(config: Any) -> Iterator[None]:
    """The model's layers use grouped_attention while the block runs (the PyTorch reference keeps
    transformers' own eager attention)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, grouped_attention)
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
