"""One pipeline stage in ONNX Runtime: checks a batch (functions.batch), joins it with the cached KV
of each row, runs the session, answers (functions.answers: the last stage samples) and stores the
new KV. No HTTP here.

A row whose past_lengths is not what this stage holds -> ConflictError, nothing changed;
past_lengths 0 always starts the sequence afresh.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from functions import contract as c
from functions.answers import answer
from functions.batch import StageBatch
from functions.bundle import Manifest, StageEntry
from functions.device import preload_cuda_libraries, require_in_session, session_options, session_providers
from functions.errors import ConflictError, PayloadTooLargeError
from functions.kvcache import Entry, Group, KVCache, give_back_memory
from functions.kvstore import make_store, resolve_kv_store
from functions.scoring import Head
from functions.stage_io import gives_final_hidden, stage_io


@dataclass
class StageResult:
    outputs: dict[str, np.ndarray]
    phase: str  # "prefill" (some row brings more than one position) or "decode"
    batch_size: int
    seconds: float  # time in the ONNX session


DEFAULT_MAX_BATCH_TOKENS = 4096  # rows x new positions per call: a full 1,024-token prompt x 4
DEFAULT_MAX_RESPONSE_BYTES = 64 << 20  # tensor bytes of one answer (as the body limit of a request)
# Calls over this many rows x (past + new) positions give the arena memory they grew back at their
# end, and the C heap is trimmed when a stage holds no sequence any more: after a 16-client load the
# stages' RSS came back within 25 MB of the baseline with 256 (+100-170 MB kept with 8192, +90 MB
# with 1024; ONNX Runtime's arena alone off did not help: glibc kept the freed blocks).
SHRINK_ABOVE = 256


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
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        kv_store: str | None = None,
    ):
        import onnxruntime as ort

        self.manifest, self.stage = manifest, stage
        self.io = stage_io(manifest, stage)
        # the graph output the scoring head reads
        self.hidden_out = c.FINAL_HIDDEN if self.io.last and gives_final_hidden(stage) else None
        self.x_name = self.io.x_name
        self.past_names = stage.past_names()
        if provider == "cuda":
            preload_cuda_libraries()  # the CUDA image (infra/docker/serve.Dockerfile) has no system CUDA
        self.session = ort.InferenceSession(
            str(Path(bundle) / stage.file), session_options(threads), providers=session_providers(provider)
        )
        self.providers = self.session.get_providers()
        require_in_session(provider, self.providers)  # ProviderError: never a silent CPU fallback
        # where the KV cache lives between steps (functions.kvstore); it fetches the final hidden
        # states (scoring) only when a call asks for them
        self.kv = make_store(
            resolve_kv_store(kv_store, provider),
            self.session,
            (manifest.num_kv_heads, manifest.head_dim),
            provider,
        )
        self.head = (
            Head.load(bundle, manifest, session_options(threads), session_providers(provider))
            if self.io.scoring
            else None
        )
        self.cache = KVCache(cache_bytes, idle_seconds)
        self.lock = threading.Lock()  # one batch at a time: the 409 check and the update are atomic
        self.max_batch_tokens = max_batch_tokens
        self.max_response_bytes = max_response_bytes
        # past keys and values of this stage's layers, float32: what one cached position costs
        # (KV heads x head width each: hidden_size would overcount GQA models)
        self.kv_position_bytes = len(self.past_names) * manifest.num_kv_heads * manifest.head_dim * 4
        # after a large call, ONNX Runtime hands the arena memory it grew for it back
        self.shrink = ort.RunOptions()
        arenas = "cpu:0;gpu:0" if provider == "cuda" else "cpu:0"
        self.shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)

    # ---- inference ----
    def infer(self, inputs: dict[str, np.ndarray], want: Collection[str] | None = None) -> StageResult:
        """Check and run one batch; `want` names the outputs asked for (None: the defaults)."""
        return self.run(StageBatch.from_tensors(inputs, self.io, want))

    def run(self, batch: StageBatch) -> StageResult:
        """Run one checked batch (functions.batch), refused (413) beyond this stage's bounds."""
        if batch.size * batch.width > self.max_batch_tokens:  # before any allocation for it
            raise PayloadTooLargeError(
                f"{batch.size} rows x {batch.width} positions = {batch.size * batch.width} per call; this "
                f"stage takes at most {self.max_batch_tokens} (TANDEM_MAX_BATCH_TOKENS): split the batch"
            )
        self._check_bounds(batch)
        with self.lock:
            return self._run_locked(batch)

    @property
    def max_call_positions(self) -> int:
        """Rows x (past + new) positions one call may hold: the KV cache budget."""
        return self.cache.max_bytes // max(self.kv_position_bytes, 1)

    def _check_bounds(self, batch: StageBatch) -> None:
        """The call's KV and its answer within the configured bounds, before any allocation."""
        positions = batch.size * (int(batch.past_lengths.max(initial=0)) + batch.width)
        if positions > self.max_call_positions:
            raise PayloadTooLargeError(
                f"{batch.size} rows x (past + new) positions = {positions} cached positions "
                f"({positions * self.kv_position_bytes} bytes of KV) in one call; this stage's KV cache "
                f"budget is {self.cache.max_bytes} bytes = {self.max_call_positions} positions "
                "(TANDEM_KV_CACHE_BYTES): split the batch"
            )
        answer = self.io.answer_bytes(batch.size, batch.width, batch.outputs)
        if answer > self.max_response_bytes:
            raise PayloadTooLargeError(
                f"the answer would carry {answer} bytes of tensors; this stage sends at most "
                f"{self.max_response_bytes} (TANDEM_MAX_RESPONSE_BYTES): ask for fewer rows or outputs"
            )

    def _run_locked(self, batch: StageBatch) -> StageResult:
        self.cache.expire()
        self._check_held(batch)
        feeds, P = self._feeds(batch)
        B, S = batch.size, batch.width
        extra = []
        if batch.scoring is not None and batch.scoring.scores_positions:
            assert self.hidden_out is not None  # a scoring stage's graph gives them (stage_io)
            extra = [self.hidden_out]
        shrink = self.shrink if B * (P + S) > SHRINK_ABOVE else None
        t0 = time.perf_counter()
        host, presents = self.kv.run(self.session, feeds, shrink, extra)
        seconds = time.perf_counter() - t0
        # before storing: a refused request changes nothing
        outputs = answer(self.io, batch, host[0], host[-1] if extra else None, self.head)
        self._store(batch, P, presents)
        if len(self.cache) == 0:
            give_back_memory()
        phase = "prefill" if int(batch.n_new.max()) > 1 else "decode"
        return StageResult(outputs, phase, B, seconds)

    def _check_held(self, batch: StageBatch) -> None:
        """409 (nothing changed) when a row's past length is not what this stage holds, or a row
        starts over a held sequence without saying so."""
        ids, past = batch.sequence_ids, batch.past_lengths
        held = np.array([self.cache.length(int(s)) for s in ids], dtype=np.int64)  # (B,)
        restart = batch.start if batch.start is not None else np.zeros_like(past, dtype=np.bool_)
        missed = (held != past) & (past != 0)
        unsaid = (past == 0) & (held > 0) & ~restart  # a held sequence started over without saying so
        bad = missed | unsaid
        if not bad.any():
            return
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

    def _feeds(self, batch: StageBatch) -> tuple[dict[str, Any], int]:
        """The session's inputs for a batch whose rows this stage holds, and P, the past width."""
        ids, past, n_new = batch.sequence_ids, batch.past_lengths, batch.n_new
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
        feeds.update({self.x_name: batch.x, c.ATTENTION_MASK: full_mask, c.POSITION_IDS: pos})
        return feeds, P

    def _gather(
        self, entries: list[Entry | None], batch: StageBatch, P: int
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Past keys/values of rows that come from different batches, copied into one right-aligned
        (B, H, P, D) tensor per past input by the KV store, with the full (B, P + S) attention mask."""
        B, S = batch.size, batch.width
        pasts = self.kv.gather(entries, len(self.past_names), P)
        feeds: dict[str, Any] = dict(zip(self.past_names, pasts, strict=True))
        full_mask = np.zeros((B, P + S), dtype=np.int64)  # (B, P + S)
        full_mask[:, P:] = batch.mask
        for b in range(B):
            full_mask[b, P - batch.past_lengths[b] : P] = 1
        return feeds, full_mask

    def _store(self, batch: StageBatch, P: int, presents: list[Any]) -> None:
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
                compact = self.kv.compact(presents, b, [(P - p, P), (P + S - n, P + S)])  # (1, H, p + n, D)
                self.cache.put(seq, Group(compact, np.zeros(1, dtype=np.int64), (seq,)), 0, keep)

    def fork(self, parent: int, length: int, children: list[int], release: bool) -> None:
        """Children that start where `parent` is (its `length` positions held here): a prompt's
        prefill shared by the choices of one request. 409 when the parent is not held at that length
        or a child id is held already; the parent is freed after (`release`), or on a 409."""
        with self.lock:
            self.cache.expire()
            held = self.cache.length(parent)
            taken = [s for s in children if s in self.cache]
            if held != length or taken:
                self.cache.release(parent)
                why = (
                    f"sequence(s) {taken} are held already"
                    if taken
                    else "the parent is not held at that length"
                )
                raise ConflictError(
                    f"cannot fork: {why}; prefill the children instead",
                    extra=c.conflict_extra(np.array([parent]), np.array([held]), np.array([length])),
                )
            self.cache.fork(parent, children)
            if release:
                self.cache.release(parent)

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
            else np.zeros((1, 4, self.io.hidden_size), dtype=np.float32)
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
