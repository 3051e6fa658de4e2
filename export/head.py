"""The scoring head: final norm + LM head (+ the family's final logit soft-cap) + log_softmax + top-k
as a small ONNX model of its own.

The last stage graph computes logits for the final position only (what sampling needs) and also
returns its final hidden states for every position. The stage function runs this head on just the
positions a request asked to score (prompt log-probabilities for `echo` + `logprobs`), so decode
steps never pay for vocabulary-sized rows, and no such row ever crosses HTTP.

Inputs: hidden (N, C) float32 final hidden states (before the final norm), target_ids (N,) int64, the token
whose log-probability is asked at each position. Outputs: target_logprobs (N,), and the
TOP_LOGPROBS_MAX most likely tokens with their log-probabilities (N, K), best first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.families import Parts
from export.to_onnx import to_program
from functions import contract as c
from functions.bundle import TensorSpec


class ScoringHead(nn.Module):
    def __init__(self, parts: Parts) -> None:
        super().__init__()
        self.norm, self.lm_head = parts.norm, parts.lm_head
        self.softcap = parts.shape.logit_softcap

    def forward(self, hidden: torch.Tensor, target_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.lm_head(self.norm(hidden))  # (N, V)
        if self.softcap:  # as the last stage graph does (export/stages.py)
            logits = torch.tanh(logits / self.softcap) * self.softcap
        lp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
        target = lp.gather(1, target_ids[:, None])[:, 0]  # (N,)
        top_lp, top_ids = torch.topk(lp, c.TOP_LOGPROBS_MAX, dim=-1)  # (N, K) each
        return target, top_ids, top_lp


def head_specs(hidden_size: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    k = c.TOP_LOGPROBS_MAX
    inputs = [
        TensorSpec(c.HEAD_HIDDEN, "FP32", ["positions", hidden_size]),
        TensorSpec(c.TARGET_IDS, "INT64", ["positions"]),
    ]
    outputs = [
        TensorSpec(c.TARGET_LOGPROBS, "FP32", ["positions"]),
        TensorSpec(c.TARGET_TOP_IDS, "INT64", ["positions", k]),
        TensorSpec(c.TARGET_TOP_LOGPROBS, "FP32", ["positions", k]),
    ]
    return inputs, outputs


def export_head(parts: Parts, path: Path, opset: int | None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Write the head to `path`; returns its input and output specs (for the manifest)."""
    s = parts.shape
    if s.vocab_size < c.TOP_LOGPROBS_MAX:
        raise ValueError(f"the vocabulary ({s.vocab_size}) is smaller than top-{c.TOP_LOGPROBS_MAX}")
    module = ScoringHead(parts).eval()
    args = (torch.randn(3, s.hidden_size), torch.zeros(3, dtype=torch.int64))
    inputs, outputs = head_specs(s.hidden_size)
    dyn = torch.export.Dim.DYNAMIC
    names = ([t.name for t in inputs], [t.name for t in outputs])
    to_program(module, args, names, ({0: dyn}, {0: dyn}), opset).save(str(path))
    return inputs, outputs


def verify_head(parts: Parts, path: Path, seed: int = 0) -> float:
    """Max |log-probability diff| between the ONNX head and PyTorch on random hidden states."""
    import onnxruntime as ort

    s = parts.shape
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((7, s.hidden_size)).astype(np.float32)  # (N, C)
    targets = rng.integers(0, s.vocab_size, 7).astype(np.int64)  # (N,)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_target, _ids, got_top = sess.run(None, {c.HEAD_HIDDEN: hidden, c.TARGET_IDS: targets})
    with torch.no_grad():
        ref = ScoringHead(parts)(torch.from_numpy(hidden), torch.from_numpy(targets))
    return float(max(np.abs(got_target - ref[0].numpy()).max(), np.abs(got_top - ref[2].numpy()).max()))


def build_head(
    parts: Parts, work: Path, opset: int | None, log: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """Export and check the head into `work`: (the manifest's `head` entry, {file: sha256}) for the
    last stage's file list (fetched and verified with it). Always float32, even in an int8 bundle."""
    from dataclasses import asdict

    from export.errors import ExportError
    from functions.bundle import sha256_file

    path = work / c.HEAD_FILE
    inputs, outputs = export_head(parts, path, opset)
    diff = verify_head(parts, path)
    if not diff <= HEAD_MAX_DIFF:
        raise ExportError(
            f"scoring head parity failed: max |logprob diff| {diff:.3g} (limit {HEAD_MAX_DIFF})"
        )
    log(f"scoring head -> {c.HEAD_FILE} (max |logprob diff| {diff:.1e})")
    entry = {
        "file": c.HEAD_FILE,
        "top_k": c.TOP_LOGPROBS_MAX,
        "inputs": [asdict(t) for t in inputs],
        "outputs": [asdict(t) for t in outputs],
    }
    return entry, {c.HEAD_FILE: sha256_file(path)}


HEAD_MAX_DIFF = 1e-3
