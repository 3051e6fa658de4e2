"""The KV store seam (functions.kvstore): the device store (OrtValues bound with IOBinding, moved
by device copies; here on the CPU device) gives the same outputs and holds the same positions as
the host store, step for step, through every path of the engine: prefill, a batch fed back as it
is, rows joining from different batches (gather), a padded row with a past (compact), eviction,
a 409, and sequence_end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from functions import contract as c
from functions.bundle import load_manifest
from functions.device import HostCopier
from functions.engine import StageEngine
from functions.errors import ConflictError
from functions.kvcache import Entry, Group, dims
from functions.kvstore import DeviceStore, HostStore, resolve_kv_store

H, D = 2, 4


class _FakeOutput:
    def __init__(self, name: str):
        self.name = name


class _Session:
    """Only what a store reads off a session at construction: its output names."""

    def get_outputs(self) -> list[_FakeOutput]:
        return [_FakeOutput(n) for n in (c.hidden_states(2), c.present(0, "key"), c.present(0, "value"))]


def _stores() -> tuple[HostStore, DeviceStore]:
    return HostStore(_Session(), (H, D)), DeviceStore(_Session(), (H, D), "cpu", HostCopier())


def _on(store: Any, a: np.ndarray) -> Any:
    if isinstance(store, HostStore):
        return a
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))


def _host(t: Any) -> np.ndarray:
    return t if isinstance(t, np.ndarray) else np.array(t.numpy())


def test_gather_and_compact_agree_and_place_every_position() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, H, 7, D)).astype(np.float32)  # a batch of 3 rows, 7 positions
    b = rng.standard_normal((1, H, 4, D)).astype(np.float32)
    results = []
    for store in _stores():
        ga = Group([_on(store, a), _on(store, a + 1)], np.array([2, 0, 5]), (1, 2, 3))
        gb = Group([_on(store, b), _on(store, b + 1)], np.array([0]), (4,))
        assert (ga.width, gb.width) == (7, 4) and dims(ga.arrays[0]) == (3, H, 7, D)
        entries = [Entry(gb, 0, 4, 0, 0.0), None, Entry(ga, 2, 2, 0, 0.0), Entry(ga, 0, 5, 0, 0.0)]
        gathered = [_host(t) for t in store.gather(entries, 2, 6)]
        compacted = [_host(t) for t in store.compact([_on(store, a), _on(store, a + 1)], 1, [(1, 3), (5, 7)])]
        results.append((gathered, compacted))
    (hg, hc), (dg, dc) = results
    for x, y in zip(hg + hc, dg + dc, strict=True):
        np.testing.assert_array_equal(x, y)
    k = hg[0]  # (4, H, 6, D), right-aligned, zeros before each row's positions
    np.testing.assert_array_equal(k[0, :, 2:], b[0])
    assert not k[0, :, :2].any() and not k[1].any()
    np.testing.assert_array_equal(k[2, :, 4:], a[2, :, 5:])
    np.testing.assert_array_equal(k[3, :, 1:], a[0, :, 2:])
    np.testing.assert_array_equal(hg[1][3, :, 1:], a[0, :, 2:] + 1)
    np.testing.assert_array_equal(hc[0][0], np.concatenate([a[1, :, 1:3], a[1, :, 5:7]], axis=1))


def test_the_store_follows_the_provider_unless_set() -> None:
    assert resolve_kv_store(None, "cpu") == "host" and resolve_kv_store("auto", "cuda") == "device"
    assert resolve_kv_store("device", "cpu") == "device" and resolve_kv_store("host", "cuda") == "host"
    with pytest.raises(ValueError, match="host, device"):
        resolve_kv_store("gpu", "cpu")


def _engines(bundle: Path, stage: str, cache_bytes: int) -> list[StageEngine]:
    m = load_manifest(bundle)
    return [
        StageEngine(bundle, m, m.stage(stage), threads=1, cache_bytes=cache_bytes, kv_store=kind)
        for kind in ("host", "device")
    ]


def _batch(ids: list[int], past: list[int], tokens: list[list[int]], **extra: Any) -> dict[str, np.ndarray]:
    width = max(len(t) for t in tokens)
    x = np.zeros((len(ids), width), dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for b, t in enumerate(tokens):
        x[b, width - len(t) :], mask[b, width - len(t) :] = t, 1
    return {
        c.SEQUENCE_IDS: np.array(ids, dtype=np.int64),
        c.PAST_LENGTHS: np.array(past, dtype=np.int64),
        c.INPUT_IDS: x,
        c.ATTENTION_MASK: mask,
        **extra,
    }


def test_device_store_engine_matches_host_store_step_for_step(tiny_bundle: Path) -> None:
    # two 8-position sequences fit the budget (2 layers x K,V x 64 x 4 bytes per position), three do not
    host, device = _engines(tiny_bundle, "stage-1", cache_bytes=22_000)
    assert (host.kv.kind, device.kv.kind) == ("host", "device")
    steps: list[dict[str, np.ndarray]] = [
        _batch([1, 2], [0, 0], [[5, 6, 7], [8, 9]]),  # prefill, left-padded
        _batch([1, 2], [3, 2], [[10], [11]]),  # the same rows: presents fed back as they are
        _batch([1, 2], [4, 3], [[12], [13]]),
        _batch([3, 1], [0, 5], [[1, 2, 3, 4], [14]]),  # a new row joins: gather, and a padded row compacted
        _batch([2, 3, 1], [4, 4, 6], [[15], [16], [17]]),  # rows from two batches: gather
        _batch([4], [0], [[1, 2, 3, 4, 5, 6, 7, 8]]),  # over the budget: evicts the least recently used
    ]
    for inputs in steps:
        got = [e.infer(dict(inputs)).outputs[c.hidden_states(2)] for e in (host, device)]
        np.testing.assert_allclose(got[1], got[0], rtol=0, atol=1e-5)
        assert host.held() == device.held()
        assert host.cache.bytes == device.cache.bytes and host.cache.evictions == device.cache.evictions
    assert host.cache.evictions > 0
    evicted = sorted({1, 2, 3} - set(host.held()))[0]
    for e in (host, device):  # an evicted sequence is a 409, as on the host; replay from zero works
        with pytest.raises(ConflictError):
            e.infer(_batch([evicted], [9], [[1]]))
    replay = _batch([evicted], [0], [[5, 6, 7, 10, 12, 14, 17]])
    got = [e.infer(dict(replay)).outputs[c.hidden_states(2)] for e in (host, device)]
    np.testing.assert_allclose(got[1], got[0], rtol=0, atol=1e-5)
    done = _batch([evicted], [7], [[3]], **{c.SEQUENCE_END: np.array([True])})
    for e in (host, device):
        e.infer(done)
        assert evicted not in e.held()
