"""One pipeline stage in ONNX Runtime: checks a batch (functions.contract), joins it with the cached
KV of each row, runs the session, stores the new KV, and (last stage) samples. No HTTP here.

A row whose past_lengths is not what this stage holds -> ConflictError, nothing changed;
past_lengths 0 always starts the sequence afresh.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.manifest import Manifest, StageEntry
from functions import contract as c
from functions.contract import StageBatch, StageIO
from functions.errors import ConflictError, PayloadTooLargeError
from functions.kvcache import Entry, Group, KVCache
from functions.sampling import sample
from functions.scoring import NO_HEAD, Head, ScoreRequest, score_outputs


@dataclass
class StageResult:
    outputs: dict[str, np.ndarray]
    phase: str  # "prefill" (some row brings more than one position) or "decode"
    batch_size: int
    seconds: float  # time in the ONNX session


DEFAULT_MAX_BATCH_TOKENS = 4096  # rows x new positions per call: a full 1,024-token prompt x 4
# Calls over this many rows x (past + new) positions give the arena memory they grew back at their
# end, and the C heap is trimmed when a stage holds no sequence any more: after a 16-client load the
# stages' RSS came back within 25 MB of the baseline with 256 (+100-170 MB kept with 8192, +90 MB
# with 1024; ONNX Runtime's arena alone off did not help: glibc kept the freed blocks).
SHRINK_ABOVE = 256


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


def give_back_memory() -> None:
    """Return the C heap's free memory to the system (glibc keeps freed blocks otherwise)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def session_options(threads: int | None) -> Any:
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
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ):
        import onnxruntime as ort

        self.manifest, self.stage = manifest, stage
        last = stage.layers[1] == manifest.n_layer
        # the scoring head, and the graph output it reads (both absent in bundles made before them)
        graph_outputs = [t.name for t in stage.outputs]
        self.hidden_out = c.FINAL_HIDDEN if last and c.FINAL_HIDDEN in graph_outputs else None
        self.io = StageIO(
            x_name=stage.inputs[0].name,
            y_name=stage.outputs[0].name,
            first=stage.first,
            last=last,
            n_embd=int(manifest.config["n_embd"]),
            vocab_size=manifest.vocab_size,
            n_positions=manifest.n_positions,
            scoring=self.hidden_out is not None and manifest.head is not None,
        )
        self.x_name = self.io.x_name
        self.past_names = stage.past_names()
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if provider == "cuda"
            else ["CPUExecutionProvider"]
        )
        if provider == "cuda" and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds the CUDA and cuDNN libraries of NVIDIA's pip packages only when
            # asked to (the CUDA image, infra/docker/serve.Dockerfile, has no system CUDA)
            ort.preload_dlls()
        self.session = ort.InferenceSession(
            str(Path(bundle) / stage.file), session_options(threads), providers=providers
        )
        self.providers = self.session.get_providers()
        self.head = (
            Head.load(bundle, manifest, session_options(threads), providers) if self.io.scoring else None
        )
        # what a call fetches: every output but the final hidden states, unless a row scores positions
        self.out_names = [o.name for o in self.session.get_outputs() if o.name != self.hidden_out]
        self.cache = KVCache(cache_bytes, idle_seconds)
        self.lock = threading.Lock()  # one batch at a time: the 409 check and the update are atomic
        self.max_batch_tokens = max_batch_tokens
        # after a large call, ONNX Runtime hands the arena memory it grew for it back
        self.shrink = ort.RunOptions()
        self.shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    # ---- wire description (the stage's Open Inference Protocol model metadata) ----
    def wire_inputs(self) -> list[dict[str, Any]]:
        return self.io.wire_inputs()

    def wire_outputs(self) -> list[dict[str, Any]]:
        return self.io.wire_outputs()

    # ---- inference ----
    def infer(self, inputs: dict[str, np.ndarray], want: set[str] | None = None) -> StageResult:
        """Check and run one batch; `want` names the outputs asked for (None: the defaults)."""
        if c.TARGET_IDS in inputs and not self.io.scoring:
            raise c.ContractError(NO_HEAD.format(c.TARGET_IDS))
        batch = StageBatch.from_tensors(inputs, self.io)
        scoring = (
            ScoreRequest.parse(inputs, batch, self.io.vocab_size, self.head is not None)
            if self.io.last
            else None
        )
        if batch.size * batch.width > self.max_batch_tokens:  # before any allocation for it
            raise PayloadTooLargeError(
                f"{batch.size} rows x {batch.width} positions = {batch.size * batch.width} per call; this "
                f"stage takes at most {self.max_batch_tokens} (TANDEM_MAX_BATCH_TOKENS): split the batch"
            )
        with self.lock:
            return self._infer_locked(batch, want, scoring)

    def _infer_locked(
        self, batch: StageBatch, want: set[str] | None, scoring: ScoreRequest | None = None
    ) -> StageResult:
        ids, past, x, n_new = batch.sequence_ids, batch.past_lengths, batch.x, batch.n_new
        self.cache.expire()
        held = np.array([self.cache.length(int(s)) for s in ids], dtype=np.int64)  # (B,)
        restart = batch.start if batch.start is not None else np.zeros_like(past, dtype=np.bool_)
        missed = (held != past) & (past != 0)
        unsaid = (past == 0) & (held > 0) & ~restart  # a held sequence started over without saying so
        bad = missed | unsaid
        if bad.any():
            self.cache.misses += int(missed.sum())
            why = (
                [f"{int(missed.sum())} row(s) expect a cached past this stage does not hold"]
                if missed.any()
                else []
            )
            if unsaid.any():
                why.append(
                    f"{int(unsaid.sum())} row(s) start over a sequence this stage holds (send {c.SEQUENCE_START} "
                    "to replace it)"
                )
            raise ConflictError(
                "; ".join(why) + "; replay from the held lengths",
                extra=c.conflict_extra(ids[bad], held[bad], past[bad]),
            )
        B, S = batch.size, batch.width
        entries = [self.cache.get(int(s)) if p > 0 else None for s, p in zip(ids, past, strict=True)]
        g = entries[0].group if entries[0] is not None else None
        same_batch = (
            g is not None
            and g.ids == tuple(int(s) for s in ids)
            and bool((n_new == S).all())
            and all(e is not None and e.group is g for e in entries)
        )
        if same_batch:
            assert g is not None
            # the rows, order and padding of the previous step: feed its presents back as they are
            feeds = dict(zip(self.past_names, g.arrays, strict=True))
            P = g.width
            full_mask = np.ones((B, P + S), dtype=np.int64)  # (B, P + S)
            full_mask[:, :P][np.arange(P)[None, :] < g.start[:, None]] = 0  # (B, P) padding of each row
        else:
            P = int(past.max())
            feeds, full_mask = self._gather(entries, batch, P)
        pos = np.zeros((B, S), dtype=np.int64)  # (B, S)
        for b in range(B):
            pos[b, S - n_new[b] :] = np.arange(past[b], past[b] + n_new[b])
        feeds.update({self.x_name: x, c.ATTENTION_MASK: full_mask, c.POSITION_IDS: pos})
        t0 = time.perf_counter()
        names = self.out_names
        if scoring is not None and scoring.scores_positions:
            assert self.hidden_out is not None
            names = [*names, self.hidden_out]
        outs = self.session.run(names, feeds, self.shrink if B * (P + S) > SHRINK_ABOVE else None)
        seconds = time.perf_counter() - t0
        if self.io.last:  # refused before storing: a refused request changes nothing
            assert batch.sampling is not None
            hot = np.nonzero(batch.sampling.temperature > 0)[0]  # rows that sample (greedy takes argmax)
            broken = [int(ids[b]) for b in hot if not np.isfinite(outs[0][b]).all()]
            if broken:
                raise c.ContractError(
                    f"sequence(s) {broken}: the logits are not finite (the hidden states are beyond "
                    "what this model computes in float32), so no token can be sampled"
                )
        self._store(batch, P, outs[1 : 1 + len(self.past_names)])
        if len(self.cache) == 0:
            give_back_memory()
        result = {}
        if self.io.last:
            assert batch.sampling is not None
            logits = outs[0]  # (B, V)
            token_ids, logprobs = sample(
                logits, batch.sampling, past + n_new, want is None or c.LOGPROBS in want
            )
            result[c.TOKEN_IDS] = token_ids
            if logprobs is not None:
                result[c.LOGPROBS] = logprobs
            if want is not None and c.LOGITS in want:
                result[c.LOGITS] = logits
            if scoring is not None:
                hidden = outs[-1] if len(outs) > len(self.out_names) else None  # (B, S, C)
                result |= score_outputs(scoring, logits, hidden, self.head, want)
        else:
            result[self.io.y_name] = outs[0]  # (B, S, C)
        phase = "prefill" if int(n_new.max()) > 1 else "decode"
        return StageResult(result, phase, B, seconds)

    def _gather(
        self, entries: list[Entry | None], batch: StageBatch, P: int
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Past keys/values of rows that come from different batches, copied into one right-aligned
        (B, H, P, D) array per tensor, with the full (B, P + S) attention mask."""
        B, S = batch.size, batch.width
        H, D = self.manifest.n_head, self.manifest.head_dim
        feeds = {}
        for i, name in enumerate(self.past_names):
            buf = np.zeros((B, H, P, D), dtype=np.float32)  # (B, H, P, D), rows right-aligned
            for b, e in enumerate(entries):
                if e is not None:
                    buf[b, :, P - e.length :] = e.past(i)
            feeds[name] = buf
        full_mask = np.zeros((B, P + S), dtype=np.int64)  # (B, P + S)
        full_mask[:, P:] = batch.mask
        for b in range(B):
            full_mask[b, P - batch.past_lengths[b] : P] = 1
        return feeds, full_mask

    def _store(self, batch: StageBatch, P: int, presents: list[np.ndarray]) -> None:
        """Keep each row's new KV as a view into this batch's presents (B, H, P + S, D). A row with
        a past and padded new positions has a gap in the middle: that one is compacted."""
        past, n_new, end, S = batch.past_lengths, batch.n_new, batch.end, batch.width
        start = np.where(past == 0, P + S - n_new, P - past)  # (B,) first valid position
        group = Group(presents, start, tuple(int(s) for s in batch.sequence_ids))
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
            released = self.cache.release(seq_id)
            if released and len(self.cache) == 0:
                give_back_memory()
            return released

    def held(self) -> dict[int, int]:
        """Sequence id -> positions held, after dropping idle ones."""
        with self.lock:
            self.cache.expire()
            return self.cache.lengths()

    def warm_up(self) -> None:
        """One prefill and one decode on a throwaway sequence, so the first real call is not slow."""
        x = (
            np.zeros((1, 4), dtype=np.int64)
            if self.io.first
            else np.zeros((1, 4, self.io.n_embd), dtype=np.float32)
        )
        seq = np.array([-(2**62)], dtype=np.int64)
        self.infer({c.SEQUENCE_IDS: seq, c.PAST_LENGTHS: np.array([0]), self.x_name: x})
        self.infer(
            {
                c.SEQUENCE_IDS: seq,
                c.PAST_LENGTHS: np.array([4]),
                self.x_name: x[:, :1],
                c.SEQUENCE_END: np.array([True]),
            }
        )
