"""Parity: the chained ONNX stages in ONNX Runtime against the PyTorch model.

Both run prefill plus `steps` greedy decode steps on the same tokens (teacher-forced on the
PyTorch choices), batch 1 and a left-padded batch of 4 prompts of different lengths. Agreeing
argmax at every step means the free-running greedy sequences are identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from functions import contract as c
from functions.bundle import StageEntry

PROMPT_SETS = {"batch1": [16], "batch4": [16, 9, 5, 12]}


def _sessions(bundle: Path, stages: list[StageEntry], providers: list[str]) -> list[Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = [ort.InferenceSession(str(bundle / s.file), opts, providers=providers) for s in stages]
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
    """Runs the stages in order, keeping every stage's padded KV cache (B, H, T, D)."""

    def __init__(self, sessions: list[Any], stages: list[StageEntry], batch: int, n_head: int, head_dim: int):
        self.sessions, self.stages = sessions, stages
        empty = np.zeros((batch, n_head, 0, head_dim), dtype=np.float32)
        self.past = [{n: empty for n in s.past_names()} for s in stages]

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        x = ids
        for k, (sess, stage) in enumerate(zip(self.sessions, self.stages, strict=False)):
            feed = {stage.inputs[0].name: x, c.ATTENTION_MASK: mask, c.POSITION_IDS: pos, **self.past[k]}
            outs = sess.run(None, feed)
            x = outs[0]
            self.past[k] = {
                p: o for p, o in zip(stage.past_names(), outs[1:], strict=False)
            }  # present of this step = past of the next
        return x  # (B, V) logits of the last position


def _run_set(
    model: Any,
    sessions: list[Any],
    stages: list[StageEntry],
    manifest_cfg: dict[str, Any],
    prompt_lens: list[int],
    steps: int,
    seed: int,
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    vocab = int(manifest_cfg["vocab_size"])
    prompts = [rng.integers(0, vocab, n).tolist() for n in prompt_lens]
    ids, mask = _left_pad(prompts)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # (B, L)
    n_head = int(manifest_cfg["n_head"])
    chain = _OrtChain(sessions, stages, len(prompts), n_head, int(manifest_cfg["n_embd"]) // n_head)

    max_diff, agree, total = 0.0, 0, 0
    past = None
    t_ids, t_mask, t_pos = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos)
    for _ in range(steps + 1):
        with torch.no_grad():
            out = model(
                input_ids=t_ids,
                attention_mask=t_mask,
                position_ids=t_pos,
                past_key_values=past,
                use_cache=True,
            )
        ref = out.logits[:, -1, :].float().numpy()  # (B, V)
        past = out.past_key_values
        got = chain(t_ids.numpy(), t_mask.numpy(), t_pos.numpy())  # (B, V)
        if not np.all(np.isfinite(got)):
            max_diff = float("inf")
        else:
            max_diff = max(max_diff, float(np.max(np.abs(got - ref))))
        nxt = ref.argmax(-1)  # (B,) the PyTorch greedy choice, fed to both
        agree += int(np.sum(got.argmax(-1) == nxt))
        total += len(nxt)
        t_ids = torch.from_numpy(nxt[:, None].astype(np.int64))  # (B, 1)
        t_mask = torch.cat([t_mask, torch.ones_like(t_ids)], dim=1)  # (B, T + 1)
        t_pos = t_pos[:, -1:] + 1  # (B, 1)
    return {
        "prompt_lengths": prompt_lens,
        "steps": steps,
        "max_abs_logit_diff": max_diff,
        "top1_agreement": agree / total,
    }


def verify(
    model: Any,
    bundle: Path,
    stages: list[StageEntry],
    config: dict[str, Any],
    steps: int = 20,
    seed: int = 0,
    providers: list[str] | None = None,
) -> dict[str, Any]:
    """`providers`: ONNX Runtime's, first choice first (default the CPU; tests/gpu passes CUDA's)."""
    sessions = _sessions(bundle, stages, providers or ["CPUExecutionProvider"])
    results = {
        name: _run_set(model, sessions, stages, config, lens, steps, seed + i)
        for i, (name, lens) in enumerate(PROMPT_SETS.items())
    }
    return {
        "reference": "transformers PyTorch, fp32",
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in results.values()),
        "top1_agreement": min(r["top1_agreement"] for r in results.values()),
        "sets": results,
    }
