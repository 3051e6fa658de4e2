"""One exportable PyTorch module per pipeline stage, over a slice of any supported family's own
decoder layers (export/families.py says where a family keeps them).

Each stage owns a contiguous layer range and rebuilds what the model computes once for all layers:
the rotary tables from the rows' position ids, and one additive attention mask per kind of layer
(full causal, or a sliding window) from the absolute positions of the keys. The first stage also
embeds tokens; the last also applies the final norm and the LM head to the final position only
(sampling needs no earlier logits) and returns the final hidden states of every position, for the
scoring head (export/head.py) to turn into log-probabilities only where a request asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from export.families import Parts
from functions import contract as c


@dataclass(frozen=True)
class StageSpec:
    """One stage: layers [start, stop) of an n_layer model."""

    index: int  # 0-based position in the pipeline
    start: int
    stop: int
    n_layer: int

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.n_layer

    @property
    def name(self) -> str:
        return c.stage_name(self.index + 1)

    @property
    def file(self) -> str:
        return c.stage_file(self.index + 1)

    @property
    def input_name(self) -> str:
        return c.INPUT_IDS if self.first else c.hidden_states(self.start)

    @property
    def output_name(self) -> str:
        return c.LOGITS if self.last else c.hidden_states(self.stop)

    def past_names(self) -> list[str]:
        return [c.past_key_values(i, kv) for i in range(self.start, self.stop) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [c.present(i, kv) for i in range(self.start, self.stop) for kv in ("key", "value")]

    def input_names(self) -> list[str]:
        return [self.input_name, c.ATTENTION_MASK, c.POSITION_IDS, *self.past_names()]

    def output_names(self) -> list[str]:
        return [self.output_name, *self.present_names(), *([c.FINAL_HIDDEN] if self.last else [])]


class _StageCache:
    """The minimal cache object transformers' attention layers call: concatenates past and new."""

    is_compileable = False

    def __init__(self, past: list[torch.Tensor], start: int) -> None:
        self.start = start
        self.past = past  # flat [k_start, v_start, k_start+1, ...], each (B, H_kv, P, D)
        self.present: list[torch.Tensor] = []

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        i = 2 * (layer_idx - self.start)
        k = torch.cat([self.past[i], key], dim=2)  # (B, H_kv, P + S, D)
        v = torch.cat([self.past[i + 1], value], dim=2)  # (B, H_kv, P + S, D)
        self.present += [k, v]
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.past[0].shape[2])


def attention_bias(
    mask: torch.Tensor, position_ids: torch.Tensor, window: int | None, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask (B, 1, S, T) over T = P + S keys: 0 where a query may attend, the dtype's
    minimum elsewhere. A key is attended when it is a real position (mask 1), not after the query,
    and within `window` positions of it. Positions are absolute: a key's is the count of real keys
    before it in its row (the row may have padding between its past and its new positions); a
    query's is its position id."""
    key_pos = torch.cumsum(mask, dim=1) - 1  # (B, T)
    k = key_pos[:, None, :]  # (B, 1, T)
    q = position_ids[:, :, None]  # (B, S, 1)
    allowed = (mask[:, None, :] > 0) & (k <= q)  # (B, S, T)
    if window is not None:
        allowed = allowed & (k > q - window)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]  # (B, 1, S, T)


class DecoderStage(nn.Module):
    """Layers [spec.start, spec.stop) of a causal LM as one exportable module.

    Inputs: input_ids (B, S) int64 or hidden_states (B, S, C) float; attention_mask (B, P + S)
    int64 over past and new positions (1 = real, 0 = padding); position_ids (B, S) int64; past
    keys/values per layer (B, H_kv, P, D). Outputs: hidden_states (B, S, C) or, from the last stage,
    logits (B, V) of the last position; present keys/values (B, H_kv, P + S, D); the last stage
    then its final hidden states (B, S, C), before the final norm.
    """

    def __init__(self, parts: Parts, spec: StageSpec) -> None:
        super().__init__()
        self.spec, self.parts = spec, parts
        self.layers = nn.ModuleList(parts.layers[spec.start : spec.stop])
        self.windows = parts.shape.windows[spec.start : spec.stop]
        if spec.first:
            self.embed = parts.embed
            self.positions = parts.positions
        self.rotary = parts.rotary
        if spec.last:
            self.norm, self.lm_head = parts.norm, parts.lm_head

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        h = self._embed(x, position_ids) if self.spec.first else x  # (B, S, C)
        masks = self._masks(attention_mask, position_ids, h.dtype)
        rope = self.parts.rotary_tables(h, position_ids) if self.rotary is not None else None
        cache = _StageCache(list(past), self.spec.start)
        for layer, window in zip(self.layers, self.windows, strict=True):
            out = layer(
                h,
                attention_mask=masks[window],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                **({"position_embeddings": rope} if rope is not None else {}),
            )
            h = out[0] if isinstance(out, tuple) else out  # (B, S, C)
        if self.spec.last:
            logits = self.lm_head(self.norm(h[:, -1, :]))  # (B, V)
            softcap = self.parts.shape.logit_softcap
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            return (logits, *cache.present, h)
        return (h, *cache.present)

    def _embed(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.embed(ids)  # (B, S, C)
        if self.positions is not None:
            h = h + self.positions(position_ids)
        if self.parts.embed_scale is not None:
            h = h * torch.tensor(self.parts.embed_scale, dtype=h.dtype)
        return h

    def _masks(
        self, mask: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> dict[int | None, torch.Tensor]:
        """One mask per distinct window among this stage's layers."""
        if self.parts.causal_in_layers:
            # GPT-2's blocks apply causality from their own buffer: only padding is added here, so
            # a fully padded query row still has finite scores
            bias = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # (B, 1, 1, T)
            return dict.fromkeys(self.windows, bias)
        return {w: attention_bias(mask, position_ids, w, dtype) for w in set(self.windows)}


def example_inputs(
    parts: Parts, spec: StageSpec, batch: int = 2, seq: int = 3, past: int = 2
) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shapes and dtypes for tracing one stage (sizes >= 2 on dynamic axes)."""
    s = parts.shape
    if spec.first:
        x = torch.randint(0, s.vocab_size, (batch, seq), dtype=torch.int64)
    else:
        x = torch.randn(batch, seq, s.hidden_size)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, s.num_kv_heads, past, s.head_dim) for _ in spec.past_names()]
    return (x, mask, pos, *kv)
