"""Stage graphs of a model directory exported in worker processes, so that a test exporting many
layer ranges keeps both cores busy (torch's exporter runs on one). Each call is one range, with the
export's own loading and stage-export functions."""

from __future__ import annotations

from pathlib import Path


def export_range(hf_dir: str, path: str, start: int, stop: int) -> str:
    """Export layers [start, stop) of the model in `hf_dir` to `path`; returns `path`."""
    import torch

    from export import source
    from export.families import parts_of
    from export.stages import StageSpec
    from export.to_onnx import export_stage

    torch.set_num_threads(1)
    model = source.load_model(hf_dir, None, source.load_config(Path(hf_dir)))
    parts = parts_of(model)
    export_stage(parts, StageSpec(start, start, stop, parts.shape.num_layers), Path(path), None)
    return path
