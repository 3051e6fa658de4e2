"""A protocol fuzzer for real stage processes' infer route (POST /v2/models/stage-k/infer): the first
stage (token ids in) and the last (hidden states in, sampling parameters, token ids out).

Hypothesis builds valid Open Inference Protocol requests (JSON tensors or the binary tensor
extension) and mutates them: tensor names, datatypes, shapes (negative, huge, not integers, too many
dimensions), values (negative or duplicate sequence ids, bad past_lengths, token ids beyond the
vocabulary), binary sizes, the `Inference-Header-Content-Length` header (missing, not a number,
beyond the body), truncated or trailing binary data, garbage bodies, the model name; and what a
request asks back: any subset of the outputs the stage lists (or none), `binary_data` per output and
the request's `binary_data_output` (each valid or not), with or without the inputs that the last
stage's optional outputs need (num_top_logprobs, target_ids). Every answer must be below 500 (a 4xx
carries a problem body that says what is wrong); a valid case's 200 carries exactly the outputs
asked (or the stage's defaults), each binary or JSON as asked; the process never exits, and its
resident memory stays under a stated bound during and after the run. Derandomized, so CI runs the
same cases every time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from functions import contract as c
from functions import protocol
from tests.helpers.procs import ProcessHandle, free_port, start_stage, stop_process

pytestmark = [pytest.mark.fuzz, pytest.mark.processes]

# stage -> cases: the first stage (token ids), and the last (hidden states in, sampling parameters)
CASES = {1: 3000, 3: 1500}
VOCAB = 520  # the tiny test model (tests/conftest.py): vocabulary, width, 2 layers per stage
N_EMBD = 64
KV_CACHE_BYTES = 64 << 20  # the fuzzed stage's KV cache budget: valid cases create sequences
RSS_SLACK_KB = 300 * 1024  # RSS may grow at most this much over the warmed-up baseline
RSS_EVERY = 50  # cases between RSS samples
TIMEOUT = 30.0  # per request; a stage that takes longer is stuck
# valid cases answered 200 whose outputs are checked, per form (named, defaults): the counts vary
# with what ran before in the session (5 to 40 named on stage-3 so far), so this only says the
# dimension ran; tests/functions/test_stage_conformance.py asks for every output deterministically
MIN_CHECKED = 1

TENSOR_NAMES = [c.SEQUENCE_IDS, c.PAST_LENGTHS, c.INPUT_IDS, c.ATTENTION_MASK, c.SEQUENCE_END]
OTHER_NAMES = [
    c.hidden_states(2),
    c.hidden_states(4),
    c.TOKEN_IDS,
    c.TEMPERATURE,
    c.TOP_K,
    c.TOP_P,
    c.SEED,
    c.LOGITS,
    "",
]
DATATYPES = [*protocol.DATATYPES, "BYTES", "INT128", "fp32", ""]
BIG = [2**1024, -(10**400), 2**64, 1e308, -1e-320]  # JSON numbers beyond float32 / float64 / int64
HUGE = [2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 10**30, protocol.MAX_ELEMENTS + 1]


@dataclass
class Tensor:
    name: Any
    datatype: Any
    shape: Any
    values: np.ndarray
    binary: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # entry fields added or replaced


def _valid_tensors(draw: st.DrawFn, stage: int) -> list[Tensor]:
    rows = draw(st.integers(1, 4))
    width = draw(st.integers(1, 6))
    ids = draw(st.lists(st.integers(0, 2**62), min_size=rows, max_size=rows, unique=True))
    # half the batches start every row (a 200 unless something else is wrong), half may not (409)
    fresh = draw(st.booleans())
    past = (
        [0] * rows
        if fresh
        else draw(st.lists(st.sampled_from([0, 0, 0, 1, 4]), min_size=rows, max_size=rows))
    )
    tensors = [
        Tensor(c.SEQUENCE_IDS, "INT64", [rows], np.array(ids, np.int64)),
        Tensor(c.PAST_LENGTHS, "INT64", [rows], np.array(past, np.int64)),
    ]
    if stage == 1:
        tokens = draw(st.lists(st.integers(0, VOCAB - 1), min_size=rows * width, max_size=rows * width))
        x = np.array(tokens, np.int64).reshape(rows, width)
        tensors.append(Tensor(c.INPUT_IDS, "INT64", [rows, width], x))
    else:  # hidden states of any finite magnitude, and the sampling parameters, edges included
        scale = draw(st.sampled_from([1.0, 1e-30, 1e10, 3e38]))
        x = np.random.default_rng(draw(st.integers(0, 99))).standard_normal((rows, width, N_EMBD)) * scale
        with np.errstate(all="ignore"):
            x32 = np.clip(x, -3e38, 3e38).astype(np.float32)
        tensors.append(Tensor(c.hidden_states(2 * (stage - 1)), "FP32", [rows, width, N_EMBD], x32))
        edges = {
            c.TEMPERATURE: [0.0, 1.0, 1e-45, 1e-30, c.TEMPERATURE_MAX, 0.7],
            c.TOP_P: [1.0, c.TOP_P_MIN, 1e-30, 0.5, 0.999],
            c.TOP_K: [0, 1, VOCAB, VOCAB - 1, 40],
            c.SEED: [-1, 0, 2**62 - 1, -(2**63), 2**63 - 1, 7],
        }
        for p in c.SAMPLING:
            if draw(st.integers(0, 3)):
                values = draw(st.lists(st.sampled_from(edges[p.name]), min_size=rows, max_size=rows))
                tensors.append(Tensor(p.name, p.datatype, [rows], np.array(values, p.dtype)))
    if draw(st.booleans()):
        pad = draw(st.lists(st.integers(0, width - 1), min_size=rows, max_size=rows))
        mask = np.array([[0] * p + [1] * (width - p) for p in pad], np.int64)
        tensors.append(Tensor(c.ATTENTION_MASK, "INT64", [rows, width], mask))
    if draw(st.booleans()):
        end = np.array(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)), np.bool_)
        tensors.append(Tensor(c.SEQUENCE_END, "BOOL", [rows], end))
    if fresh and draw(st.integers(0, 3)):  # start over even a sequence an earlier case left held
        tensors.append(Tensor(c.SEQUENCE_START, "BOOL", [rows], np.ones(rows, np.bool_)))
    if stage != 1:
        tensors += _scoring_tensors(draw, tensors, rows, width)
    for t in tensors:
        t.binary = draw(st.booleans())
    return tensors


def _scoring_tensors(draw: st.DrawFn, tensors: list[Tensor], rows: int, width: int) -> list[Tensor]:
    """The inputs the last stage's optional outputs need, each sent or not (valid values)."""
    out = []
    if draw(st.booleans()):
        top = draw(st.lists(st.integers(0, c.TOP_LOGPROBS_MAX), min_size=rows, max_size=rows))
        out.append(Tensor(c.NUM_TOP, "INT64", [rows], np.array(top, np.int64)))
    if draw(st.booleans()):
        mask = next(
            (t.values for t in tensors if t.name == c.ATTENTION_MASK), np.ones((rows, width), np.int64)
        )
        ids = draw(st.lists(st.integers(-1, VOCAB - 1), min_size=rows * width, max_size=rows * width))
        targets = np.where(mask == 1, np.array(ids, np.int64).reshape(rows, width), -1)
        out.append(Tensor(c.TARGET_IDS, "INT64", [rows, width], targets))
    return out


# the outputs each fuzzed stage lists (its metadata), and what a request that names none gets
LISTED = {
    1: [c.hidden_states(2)],
    3: [c.TOKEN_IDS, c.LOGPROBS, c.LOGITS, c.TOP_IDS, c.TOP_LOGPROBS]
    + [c.TARGET_LOGPROBS, c.TARGET_TOP_IDS, c.TARGET_TOP_LOGPROBS],
}


@dataclass
class Expect:
    """What a 200 must carry: output name -> binary or not (None: the stage's defaults, each
    binary as `default_binary` says); `refused`: an output asked whose driving input is absent."""

    outputs: dict[str, bool] | None
    default_binary: bool
    refused: bool = False

    def names(self, stage: int, sent: set[str]) -> set[str]:
        if self.outputs is not None:
            return set(self.outputs)
        if stage == 1:
            return set(LISTED[1])
        return {c.TOKEN_IDS, c.LOGPROBS} | {o for o, need in c.OUTPUT_NEEDS.items() if need in sent}

    def binary(self, name: str) -> bool:
        return self.default_binary if self.outputs is None else self.outputs[name]


def _asked_back(draw: st.DrawFn, stage: int, sent: set[str]) -> tuple[dict[str, Any], Expect | None]:
    """The request's `outputs` and `parameters`: valid mostly (with the Expect a 200 must meet),
    sometimes broken (then any 4xx will do)."""
    extra: dict[str, Any] = {}
    broken = False
    flag = draw(st.sampled_from(["absent", "absent", True, True, False, "bad"]))
    if flag == "bad":
        broken = True
        extra["parameters"] = draw(
            st.sampled_from([[], "x", {"binary_data_output": "yes"}, {"binary_data_output": 1}])
        )
    elif flag != "absent":
        extra["parameters"] = {"binary_data_output": flag}
    default = flag is True
    form = draw(st.sampled_from(["none", "subset", "subset", "subset", "broken"]))
    if form == "none":
        return extra, None if broken else Expect(None, default)
    if form == "broken":
        extra["outputs"] = draw(st.sampled_from([{}, "all", [3], [{"name": 3}], [{"parameters": {}}]]))
        return extra, None
    names = draw(st.lists(st.sampled_from(LISTED[stage]), unique=True, max_size=4))
    if draw(st.integers(0, 7)) == 0:  # an unknown output, or one asked twice
        names.append(draw(st.sampled_from(["nope", *names])))
    entries, asked = [], {}
    for name in names:
        entry: dict[str, Any] = {"name": name}
        per = draw(st.sampled_from(["absent", "absent", True, True, False, False, "bad"]))
        if per == "bad":
            broken = True
            entry["parameters"] = {"binary_data": draw(st.sampled_from([1, "true", [], {}]))}
        elif per != "absent":
            entry["parameters"] = {"binary_data": per}
        entries.append(entry)
        broken |= name == "nope" or name in asked  # unknown, or asked twice
        asked[name] = default if per in ("absent", "bad") else bool(per)
    extra["outputs"] = entries
    if broken:
        return extra, None
    refused = any(c.OUTPUT_NEEDS.get(n) not in (None, *sent) for n in asked)
    return extra, Expect(asked or None, default, refused)


MUTATIONS = "name datatype shape values drop duplicate size data numbers dtype-bytes".split()
_ints = st.one_of(st.integers(-5, 10), st.sampled_from(HUGE), st.integers(-(2**63), -1))
_odd_dims = st.one_of(_ints, st.sampled_from([True, 1.5, "2", None, [], {}]))


def _mutate_tensor(draw: st.DrawFn, tensors: list[Tensor]) -> None:
    t = draw(st.sampled_from(tensors))
    _MUTATORS[draw(st.sampled_from(MUTATIONS))](draw, t, tensors)


def _mutate_name(draw: st.DrawFn, t: Tensor, tensors: list[Tensor]) -> None:
    t.name = draw(st.one_of(st.sampled_from(TENSOR_NAMES + OTHER_NAMES), st.text(max_size=8), _ints))


def _mutate_datatype(draw: st.DrawFn, t: Tensor, tensors: list[Tensor]) -> None:
    t.datatype = draw(st.one_of(st.sampled_from(DATATYPES), st.integers()))


def _mutate_shape(draw: st.DrawFn, t: Tensor, tensors: list[Tensor]) -> None:
    t.shape = draw(
        st.one_of(
            st.lists(_ints, max_size=10),
            st.lists(_odd_dims, max_size=3),
            st.sampled_from([None, 7, "[1]", {}]),
        )
    )


def _mutate_values(draw: st.DrawFn, t: Tensor, tensors: list[Tensor]) -> None:
    if t.values.dtype == np.int64 and t.values.size:
        flat = t.values.reshape(-1).copy()
        i = draw(st.integers(0, flat.size - 1))
        flat[i] = draw(st.sampled_from([-1, -(2**63), 2**63 - 1, VOCAB, 10**6, 1024, 1025, int(flat[0])]))
        t.values = flat.reshape(t.values.shape)
    else:
        t.values = np.array(draw(st.lists(st.integers(-3, 3), max_size=6)), np.int64)


def _drop(draw: st.DrawFn, t: Tensor, tensors: list[Tensor]) -> None:
    tensors.remove(t)


def _duplicate(draw: st.DrawFn, t: Tensor, tensors: list[Tensor]) -> None:
    tensors.append(Tensor(t.name, t.datatype, t.shape, t.values, t.binary))


def _mutate_size(draw: st.DrawFn, t: Tensor, tensors: list[Tensor]) -> None:
    t.extra["parameters"] = {
        "binary_data_size": draw(st.one_of(_ints, st.sampled_from([True, "8", 1.5, None])))
    }


def _mutate_data(draw: st.DrawFn, t: Tensor, tensors: list[Tensor]) -> None:
    t.binary = False
    if draw(st.booleans()):
        t.datatype = draw(st.sampled_from(list(protocol.DATATYPES)))
    t.extra["data"] = draw(
        st.one_of(
            st.lists(
                st.one_of(
                    st.integers(), st.floats(), st.booleans(), st.text(max_size=3), st.sampled_from(BIG)
                ),
                max_size=8,
            ),
            st.recursive(st.integers(-3, 3), lambda s: st.lists(s, max_size=3), max_leaves=10),
            st.sampled_from([None, "abc", {}, 1e308, 10**400]),
        )
    )


def _mutate_numbers(draw: st.DrawFn, t: Tensor, tensors: list[Tensor]) -> None:
    """JSON numbers in a tensor of any numeric datatype."""
    t.binary = False
    t.datatype = draw(st.sampled_from(["FP16", "FP32", "FP64", "INT8", "UINT64", "INT64"]))
    values = st.one_of(st.integers(), st.floats(), st.sampled_from(BIG))
    t.extra["data"] = draw(st.lists(values, min_size=1, max_size=4))
    t.shape = [len(t.extra["data"])]


def _mutate_dtype_bytes(draw: st.DrawFn, t: Tensor, tensors: list[Tensor]) -> None:
    """The same bytes under another datatype (sizes then mismatch, or values reinterpret)."""
    t.datatype = draw(st.sampled_from(list(protocol.DATATYPES)))
    with np.errstate(all="ignore"):  # overflowing casts are the point
        t.values = t.values.astype(protocol.DATATYPES[t.datatype])


# a mutation (one of MUTATIONS, drawn in that order) -> what it does to the drawn tensor
_MUTATORS = {
    "name": _mutate_name,
    "datatype": _mutate_datatype,
    "shape": _mutate_shape,
    "values": _mutate_values,
    "drop": _drop,
    "duplicate": _duplicate,
    "size": _mutate_size,
    "data": _mutate_data,
    "numbers": _mutate_numbers,
    "dtype-bytes": _mutate_dtype_bytes,
}


def _encode(tensors: list[Tensor], header_extra: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    entries, chunks = [], []
    for t in tensors:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.binary:
            data = np.ascontiguousarray(t.values).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = t.values.reshape(-1).tolist()
        entry.update(t.extra)
        entries.append(entry)
    header = {"inputs": entries, **header_extra}
    return header, b"".join(chunks)


@dataclass
class Case:
    kind: str
    model: str
    body: bytes
    headers: dict[str, str]
    expect: Expect | None = None  # for a valid case: what its 200 must carry
    sent: set[str] = field(default_factory=set)  # the input names it sends

    def describe(self) -> str:
        return f"{self.kind} model={self.model!r} headers={self.headers} body={self.body[:400]!r}"


@st.composite
def cases(draw: st.DrawFn, stage: int) -> Case:
    kind = draw(
        st.sampled_from(["valid", "valid", "tensor", "tensor", "tensor", "body", "header", "garbage"])
    )
    tensors = _valid_tensors(draw, stage)
    if kind == "tensor":
        for _ in range(draw(st.integers(1, 3))):
            if tensors:
                _mutate_tensor(draw, tensors)
    sent = {t.name for t in tensors if isinstance(t.name, str)}
    header_extra, expect = _asked_back(draw, stage, sent)
    if draw(st.integers(0, 9)) == 0:
        header_extra["id"] = draw(st.sampled_from(["req-1", 7, None, ""]))
    header, data = _encode(tensors, header_extra)
    head = json.dumps(header).encode()
    framing = _FRAMINGS.get(kind, _as_built)
    body, hlen = framing(draw, head, data)
    others = [c.stage_name(k) for k in (1, 2, 3) if k != stage] + ["stage-0", "x", "1", "%00"]
    model = draw(st.sampled_from([c.stage_name(stage)] * 40 + others))
    headers = {"content-type": "application/octet-stream"}
    if hlen is not None:
        headers[protocol.HEADER] = hlen
    valid = kind == "valid" and model == c.stage_name(stage) and header_extra.get("id") != 7
    return Case(kind, model, body, headers, expect if valid else None, sent)


# A case's body and Inference-Header-Content-Length (None: the header left out) from its encoded
# JSON header and binary tail: as built, or broken as the case's kind says.
Framing = tuple[bytes, str | None]


def _as_built(draw: st.DrawFn, head: bytes, data: bytes) -> Framing:
    return head + data, str(len(head))


def _broken_body(draw: st.DrawFn, head: bytes, data: bytes) -> Framing:
    body, hlen = _as_built(draw, head, data)
    how = draw(st.sampled_from(["truncate", "append", "flip", "json-only"]))
    if how == "truncate":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif how == "append":
        body += draw(st.binary(min_size=1, max_size=64))
    elif how == "flip" and data:
        i = draw(st.integers(len(head), len(body) - 1))
        body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1 :]
    else:  # json-only (or a flip with no binary tail): the tail read as part of the JSON
        hlen = None
    return body, hlen


def _broken_header(draw: st.DrawFn, head: bytes, data: bytes) -> Framing:
    body = head + data
    hlen = draw(
        st.one_of(
            st.none(),
            st.integers(-(2**70), 2**70).map(str),
            st.sampled_from(["", "abc", "1e3", "0x10", "1_0", "+5", "-0", "9" * 5000]),
            st.integers(0, len(body) + 2).map(str),
            # what HTTP allows in a header value (no surrounding spaces)
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=10).map(str.strip),
        )
    )
    return body, hlen


def _garbage(draw: st.DrawFn, head: bytes, data: bytes) -> Framing:
    body = draw(st.binary(max_size=256))
    return body, draw(st.one_of(st.none(), st.integers(0, len(body)).map(str)))


_FRAMINGS = {"body": _broken_body, "header": _broken_header, "garbage": _garbage}


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


@pytest.fixture(params=sorted(CASES), ids=[c.stage_name(k) for k in sorted(CASES)])
def stage(request: pytest.FixtureRequest, tiny_bundle: Path) -> Iterator[tuple[int, str, ProcessHandle]]:
    port = free_port()
    k = request.param
    handle = start_stage(tiny_bundle, k, port, env={"TANDEM_KV_CACHE_BYTES": str(KV_CACHE_BYTES)})
    try:
        yield k, f"http://127.0.0.1:{port}", handle
    finally:
        stop_process(handle)


def test_stage_infer_fuzz(stage: tuple[int, str, ProcessHandle]) -> None:
    k, url, handle = stage
    name = c.stage_name(k)
    pid = handle.process.pid
    client = httpx.Client(timeout=TIMEOUT)
    # warm up (first calls allocate ONNX Runtime's arena) before taking the baseline
    for n in (1, 8, 64):
        x = np.ones((1, n), np.int64) if k == 1 else np.ones((1, n, N_EMBD), np.float32)
        body, hlen = protocol.encode_request(
            {
                c.SEQUENCE_IDS: np.array([n], np.int64),
                c.PAST_LENGTHS: np.array([0], np.int64),
                c.INPUT_IDS if k == 1 else c.hidden_states(2 * (k - 1)): x,
                c.SEQUENCE_END: np.array([True]),
            }
        )
        r = client.post(f"{url}/v2/models/{name}/infer", content=body, headers={protocol.HEADER: str(hlen)})
        assert r.status_code == 200, r.text
    baseline = rss_kb(pid)
    bound = baseline + RSS_SLACK_KB
    statuses: dict[tuple[str, int], int] = {}
    failures: list[str] = []
    peak = baseline
    count = 0
    answered = [0, 0]  # valid cases answered 200 that named outputs, that named none
    t0 = time.monotonic()

    @settings(
        max_examples=CASES[k],
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(cases(k))
    def run(case: Case) -> None:
        nonlocal count, peak
        count += 1
        try:
            r = client.post(f"{url}/v2/models/{case.model}/infer", content=case.body, headers=case.headers)
        except httpx.HTTPError as e:
            failures.append(f"no answer ({e!r}): {case.describe()}")
            return
        statuses[case.kind, r.status_code] = statuses.get((case.kind, r.status_code), 0) + 1
        problem = check_response(r) or check_outputs(r, case, k)
        if case.expect is not None and r.status_code == 200:
            answered[case.expect.outputs is None] += 1
        if problem:
            failures.append(f"{problem}: {case.describe()}")
        if handle.process.poll() is not None:
            failures.append(f"the stage exited with {handle.process.returncode} after {case.describe()}")
            raise AssertionError("\n".join(failures) + "\n" + handle.stderr_tail())
        if count % RSS_EVERY == 0:
            peak = max(peak, rss_kb(pid))

    try:
        run()
    finally:
        client.close()
    elapsed = time.monotonic() - t0
    after = rss_kb(pid)
    peak = max(peak, after)
    print(
        f"\n{name} fuzz: {count} cases in {elapsed:.1f} s; RSS baseline {baseline // 1024} MiB, "
        f"peak {peak // 1024} MiB, after {after // 1024} MiB (bound {bound // 1024} MiB)"
    )
    for (kind, status), n in sorted(statuses.items()):
        print(f"  {kind:8} {status}: {n}")
    print(f"  outputs checked on 200s: {answered[0]} named, {answered[1]} the defaults")
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures[:20])
    assert count >= 1000, f"only {count} cases ran"
    assert min(answered) >= MIN_CHECKED, f"too few 200s to check the outputs on: {answered}"
    assert handle.process.poll() is None
    assert peak <= bound, f"stage RSS peaked at {peak} kB, over the bound of {bound} kB"
    # still serving
    ready = httpx.get(f"{url}/v2/health/ready", timeout=5)
    assert ready.status_code == 200, ready.text


def check_outputs(r: httpx.Response, case: Case, stage: int) -> str | None:
    """For a valid case's 200: exactly the outputs asked (or the defaults), each framed as asked."""
    expect = case.expect
    if expect is None or r.status_code != 200:
        return None
    if expect.refused:
        return "200 for an output whose driving input was not sent (a 400 should name it)"
    raw = r.headers.get(protocol.HEADER)
    hlen = int(raw) if raw is not None else len(r.content)
    header = json.loads(r.content[:hlen])
    got = {o["name"]: "binary_data_size" in o.get("parameters", {}) for o in header["outputs"]}
    want = expect.names(stage, case.sent)
    if set(got) != want:
        return f"outputs {sorted(got)}, asked {sorted(want)}"
    wrong = sorted(n for n, binary in got.items() if binary != expect.binary(n))
    if wrong:
        return f"outputs {wrong} not framed as asked (binary or JSON)"
    protocol.decode_response(r.content, int(raw) if raw is not None else None)  # readable
    return None


def check_response(r: httpx.Response) -> str | None:
    """What is wrong with an answer, or None."""
    if r.status_code >= 500:
        return f"{r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        try:
            body = r.json()
        except ValueError:
            return f"{r.status_code} without a JSON body: {r.text[:200]!r}"
        detail = body.get("detail") if isinstance(body, dict) else None
        if not isinstance(detail, str) or not detail:
            return f"{r.status_code} without a message: {r.text[:200]!r}"
    elif r.status_code != 200:
        return f"unexpected status {r.status_code}"
    return None
