"""The default split balances bytes: on real shapes (built on PyTorch's meta device, so no weights
are allocated) no stage is above 1.25x the mean, the embedding counting on the first stage and the
LM head (a tied matrix again) on the last."""

from __future__ import annotations

from typing import Any

import pytest

from export.split import Costs, balanced, costs_of


def _parts(shape: str) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from export.families import parts_of
    from export.random_init import resolve

    model_type, fields = resolve(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields))
    return parts_of(model)


@pytest.mark.parametrize(("shape", "layers"), [("qwen2", 24), ("llama", 30), ("gpt2", 12), ("gemma", 18)])
def test_default_split_of_real_shapes_is_balanced(shape: str, layers: int) -> None:
    parts = _parts(shape)
    costs = costs_of(parts)
    assert len(costs.layers) == layers
    for n in (2, 3, 4):
        ranges = balanced(costs, n)
        sizes = costs.stage_bytes(ranges)
        assert ranges[0][0] == 0 and ranges[-1][1] == layers and len(ranges) == n
        assert all(a < b for a, b in ranges) and all(
            r[1] == s[0] for r, s in zip(ranges, ranges[1:], strict=False)
        )
        assert max(sizes) <= 1.25 * sum(sizes) / n, (shape, n, ranges, sizes)
    # the stages hold the model once, plus the tied matrix's second copy
    params = sum(p.numel() * p.element_size() for p in {id(p): p for p in parts.layers.parameters()}.values())
    model = params + costs.first + costs.last - costs.tied
    assert sum(costs.stage_bytes(balanced(costs, 3))) == model + costs.tied


def test_tied_matrix_counts_on_both_ends_and_once_in_one_stage() -> None:
    c = Costs([10, 10, 10, 10], first=40, last=41, tied=40)
    assert c.stage_bytes([(0, 4)]) == [40 + 40 + 41 - 40]
    assert c.stage_bytes([(0, 2), (2, 4)]) == [60, 61]
    assert balanced(c, 3) in ([(0, 1), (1, 3), (3, 4)],)


def test_equal_layers_split_evenly() -> None:
    c = Costs([5] * 12, first=0, last=0)
    assert balanced(c, 3) == [(0, 4), (4, 8), (8, 12)]
    assert balanced(c, 12) == [(i, i + 1) for i in range(12)]
