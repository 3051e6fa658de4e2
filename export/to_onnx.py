"""Export each stage wrapper to ONNX (torch.onnx dynamo exporter), optionally int8-quantised."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from export import attention
from export.families import Parts
from export.stages import DecoderStage, StageSpec, example_inputs

# torch resets its loggers on import; its exporter then lists the torchvision ops it skips
logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def _dynamic_shapes(spec: StageSpec) -> tuple[Any, ...]:
    dyn = torch.export.Dim.DYNAMIC
    two_d = {0: dyn, 1: dyn}
    # forward(x, mask, pos, *past): torch.export sees the varargs as one nested tuple
    past = tuple({0: dyn, 2: dyn} for _ in spec.past_names())
    return (two_d, two_d, two_d, past)


def to_program(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    names: tuple[list[str], list[str]],
    dynamic_shapes: tuple[Any, ...],
    opset: int | None,
) -> Any:
    """torch.onnx's dynamo exporter on `module` (inputs and outputs named `names`), optimised."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=names[0],
            output_names=names[1],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise RuntimeError(f"torch.onnx.export returned nothing for {type(module).__name__}")
    return program


def export_stage(parts: Parts, spec: StageSpec, path: Path, opset: int | None) -> None:
    """Write one stage as a self-contained .onnx file (external data only past 2 GB)."""
    module = DecoderStage(parts, spec).eval()
    args = example_inputs(parts, spec)
    names = (spec.input_names(), spec.output_names())
    # GPT-2's blocks keep their own attention (causality from their buffer); the others read each
    # key/value head once (export/attention.py)
    grouped = contextlib.nullcontext() if parts.causal_in_layers else attention.selected(parts.config)
    with grouped:
        program = to_program(module, args, names, _dynamic_shapes(spec), opset)
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > 1_800_000_000
    program.save(str(path), external_data=large)


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the weights (MatMul/Gemm), activations stay float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
