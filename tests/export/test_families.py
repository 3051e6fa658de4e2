"""Every supported family split into 1, 2, 3 and 4 stages (4 = its number of layers): the chained
stage graphs in ONNX Runtime against PyTorch eager, prefill + 20 greedy steps, batch 1 and a
left-padded batch of 4, max |logit difference| <= 1e-4 in float32; int8 for every family; what the
stage files weigh.

Each family's tiny shape (export/random_init.py SHAPES: q/k/v bias and tied embeddings for Qwen2,
a sliding window of 8 positions (shorter than the 16-token prompt + 20 steps) for Qwen2, Mistral
and Gemma 2, an explicit head_dim for Gemma, 2 KV heads for 4 query heads everywhere) is written as
a model directory and loaded through the export's own from_pretrained path. The 7 distinct layer
ranges the four splits need are exported once per family with the export's own function, one ONNX
Runtime session per file, and PyTorch's side of the comparison is computed once per family.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.export

FAMILIES = ["gpt2", "llama", "qwen2", "mistral", "phi3", "gemma", "gemma2"]
SPLITS = {
    1: [(0, 4)],
    2: [(0, 2), (2, 4)],
    3: [(0, 1), (1, 2), (2, 4)],
    4: [(0, 1), (1, 2), (2, 3), (3, 4)],
}
# the six families in 1 to 4 stages; Gemma 2 (beyond them) in 2
SPLITS_OF = dict.fromkeys(FAMILIES, sorted(SPLITS)) | {"gemma2": [2]}
CASES = [(name, n) for name in FAMILIES for n in SPLITS_OF[name]]
# GPT-2's tiny shape has 6 layers; the matrix takes 4 like the others
GPT2_4 = {
    "model_type": "gpt2",
    "n_layer": 4,
    "n_embd": 64,
    "n_head": 4,
    "n_positions": 256,
    "initializer_range": 0.3,
}
MAX_DIFF = 1e-4


@dataclass
class Family:
    model: Any
    parts: Any
    links: dict[tuple[int, int], Any] = field(default_factory=dict)
    sessions: dict[tuple[int, int], Any] = field(default_factory=dict)
    refs: dict[str, Any] = field(default_factory=dict)  # prompt set -> PyTorch trajectory

    def chain(self, ranges: list[tuple[int, int]]) -> tuple[list[Any], list[Any]]:
        return [self.sessions[r] for r in ranges], [self.links[r] for r in ranges]


def _ranges(name: str) -> list[tuple[int, int]]:
    return sorted({r for n in SPLITS_OF[name] for r in SPLITS[n]})


def _model_dir(name: str, work: Path) -> Path:
    from export.random_init import make_random_model

    kind = f"{name}-tiny"
    if name == "gpt2":
        (work / "gpt2.json").write_text(json.dumps(GPT2_4))
        kind = str(work / "gpt2.json")
    make_random_model(kind, work / "hf", None, seed=0)
    return work / "hf"


def _finish(hf: Path, exports: dict[tuple[int, int], Future[str]]) -> Family:
    """Load the model through the export's own path, compute PyTorch's side while the workers export,
    then open one ONNX Runtime session per exported range."""
    import torch

    from export import source
    from export.families import parts_of
    from export.stages import StageSpec
    from export.verify import PROMPT_SETS, Link, reference, sessions_for

    torch.set_num_threads(1)  # tiny tensors: more threads only wait on each other
    model = source.load_model(str(hf), None, source.load_config(hf))
    fam = Family(model, parts_of(model))
    for i, (set_name, lens) in enumerate(PROMPT_SETS.items()):
        fam.refs[set_name] = reference(model, fam.parts.shape, lens, 20, seed=i)
    for (a, b), future in exports.items():
        spec = StageSpec(a, a, b, 4)
        fam.links[(a, b)] = Link(Path(future.result()), spec.input_name, spec.past_names())
    ranges = list(fam.links)
    for r, sess in zip(
        ranges, sessions_for([fam.links[r] for r in ranges], ["CPUExecutionProvider"]), strict=True
    ):
        fam.sessions[r] = sess
    return fam


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Family]]:
    """Every family's ranges are queued to two export workers at the first use; each family is
    finished (and shared by every test that reads it) when a test first asks for it."""
    from tests.helpers.family_export import export_range

    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    pending: dict[str, tuple[Path, dict[tuple[int, int], Future[str]]]] = {}
    built: dict[str, Family] = {}

    def get(name: str) -> Family:
        if not pending:
            for fam in FAMILIES:
                work = tmp_path_factory.mktemp(f"family-{fam}")
                hf = _model_dir(fam, work)
                jobs = {
                    (a, b): pool.submit(export_range, str(hf), str(work / f"layers{a}-{b}.onnx"), a, b)
                    for a, b in _ranges(fam)
                }
                pending[fam] = (hf, jobs)
        if name not in built:
            built[name] = _finish(*pending[name])
        return built[name]

    try:
        yield get
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize(("name", "n"), CASES)
def test_chained_stages_match_pytorch(family: Callable[[str], Family], name: str, n: int) -> None:
    from export.verify import compare

    fam = family(name)
    sessions, links = fam.chain(SPLITS[n])
    for set_name, ref in fam.refs.items():
        r = compare(sessions, links, fam.parts.shape, ref)
        assert r["steps"] == 20 and len(ref.prompt_lengths) == {"batch1": 1, "batch4": 4}[set_name]
        assert r["max_abs_logit_diff"] <= MAX_DIFF, (set_name, r)
        assert r["top1_agreement"] == 1.0, (set_name, r)


def test_the_quirks_are_on(family: Callable[[str], Family]) -> None:
    """What the tiny shapes claim to exercise, read back from the loaded models."""
    shapes = {name: family(name).parts.shape for name in FAMILIES}
    assert all(s.num_kv_heads < s.num_attention_heads for n, s in shapes.items() if n != "gpt2")
    assert shapes["qwen2"].tied and shapes["gemma"].tied and shapes["gemma"].head_dim == 32 != 64 // 4
    assert shapes["qwen2"].windows == [None, None, 8, 8] and shapes["mistral"].windows == [8] * 4
    assert shapes["gemma2"].windows == [8, None, 8, None] and shapes["gemma2"].logit_softcap == 30.0
    attn = family("qwen2").model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert max(len(ref.steps[0][0][0]) for ref in family("mistral").refs.values()) + 20 > 8


@pytest.mark.parametrize("name", FAMILIES)
def test_int8_runs_for_every_family(family: Callable[[str], Family], name: str, tmp_path: Path) -> None:
    """Dynamic int8 quantisation of a 2-stage split: it runs and mostly agrees (random weights drift;
    the export reports, never fails, int8 drift)."""
    import onnxruntime as ort

    from export.to_onnx import quantize_int8
    from export.verify import Link, compare

    fam = family(name)
    links, sessions = [], []
    for r in SPLITS[2]:
        src = fam.links[r]  # every family has the 2-stage split
        dst = tmp_path / src.path.name
        quantize_int8(src.path, dst)
        links.append(Link(dst, src.input_name, src.past))
        sessions.append(ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]))
    assert sum(p.path.stat().st_size for p in links) < 0.6 * sum(
        fam.links[r].path.stat().st_size for r in SPLITS[2]
    )
    r = compare(sessions, links, fam.parts.shape, fam.refs["batch4"])
    assert np.isfinite(r["max_abs_logit_diff"]) and r["top1_agreement"] >= 0.5, r


def _weights(path: Path) -> int:
    """Bytes of a graph's float initializers: its weights (small constants included, a few bytes)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return sum(
        numpy_helper.to_array(t).nbytes
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    )


def _stage_params(fam: Family, a: int, b: int) -> tuple[int, int]:
    """Bytes of the parameters a stage over layers [a, b) holds: all of them, and the distinct ones
    (the exporter stores identical tensors once, e.g. freshly initialised norms, all ones)."""
    import hashlib

    from export.stages import DecoderStage, StageSpec

    params = list(DecoderStage(fam.parts, StageSpec(0, a, b, 4)).parameters())  # a tied matrix once
    distinct = {hashlib.sha256(p.detach().numpy().tobytes()).digest(): p.numel() * 4 for p in params}
    return sum(p.numel() * 4 for p in params), sum(distinct.values())


@pytest.mark.parametrize("name", FAMILIES)
def test_stage_files_add_up_to_the_model(family: Callable[[str], Family], name: str) -> None:
    """For every split the stages hold the model's parameters, plus one copy of a tied embedding
    matrix when the first and the last stage are two; each graph stores what its stage holds."""
    fam = family(name)
    model = sum(p.numel() * p.element_size() for p in fam.model.parameters())  # a tied matrix once
    tied = fam.parts.lm_head.weight.numel() * 4 if fam.parts.shape.tied else 0
    for n in SPLITS_OF[name]:
        held = [_stage_params(fam, a, b) for a, b in SPLITS[n]]
        assert sum(h[0] for h in held) == model + (tied if n > 1 else 0), n
        for (a, b), (_, distinct) in zip(SPLITS[n], held, strict=True):
            path = fam.links[(a, b)].path
            assert abs(_weights(path) - distinct) <= 4096, (n, a, b)  # + rotary frequencies, scalars
            # + the graph: nodes, names, shapes (~100 KB a layer whatever its width)
            assert distinct <= path.stat().st_size <= distinct + 150_000 * (b - a + 1), (n, a, b)
