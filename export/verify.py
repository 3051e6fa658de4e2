"""Parity: the chained ONNX stages in ONNX Runtime against the PyTorch model.

Both run prefill plus `steps` greedy decode steps on the same tokens (teacher-forced on the
PyTorch choices), batch 1 and a left-padded batch of 4 prompts of different lengths. Agreeing
argmax at every step means the free-running greedy sequences are identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.families import Shape
from functions import contract as c

PROMPT_SETS = {"batch1": [16], "batch4": [16, 9, 5, 12]}


@dataclass(frozen=True)
class Link:
    """One stage graph of a chain: its file, its data input's name, its past inputs' names."""

    path: Path
    input_name: str
    past: list[str]


def links_of(bundle: Path, stages: list[Any]) -> list[Link]:
    """The chain of a bundle's stages (functions.bundle StageEntry)."""
    return [Link(Path(bundle) / s.file, s.inputs[0].name, s.past_names()) for s in stages]


def sessions_for(links: list[Link], providers: list[str]) -> list[Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [ort.InferenceSession(str(link.path), opts, providers=providers) for link in links]
    for sess in sessions:  # ONNX Runtime falls back to the CPU silently: a check on CUDA must not
        if providers[0] not in sess.get_providers():
            raise RuntimeError(
                f"parity on {providers[0]} asked for; the session runs on {sess.get_providers()}"
            )
    return sessions


def _left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), dtype=np.int64)  # (B, L)
    mask = np.zeros((len(prompts), width), dtype=np.int64)  # (B, L)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = p
        mask[b, width - len(p) :] = 1
    return ids, mask


class _OrtChain:
    """Runs the stages in order, keeping every stage's padded KV cache (B, H_kv, T, D)."""

    def __init__(self, sessions: list[Any], links: list[Link], batch: int, shape: Shape):
        self.sessions, self.links = sessions, links
        empty = np.zeros((batch, shape.num_kv_heads, 0, shape.head_dim), dtype=np.float32)
        self.past = [dict.fromkeys(link.past, empty) for link in links]

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        x = ids
        for k, (sess, link) in enumerate(zip(self.sessions, self.links, strict=True)):
            feed = {link.input_name: x, c.ATTENTION_MASK: mask, c.POSITION_IDS: pos, **self.past[k]}
            outs = sess.run(None, feed)
            x = outs[0]
            # present of this step = past of the next
            self.past[k] = dict(zip(link.past, outs[1 : 1 + len(link.past)], strict=True))
        return x  # (B, V) logits of the last position


@dataclass
class Trajectory:
    """PyTorch's side of a parity run: the inputs of every step (prefill, then each greedy token,
    teacher-forced on PyTorch's choice) and PyTorch's last-position logits (B, V) after each."""

    prompt_lengths: list[int]
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # ids (B, S), mask (B, T), positions (B, S)
    logits: list[np.ndarray]


def reference(model: Any, shape: Shape, prompt_lens: list[int], steps: int, seed: int) -> Trajectory:
    """Prefill of left-padded random prompts, then `steps` greedy steps, in PyTorch."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, shape.vocab_size, n).tolist() for n in prompt_lens]
    ids, mask = _left_pad(prompts)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # (B, L)
    out = Trajectory(prompt_lens, [], [])
    past = None
    for _ in range(steps + 1):
        with torch.no_grad():
            r = model(
                input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(pos),
                past_key_values=past,
                use_cache=True,
            )
        past = r.past_key_values
        out.steps.append((ids, mask, pos))
        out.logits.append(r.logits[:, -1, :].float().numpy())  # (B, V)
        ids = out.logits[-1].argmax(-1)[:, None].astype(np.int64)  # (B, 1)
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)  # (B, T + 1)
        pos = pos[:, -1:] + 1  # (B, 1)
    return out


def compare(sessions: list[Any], links: list[Link], shape: Shape, ref: Trajectory) -> dict[str, Any]:
    """The chained ONNX stages on the same inputs: max |logit diff| and top-1 agreement."""
    chain = _OrtChain(sessions, links, len(ref.prompt_lengths), shape)
    max_diff, agree, total = 0.0, 0, 0
    for (ids, mask, pos), want in zip(ref.steps, ref.logits, strict=True):
        got = chain(ids, mask, pos)  # (B, V)
        diff = float(np.max(np.abs(got - want))) if np.all(np.isfinite(got)) else float("inf")
        max_diff = max(max_diff, diff)
        agree += int(np.sum(got.argmax(-1) == want.argmax(-1)))
        total += len(want)
    return {
        "prompt_lengths": ref.prompt_lengths,
        "steps": len(ref.steps) - 1,
        "max_abs_logit_diff": max_diff,
        "top1_agreement": agree / total,
    }


def verify(
    model: Any,
    links: list[Link],
    shape: Shape,
    steps: int = 20,
    seed: int = 0,
    providers: list[str] | None = None,
) -> dict[str, Any]:
    """The chain of `links` against `model`; `providers`: ONNX Runtime's, first choice first
    (default the CPU; tests/gpu passes CUDA's)."""
    sessions = sessions_for(links, providers or ["CPUExecutionProvider"])
    results = {
        name: compare(sessions, links, shape, reference(model, shape, lens, steps, seed + i))
        for i, (name, lens) in enumerate(PROMPT_SETS.items())
    }
    return {
        "reference": "transformers PyTorch, fp32",
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in results.values()),
        "top1_agreement": min(r["top1_agreement"] for r in results.values()),
        "sets": results,
    }
