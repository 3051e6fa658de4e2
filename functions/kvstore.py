"""Where a stage's KV cache tensors live between steps, and how a step runs the session with them:
the seam between the engine (which rows, which positions; functions.engine) and the memory.

- HostStore (TANDEM_KV_STORE=host, the default on the CPU): numpy arrays, the session's outputs as
  `session.run` returns them, fed back in as they are.
- DeviceStore (TANDEM_KV_STORE=device, the default with --provider cuda): ONNX Runtime OrtValues
  on the session's device ('cuda', or 'cpu' where the CPU tests run it). Every step binds the
  pasts as they are (IOBinding) and lets ONNX Runtime allocate the presents on the device, so a
  cache grows without a host round trip; rows from different batches are gathered, and a padded
  row compacted, by copies on the device (functions.device.Copier). Only the stage's other
  outputs (hidden states, logits) and the small inputs (ids, mask, positions) cross to the host.

Both keep a tensor as (B, H, T, D): a store copies positions [s0, s0 + n) of one row into another
tensor, which is all that gathering and compacting need. What is evicted or replayed is decided
by functions.kvcache the same way for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from functions import contract as c
from functions.device import Copier, CudaCopier, HostCopier
from functions.kvcache import Entry, dims

KV_STORES = ("host", "device")
KV_STORE_CHOICES = ("auto", *KV_STORES)  # auto: device with CUDA, host on the CPU
_ITEM_BYTES = {"tensor(float)": 4, "tensor(float16)": 2}


def resolve_kv_store(kv_store: str | None, provider: str) -> str:
    """None (not set): the device store with CUDA, the host store on the CPU."""
    if kv_store is None or kv_store == "auto":
        return "device" if provider == "cuda" else "host"
    if kv_store not in KV_STORES:
        raise ValueError(f"kv store must be one of {', '.join(KV_STORES)}, got {kv_store!r}")
    return kv_store


class KVStore:
    """What the engine asks of a store; subclasses say how tensors are made, copied and bound."""

    kind = ""

    def __init__(self, session: Any, head: tuple[int, int]):
        names = [o.name for o in session.get_outputs()]
        self.present_names = [n for n in names if n.startswith(c.PRESENT_PREFIX)]
        # the final hidden states (scoring) are fetched only when a call asks for them (`extra`)
        self.host_names = [n for n in names if not n.startswith(c.PRESENT_PREFIX) and n != c.FINAL_HIDDEN]
        self.names = self.host_names + self.present_names
        self.kv_heads, self.head_dim = head  # (H_kv, D) of every past and present

    # ---- what a subclass provides ----
    def run(
        self, session: Any, feeds: dict[str, Any], options: Any, extra: Sequence[str] = ()
    ) -> tuple[list[np.ndarray], list[Any]]:
        """Run one step: (host outputs in `host_names` order then `extra`'s, presents in
        `present_names` order)."""
        raise NotImplementedError

    def _empty(self, shape: tuple[int, ...], zero: bool) -> Any:
        raise NotImplementedError

    def _copy(self, dst: Any, db: int, d0: int, src: Any, sb: int, s0: int, n: int) -> None:
        """Positions [s0, s0 + n) of row sb of src -> positions [d0, d0 + n) of row db of dst."""
        raise NotImplementedError

    # ---- shared ----
    def gather(self, entries: Sequence[Entry | None], n_past: int, P: int) -> list[Any]:
        """One right-aligned (B, H, P, D) tensor per past input: row b holds entries[b]'s positions
        at the end, zeros before (masked out; zeros, never garbage, so no NaN reaches a score)."""
        B, H, D = len(entries), self.kv_heads, self.head_dim
        out = []
        for i in range(n_past):
            buf = self._empty((B, H, P, D), zero=True)
            for b, e in enumerate(entries):
                if e is not None and e.length:
                    src = e.group.arrays[i]
                    self._copy(buf, b, P - e.length, src, e.row, e.group.width - e.length, e.length)
            out.append(buf)
        return out

    def compact(self, presents: Sequence[Any], row: int, spans: Sequence[tuple[int, int]]) -> list[Any]:
        """Row `row` of every present, positions spans[0] then spans[1] ... back to back: (1, H, n, D)."""
        n = sum(end - begin for begin, end in spans)
        out = []
        for a in presents:
            buf = self._empty((1, self.kv_heads, n, self.head_dim), zero=False)
            at = 0
            for begin, end in spans:
                self._copy(buf, 0, at, a, row, begin, end - begin)
                at += end - begin
            out.append(buf)
        return out


class HostStore(KVStore):
    """numpy arrays in host memory, `session.run` (the CPU default)."""

    kind = "host"

    def run(
        self, session: Any, feeds: dict[str, Any], options: Any, extra: Sequence[str] = ()
    ) -> tuple[list[np.ndarray], list[Any]]:
        host = [*self.host_names, *extra]
        outs = session.run([*host, *self.present_names], feeds, options)
        return outs[: len(host)], outs[len(host) :]

    def _empty(self, shape: tuple[int, ...], zero: bool) -> Any:
        return np.zeros(shape, dtype=np.float32) if zero else np.empty(shape, dtype=np.float32)

    def _copy(self, dst: Any, db: int, d0: int, src: Any, sb: int, s0: int, n: int) -> None:
        dst[db, :, d0 : d0 + n] = src[sb, :, s0 : s0 + n]


class DeviceStore(KVStore):
    """OrtValues on `device` ('cuda' or 'cpu'), bound with IOBinding, moved by `copier`."""

    kind = "device"

    def __init__(self, session: Any, head: tuple[int, int], device: str, copier: Copier, device_id: int = 0):
        super().__init__(session, head)
        self.device, self.device_id, self.copier = device, device_id, copier

    def run(
        self, session: Any, feeds: dict[str, Any], options: Any, extra: Sequence[str] = ()
    ) -> tuple[list[np.ndarray], list[Any]]:
        host = [*self.host_names, *extra]
        binding = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)  # a small input, or an empty past (prefill)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in host:
            binding.bind_output(name, "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device, self.device_id)
        session.run_with_iobinding(binding, options)
        outs = binding.get_outputs()
        k = len(host)
        # numpy() of a host OrtValue is a view of memory the binding owns: copy it out
        return [np.array(o.numpy()) for o in outs[:k]], list(outs[k:])

    def _empty(self, shape: tuple[int, ...], zero: bool) -> Any:
        import onnxruntime as ort

        if 0 in shape:  # the empty past of a prefill: bound from the host, nothing to copy into it
            return np.zeros(shape, dtype=np.float32)
        value = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, self.device, self.device_id)
        if zero:
            self.copier.zero(value.data_ptr(), int(np.prod(shape)) * 4)
        return value

    def _copy(self, dst: Any, db: int, d0: int, src: Any, sb: int, s0: int, n: int) -> None:
        if n <= 0:
            return
        _, H, Td, D = dims(dst)
        _, _, Ts, _ = dims(src)
        item = _ITEM_BYTES[src.data_type()]
        self.copier.copy2d(
            dst.data_ptr() + ((db * H * Td) + d0) * D * item,
            Td * D * item,
            src.data_ptr() + ((sb * H * Ts) + s0) * D * item,
            Ts * D * item,
            n * D * item,
            H,
        )


def make_store(kind: str, session: Any, head: tuple[int, int], provider: str) -> KVStore:
    if kind == "host":
        return HostStore(session, head)
    if provider == "cuda":
        return DeviceStore(session, head, "cuda", CudaCopier())
    return DeviceStore(session, head, "cpu", HostCopier())
