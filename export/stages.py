"""PyTorch wrapper modules, one per pipeline stage, around the real Hugging Face GPT-2 blocks.

Each stage owns a contiguous layer range; the first also embeds tokens, the last also applies
ln_f + lm_head to the final position only (sampling never needs the logits of earlier positions),
and returns the final hidden states of every position as its last output, for the scoring head
(export/head.py) to turn into log-probabilities only where a request asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import GPT2LMHeadModel

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
    """The minimal cache object HF attention layers call: concatenates past and new keys/values."""

    def __init__(self, past: list[torch.Tensor], start: int) -> None:
        self.start = start
        self.past = past  # flat [k_start, v_start, k_start+1, ...], each (B, H, P, D)
        self.present: list[torch.Tensor] = []

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_kwargs: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        i = 2 * (layer_idx - self.start)
        k = torch.cat([self.past[i], key], dim=2)  # (B, H, P + S, D)
        v = torch.cat([self.past[i + 1], value], dim=2)  # (B, H, P + S, D)
        self.present += [k, v]
        return k, v


class GPT2Stage(nn.Module):
    """Layers [spec.start, spec.stop) of a GPT2LMHeadModel as one exportable module.

    Inputs: input_ids (B, S) int64 or hidden_states (B, S, C) float; attention_mask (B, P + S)
    int64 over past and new positions (1 = attend, 0 = padding); position_ids (B, S) int64;
    past keys/values per layer (B, H, P, D). Outputs: hidden_states (B, S, C) or logits (B, V)
    of the last position, then present keys/values (B, H, P + S, D); the last stage then its final
    hidden states (B, S, C), before ln_f.
    """

    def __init__(self, model: GPT2LMHeadModel, spec: StageSpec) -> None:
        super().__init__()
        self.spec = spec
        t = model.transformer
        if spec.first:
            self.wte, self.wpe = t.wte, t.wpe
        self.h = nn.ModuleList(t.h[spec.start : spec.stop])
        if spec.last:
            self.ln_f, self.lm_head = t.ln_f, model.lm_head

    def forward(
        self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        if self.spec.first:
            h = self.wte(x) + self.wpe(position_ids)  # (B, S, C)
        else:
            h = x  # (B, S, C)
        # Padding becomes a large negative additive bias; causality comes from each block's own
        # triangular buffer, so a fully padded query row still has finite scores (no NaN).
        bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        cache = _StageCache(list(past), self.spec.start)  # bias: (B, 1, 1, P + S)
        for block in self.h:
            h = block(h, past_key_values=cache, attention_mask=bias, use_cache=True)[0]
        if self.spec.last:
            logits = self.lm_head(self.ln_f(h[:, -1, :]))  # (B, V)
            return (logits, *cache.present, h)  # h: (B, S, C)
        return (h, *cache.present)


def example_inputs(
    model: GPT2LMHeadModel, spec: StageSpec, batch: int = 2, seq: int = 3, past: int = 2
) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shapes and dtypes for tracing one stage."""
    cfg = model.config
    head_dim = cfg.n_embd // cfg.n_head
    if spec.first:
        x = torch.randint(0, cfg.vocab_size, (batch, seq), dtype=torch.int64)
    else:
        x = torch.randn(batch, seq, cfg.n_embd)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
    kv = [torch.randn(batch, cfg.n_head, past, head_dim) for _ in spec.past_names()]
    return (x, mask, pos, *kv)
