"""One pipeline stage in ONNX Runtime: validates a batch, joins it with the cached KV of each
row, runs the session, stores the new KV, and (last stage) samples. No HTTP here.

Wire layout of a batch (B rows, S new positions, left-padded):
  sequence_ids (B,) int64, past_lengths (B,) int64, input_ids (B, S) int64 or
  hidden_states_{start} (B, S, C) float32, optional attention_mask (B, S) over the new positions
  (1 = real, 0 = left padding), optional sequence_end (B,) bool; last stage: optional
  temperature, top_p (B,) float32, top_k, seed (B,) int64.
A row whose past_lengths is not what this stage holds -> ConflictError, nothing changed;
past_lengths 0 always starts the sequence afresh.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.manifest import Manifest, StageEntry
from functions.errors import BadRequestError, ConflictError
from functions.kvcache import Group, KVCache
from functions.sampling import sample

SAMPLING = {
    "temperature": (np.float32, 0.0),
    "top_k": (np.int64, 0),
    "top_p": (np.float32, 1.0),
    "seed": (np.int64, -1),
}


@dataclass
class StageResult:
    outputs: dict[str, np.ndarray]
    phase: str  # "prefill" (some row brings more than one position) or "decode"
    batch_size: int
    seconds: float  # time in the ONNX session


def session_options(threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Several stage processes share few cores: spinning threads would steal them (findings s4).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


class StageEngine:
    def __init__(
        self,
        bundle: Path,
        manifest: Manifest,
        stage: StageEntry,
        *,
        provider: str = "cpu",
        threads: int | None = None,
        cache_bytes: int = 2 << 30,
        idle_seconds: float = 600.0,
    ):
        import onnxruntime as ort

        self.manifest, self.stage = manifest, stage
        self.first = stage.first
        self.last = stage.layers[1] == manifest.n_layer
        self.x_name = stage.inputs[0].name
        self.y_name = stage.outputs[0].name
        self.past_names = stage.past_names()
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if provider == "cuda"
            else ["CPUExecutionProvider"]
        )
        self.session = ort.InferenceSession(
            str(Path(bundle) / stage.file), session_options(threads), providers=providers
        )
        self.providers = self.session.get_providers()
        self.cache = KVCache(cache_bytes, idle_seconds)
        self.lock = threading.Lock()  # one batch at a time: the 409 check and the update are atomic

    # ---- wire description (the stage's Open Inference Protocol model metadata) ----
    def wire_inputs(self) -> list[dict]:
        x = ([-1, -1], "INT64") if self.first else ([-1, -1, int(self.manifest.config["n_embd"])], "FP32")
        spec = [
            ("sequence_ids", "INT64", [-1]),
            ("past_lengths", "INT64", [-1]),
            (self.x_name, x[1], x[0]),
            ("attention_mask", "INT64", [-1, -1]),
            ("sequence_end", "BOOL", [-1]),
        ]
        if self.last:
            spec += [(n, "FP32" if t == np.float32 else "INT64", [-1]) for n, (t, _) in SAMPLING.items()]
        return [{"name": n, "datatype": d, "shape": s} for n, d, s in spec]

    def wire_outputs(self) -> list[dict]:
        if self.last:
            return [
                {"name": "token_ids", "datatype": "INT64", "shape": [-1]},
                {"name": "logprobs", "datatype": "FP32", "shape": [-1]},
                {"name": "logits", "datatype": "FP32", "shape": [-1, self.manifest.vocab_size]},
            ]
        return [
            {"name": self.y_name, "datatype": "FP32", "shape": [-1, -1, int(self.manifest.config["n_embd"])]}
        ]

    # ---- validation ----
    def _check(self, inputs: dict[str, np.ndarray]) -> tuple:
        allowed = {t["name"] for t in self.wire_inputs()}
        unknown = sorted(set(inputs) - allowed)
        if unknown:
            raise BadRequestError(
                f"unknown input tensor(s) {unknown}; {self.stage.name} takes {sorted(allowed)}"
            )
        for req in ("sequence_ids", "past_lengths", self.x_name):
            if req not in inputs:
                raise BadRequestError(f"missing input tensor {req!r}")
        ids, past, x = inputs["sequence_ids"], inputs["past_lengths"], inputs[self.x_name]
        for name, a in (("sequence_ids", ids), ("past_lengths", past)):
            if a.dtype != np.int64 or a.ndim != 1:
                raise BadRequestError(
                    f"{name} must be INT64 with shape [batch]; got {a.dtype} {list(a.shape)}"
                )
        B = ids.shape[0]
        if B == 0:
            raise BadRequestError("empty batch: sequence_ids has no rows")
        if past.shape[0] != B:
            raise BadRequestError(f"past_lengths has {past.shape[0]} rows, sequence_ids {B}")
        if B > 1 and len(np.unique(ids)) != B:
            raise BadRequestError("sequence_ids has duplicates: one row per sequence")
        if (past < 0).any():
            raise BadRequestError("past_lengths must be >= 0")
        want_dtype, want_ndim = (np.int64, 2) if self.first else (np.float32, 3)
        if x.dtype != want_dtype or x.ndim != want_ndim or x.shape[0] != B or x.shape[1] == 0:
            shape = (
                "[batch, sequence]" if self.first else f"[batch, sequence, {self.manifest.config['n_embd']}]"
            )
            raise BadRequestError(
                f"{self.x_name} must be {'INT64' if self.first else 'FP32'} {shape} with "
                f"batch {B} and sequence >= 1; got {x.dtype} {list(x.shape)}"
            )
        if self.first and ((x < 0).any() or (x >= self.manifest.vocab_size).any()):
            raise BadRequestError(f"input_ids must be in [0, {self.manifest.vocab_size})")
        if not self.first:
            if x.shape[2] != int(self.manifest.config["n_embd"]):
                raise BadRequestError(
                    f"{self.x_name} last dimension must be {self.manifest.config['n_embd']}"
                )
            if not np.isfinite(x).all():
                raise BadRequestError(f"{self.x_name} contains NaN or infinite values")
        S = x.shape[1]
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = np.ones((B, S), dtype=np.int64)
            n_new = np.full(B, S, dtype=np.int64)  # (B,)
        elif mask.dtype != np.int64 or mask.shape != (B, S):
            raise BadRequestError(
                f"attention_mask must be INT64 [{B}, {S}] over the new positions; got "
                f"{mask.dtype} {list(mask.shape)}"
            )
        else:
            n_new = mask.sum(axis=1)  # (B,)
            # left padding only: each row is zeros then ones, with at least one real position
            if ((mask != 0) & (mask != 1)).any() or (n_new == 0).any() or (np.diff(mask, axis=1) < 0).any():
                raise BadRequestError("attention_mask rows must be 0s (left padding) then at least one 1")
        too_long = past + n_new > self.manifest.n_positions
        if too_long.any():
            b = int(np.argmax(too_long))
            raise BadRequestError(
                f"sequence {int(ids[b])} would reach position {int(past[b] + n_new[b])}, "
                f"beyond the context window of {self.manifest.n_positions}"
            )
        end = inputs.get("sequence_end")
        if end is not None and (end.dtype != np.bool_ or end.shape != (B,)):
            raise BadRequestError(f"sequence_end must be BOOL [{B}]")
        params = self._sampling(inputs, B) if self.last else None
        return ids, past, x, mask, n_new, end, params

    def _sampling(self, inputs: dict[str, np.ndarray], B: int) -> dict[str, np.ndarray]:
        out = {}
        for name, (dtype, default) in SAMPLING.items():
            a = inputs.get(name)
            if a is None:
                a = np.full(B, default, dtype=dtype)
            elif a.dtype != dtype or a.shape != (B,):
                raise BadRequestError(f"{name} must be {'FP32' if dtype == np.float32 else 'INT64'} [{B}]")
            out[name] = a
        t, k, p = out["temperature"], out["top_k"], out["top_p"]
        if not np.isfinite(t).all() or (t < 0).any() or (t > 100).any():
            raise BadRequestError("temperature must be finite and in [0, 100]")
        if (k < 0).any() or (k > self.manifest.vocab_size).any():
            raise BadRequestError(f"top_k must be in [0, {self.manifest.vocab_size}] (0 = off)")
        if not np.isfinite(p).all() or (p <= 0).any() or (p > 1).any():
            raise BadRequestError("top_p must be in (0, 1]")
        return out

    # ---- inference ----
    def infer(self, inputs: dict[str, np.ndarray], want: set[str] | None = None) -> StageResult:
        ids, past, x, mask, n_new, end, params = self._check(inputs)
        with self.lock:
            return self._infer_locked(ids, past, x, mask, n_new, end, params, want)

    def _infer_locked(self, ids, past, x, mask, n_new, end, params, want) -> StageResult:
        self.cache.expire()
        held = np.array([self.cache.length(int(s)) for s in ids], dtype=np.int64)  # (B,)
        bad = (held != past) & (past != 0)
        if bad.any():
            self.cache.misses += int(bad.sum())
            raise ConflictError(
                f"{int(bad.sum())} row(s) expect a cached past this stage does not hold; replay them "
                "from the held lengths",
                extra={
                    "sequence_ids": ids[bad].tolist(),
                    "held_lengths": held[bad].tolist(),
                    "past_lengths": past[bad].tolist(),
                },
            )
        B, S = x.shape[0], x.shape[1]
        P = int(past.max())
        entries = [self.cache.get(int(s)) if p > 0 else None for s, p in zip(ids, past, strict=True)]
        g = entries[0].group if entries[0] is not None else None
        same_batch = (
            g is not None
            and g.ids == tuple(int(s) for s in ids)
            and bool((n_new == S).all())
            and all(e is not None and e.group is g for e in entries)
        )
        if same_batch:
            # the rows, order and padding of the previous step: feed its presents back as they are
            feeds = dict(zip(self.past_names, g.arrays, strict=True))
            P = g.width
            full_mask = np.ones((B, P + S), dtype=np.int64)  # (B, P + S)
            full_mask[:, :P][np.arange(P)[None, :] < g.start[:, None]] = 0  # (B, P) padding of each row
        else:
            H, D = self.manifest.n_head, self.manifest.head_dim
            feeds = {}
            for i, name in enumerate(self.past_names):
                buf = np.zeros((B, H, P, D), dtype=np.float32)  # (B, H, P, D), rows right-aligned
                for b, e in enumerate(entries):
                    if e is not None:
                        buf[b, :, P - e.length :] = e.past(i)
                feeds[name] = buf
            full_mask = np.zeros((B, P + S), dtype=np.int64)  # (B, P + S)
            full_mask[:, P:] = mask
            for b in range(B):
                full_mask[b, P - past[b] : P] = 1
        pos = np.zeros((B, S), dtype=np.int64)  # (B, S)
        for b in range(B):
            pos[b, S - n_new[b] :] = np.arange(past[b], past[b] + n_new[b])
        feeds.update({self.x_name: x, "attention_mask": full_mask, "position_ids": pos})
        t0 = time.perf_counter()
        outs = self.session.run(None, feeds)
        seconds = time.perf_counter() - t0
        self._store(ids, past, n_new, end, P, S, outs[1:])
        result = {}
        if self.last:
            logits = outs[0]  # (B, V)
            token_ids, logprobs = sample(
                logits,
                params["temperature"],
                params["top_k"],
                params["top_p"],
                params["seed"],
                past + n_new,
                want is None or "logprobs" in want,
            )
            result["token_ids"] = token_ids
            if logprobs is not None:
                result["logprobs"] = logprobs
            if want is not None and "logits" in want:
                result["logits"] = logits
        else:
            result[self.y_name] = outs[0]  # (B, S, C)
        phase = "prefill" if int(n_new.max()) > 1 else "decode"
        return StageResult(result, phase, B, seconds)

    def _store(self, ids, past, n_new, end, P: int, S: int, presents: list[np.ndarray]) -> None:
        """Keep each row's new KV as a view into this batch's presents (B, H, P + S, D). A row with
        a past and padded new positions has a gap in the middle: that one is compacted."""
        start = np.where(past == 0, P + S - n_new, P - past)  # (B,) first valid position
        group = Group(presents, start, tuple(int(s) for s in ids))
        keep = list(group.ids)
        for b, seq in enumerate(group.ids):
            if end is not None and end[b]:
                self.cache.release(seq)
            elif past[b] == 0 or n_new[b] == S:
                self.cache.put(seq, group, b, keep)
            else:
                p, n = int(past[b]), int(n_new[b])
                compact = [
                    np.concatenate([a[b : b + 1, :, P - p : P], a[b : b + 1, :, P + S - n :]], axis=2)
                    for a in presents
                ]  # (1, H, p + n, D)
                self.cache.put(seq, Group(compact, np.zeros(1, dtype=np.int64), (seq,)), 0, keep)

    def release(self, seq_id: int) -> bool:
        with self.lock:
            return self.cache.release(seq_id)

    def warm_up(self) -> None:
        """One prefill and one decode on a throwaway sequence, so the first real call is not slow."""
        x = (
            np.zeros((1, 4), dtype=np.int64)
            if self.first
            else np.zeros((1, 4, int(self.manifest.config["n_embd"])), dtype=np.float32)
        )
        seq = np.array([-(2**62)], dtype=np.int64)
        self.infer({"sequence_ids": seq, "past_lengths": np.array([0]), self.x_name: x})
        self.infer(
            {
                "sequence_ids": seq,
                "past_lengths": np.array([4]),
                self.x_name: x[:, :1],
                "sequence_end": np.array([True]),
            }
        )
