"""Each stage's ONNX file from its layer range: exported, its dynamic axes named, optionally int8
quantised, hashed and sized; the last stage's files include the scoring head (export/head.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from export.errors import ExportError
from export.families import Parts, Shape, refusal
from export.publish import log
from export.stages import StageSpec
from functions import contract as c
from functions.bundle import StageEntry, TensorSpec, sha256_file


def tensor_specs(spec: StageSpec, s: Shape) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A stage graph's inputs and outputs; keys and values are (B, H_kv, T, head_dim)."""
    h, d = s.num_kv_heads, s.head_dim
    x = (
        TensorSpec(c.INPUT_IDS, "INT64", ["batch", "sequence"])
        if spec.first
        else TensorSpec(spec.input_name, "FP32", ["batch", "sequence", s.hidden_size])
    )
    inputs = [
        x,
        TensorSpec(c.ATTENTION_MASK, "INT64", ["batch", "total_sequence"]),
        TensorSpec(c.POSITION_IDS, "INT64", ["batch", "sequence"]),
    ]
    inputs += [TensorSpec(n, "FP32", ["batch", h, "past_sequence", d]) for n in spec.past_names()]
    y = (
        TensorSpec(c.LOGITS, "FP32", ["batch", s.vocab_size])
        if spec.last
        else TensorSpec(spec.output_name, "FP32", ["batch", "sequence", s.hidden_size])
    )
    outputs = [y] + [TensorSpec(n, "FP32", ["batch", h, "total_sequence", d]) for n in spec.present_names()]
    if spec.last:  # every position's final hidden states, for the scoring head (export/head.py)
        outputs.append(TensorSpec(c.FINAL_HIDDEN, "FP32", ["batch", "sequence", s.hidden_size]))
    return inputs, outputs


def name_axes(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Give the graph's dynamic axes the manifest's names instead of the exporter's s27, s69..."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    by_name = {t.name: t.shape for t in inputs + outputs}
    for v in list(model.graph.input) + list(model.graph.output):
        for dim, want in zip(v.type.tensor_type.shape.dim, by_name[v.name], strict=False):
            if isinstance(want, str):
                dim.dim_param = want
    onnx.save(model, str(path))


def export_stage_files(
    parts: Parts, k: int, layers: tuple[int, int], work: Path, opset: int | None, quantize: str | None
) -> tuple[StageEntry, dict[str, Any] | None]:
    """Stage k's files in `work`: its manifest entry, and the scoring head's entry for the last."""
    from export import to_onnx

    a, b = layers
    spec = StageSpec(k, a, b, parts.shape.num_layers)
    t = time.perf_counter()
    target = work / spec.file
    raw = work / f"_{spec.file}" if quantize else target
    try:
        to_onnx.export_stage(parts, spec, raw, opset)
    except Exception as e:  # torch.export's errors are many and long: one line naming the family
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = f"could not be exported as a graph by torch.export ({type(e).__name__}: {first[:200]})"
        raise ExportError(refusal(parts.shape.family, why)) from e
    inputs, outputs = tensor_specs(spec, parts.shape)
    name_axes(raw, inputs, outputs)
    if quantize:
        to_onnx.quantize_int8(raw, target)
        raw.unlink()
    names = sorted(
        p.name for p in work.iterdir() if p.name == spec.file or p.name.startswith(spec.file + ".")
    )
    head = None
    if spec.last:
        from export.head import build_head

        head, head_files = build_head(parts, work, opset, log)
        names += list(head_files)
    files = {n: sha256_file(work / n) for n in names}
    size = sum((work / n).stat().st_size for n in names)
    log(
        f"{spec.name}: layers {a}-{b - 1} -> {spec.file} ({size / 1e6:.1f} MB, {time.perf_counter() - t:.1f} s)"
    )
    return StageEntry(k, spec.name, spec.file, [a, b], inputs, outputs, files, size), head


def onnx_opset(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return int(max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")))
