"""What one stage takes and returns on the wire (its Open Inference Protocol model metadata), derived
from the bundle manifest: the tensors it lists, the outputs a request gets when it names none, and
the bytes an answer carries.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from functions.bundle import Manifest, StageEntry
from functions.contract import (
    ATTENTION_MASK,
    FINAL_HIDDEN,
    LOGITS,
    LOGPROBS,
    NUM_TOP,
    OUTPUT_NEEDS,
    PAST_LENGTHS,
    PROCESSOR_INPUTS,
    SAMPLING,
    SEQUENCE_END,
    SEQUENCE_IDS,
    SEQUENCE_START,
    TARGET_IDS,
    TARGET_LOGPROBS,
    TARGET_TOP_IDS,
    TARGET_TOP_LOGPROBS,
    TOKEN_IDS,
    TOP_IDS,
    TOP_LOGPROBS,
)
from functions.protocol import DATATYPES


@dataclass(frozen=True)
class StageIO:
    """What one stage takes and returns: enough to describe it (model metadata) and check a batch."""

    x_name: str  # input_ids or hidden_states_{first layer}
    y_name: str  # hidden_states_{next layer}, or logits for the last stage (inside the graph)
    first: bool
    last: bool
    hidden_size: int  # the hidden states' width between stages
    vocab_size: int
    max_positions: int  # the context window
    scoring: bool = False  # last stage with the scoring head: takes target_ids

    def wire_inputs(self) -> list[dict[str, Any]]:
        x = ([-1, -1], "INT64") if self.first else ([-1, -1, self.hidden_size], "FP32")
        spec: list[tuple[str, str, list[int]]] = [
            (SEQUENCE_IDS, "INT64", [-1]),
            (PAST_LENGTHS, "INT64", [-1]),
            (self.x_name, x[1], x[0]),
            (ATTENTION_MASK, "INT64", [-1, -1]),
            (SEQUENCE_END, "BOOL", [-1]),
            (SEQUENCE_START, "BOOL", [-1]),
        ]
        if self.last:
            spec += [(p.name, p.datatype, [-1]) for p in SAMPLING]
            spec += [(n, d, [-1] * rank) for n, d, rank in PROCESSOR_INPUTS]
            spec += [(NUM_TOP, "INT64", [-1])] + ([(TARGET_IDS, "INT64", [-1, -1])] if self.scoring else [])
        return [{"name": n, "datatype": d, "shape": s} for n, d, s in spec]

    def wire_outputs(self) -> list[dict[str, Any]]:
        if self.last:
            return [
                {"name": TOKEN_IDS, "datatype": "INT64", "shape": [-1]},
                {"name": LOGPROBS, "datatype": "FP32", "shape": [-1]},
                {"name": LOGITS, "datatype": "FP32", "shape": [-1, self.vocab_size]},
                {"name": TOP_IDS, "datatype": "INT64", "shape": [-1, -1]},
                {"name": TOP_LOGPROBS, "datatype": "FP32", "shape": [-1, -1]},
            ] + (self._scoring_outputs() if self.scoring else [])
        return [{"name": self.y_name, "datatype": "FP32", "shape": [-1, -1, self.hidden_size]}]

    @functools.cached_property
    def input_names(self) -> frozenset[str]:
        """The names `wire_inputs` lists, built once (every call checks against them)."""
        return frozenset(t["name"] for t in self.wire_inputs())

    @functools.cached_property
    def output_names(self) -> frozenset[str]:
        """The names `wire_outputs` lists, built once."""
        return frozenset(t["name"] for t in self.wire_outputs())

    def default_outputs(self, sent: Collection[str]) -> frozenset[str]:
        """The outputs of a request that names none, given the input names it sent: the next
        stage's input, or the sampled tokens with their logprobs and whatever the inputs ask for."""
        if not self.last:
            return frozenset([self.y_name])
        asked = {out for out, need in OUTPUT_NEEDS.items() if need in sent and out in self.output_names}
        return frozenset({TOKEN_IDS, LOGPROBS} | asked)

    def answer_bytes(self, rows: int, width: int, names: Iterable[str]) -> int:
        """Tensor bytes of an answer with these outputs for a batch of `rows` x `width` new
        positions: a variable dimension is the rows, then the positions."""
        sizes = self._output_sizes
        total = 0
        for shape, itemsize in (sizes[n] for n in names if n in sizes):
            dims = [d if d >= 0 else (rows if i == 0 else width) for i, d in enumerate(shape)]
            total += math.prod(dims) * itemsize
        return total

    @functools.cached_property
    def _output_sizes(self) -> dict[str, tuple[list[int], int]]:
        """Each output's wire shape and item size, built once (answer_bytes runs on every call)."""
        return {o["name"]: (o["shape"], DATATYPES[o["datatype"]].itemsize) for o in self.wire_outputs()}

    @staticmethod
    def _scoring_outputs() -> list[dict[str, Any]]:
        return [
            {"name": TARGET_LOGPROBS, "datatype": "FP32", "shape": [-1]},
            {"name": TARGET_TOP_IDS, "datatype": "INT64", "shape": [-1, -1]},
            {"name": TARGET_TOP_LOGPROBS, "datatype": "FP32", "shape": [-1, -1]},
        ]


def stage_io(manifest: Manifest, stage: StageEntry) -> StageIO:
    """What `stage` of the bundle takes and returns on the wire. It scores prompts (takes
    target_ids) when it is the last stage, its graph gives the final hidden states and the bundle
    has the scoring head (both absent in bundles made before them)."""
    last = stage.layers[1] == manifest.num_layers
    return StageIO(
        x_name=stage.inputs[0].name,
        y_name=stage.outputs[0].name,
        first=stage.first,
        last=last,
        hidden_size=manifest.hidden_size,
        vocab_size=manifest.vocab_size,
        max_positions=manifest.max_positions,
        scoring=last and gives_final_hidden(stage) and manifest.head is not None,
    )


def gives_final_hidden(stage: StageEntry) -> bool:
    return any(t.name == FINAL_HIDDEN for t in stage.outputs)
