"""The stage contract has one home: no module of the packages (or the test helpers that speak to
stages) spells a contract name itself; they import tensor names from functions/contract.py, and the
stage's HTTP paths and JSON body keys from functions/stage_api.py.

Test modules themselves are left out on purpose: they check the wire from a client's side, so a
contract change that breaks clients shows up there as a failing literal.
"""

from __future__ import annotations

import ast
from pathlib import Path

import msgspec

from functions import stage_api
from tests.helpers.procs import REPO_ROOT

PACKAGES = ("export", "functions", "gateway", "infra")
HELPERS = ("tests/helpers",)
HOMES = {"functions/contract.py", "functions/stage_api.py"}

# names that mean the stage contract wherever they appear
EVERYWHERE = {
    "sequence_ids",
    "past_lengths",
    "sequence_end",
    "sequence_start",
    "held_lengths",
    "attention_mask",
    "position_ids",
}
EVERYWHERE |= {"Tandem-Eos-Token-Ids", "input_ids"}
EVERYWHERE |= {"penalty_token_ids", "penalty_prompt_lengths", "logit_bias_ids", "logit_bias_values"}
EVERYWHERE |= {"banned_token_ids"}
PREFIXES = ("hidden_states_", "past_key_values.", "present.", "stage-")
# names shared with the public APIs (OpenAI fields): checked only where stages are spoken to
STAGE_SIDE = {"token_ids", "logprobs", "logits", "temperature", "top_k", "top_p", "seed"}
STAGE_SIDE |= {"presence_penalty", "frequency_penalty", "repetition_penalty"}
# the stage's paths: any piece of one (f-string parts included) outside functions/stage_api.py
PATH_PARTS = ("/v2/models", "/infer", "/sequences")
# the keys of the stage's JSON bodies (the fields of functions.stage_api's Structs): checked only
# where stages are spoken to, as they are plain words
BODY_KEYS = {
    f.encode_name
    for struct in vars(stage_api).values()
    if isinstance(struct, type) and issubclass(struct, msgspec.Struct)
    for f in msgspec.structs.fields(struct)
}
STAGE_SIDE_MODULES = {
    "functions/engine.py",
    "functions/stage.py",
    "functions/stage_routes.py",
    "functions/stage_service.py",
    "functions/stage_state.py",
    "functions/stage_io.py",
    "functions/batch.py",
    "functions/last_inputs.py",
    "functions/answers.py",
    "functions/scoring.py",
    "functions/sampling.py",
    "functions/processors.py",
    "gateway/nodes.py",
    "gateway/forks.py",
    "gateway/processor_inputs.py",
    "gateway/pipeline.py",
    "gateway/call_inputs.py",
    "gateway/clients.py",
    "export/stages.py",
    "export/build.py",
    "tests/helpers/stage_driver.py",
    "tests/helpers/stage_calls.py",
    "tests/helpers/stack.py",
    "tests/helpers/inproc.py",
}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def offending_literals(path: Path, rel: str) -> list[str]:
    tree = ast.parse(path.read_text(), filename=rel)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in skip:
            continue
        v = node.value
        stage_side = rel in STAGE_SIDE_MODULES and (v in STAGE_SIDE or v in BODY_KEYS)
        if v in EVERYWHERE or v.startswith(PREFIXES) or any(p in v for p in PATH_PARTS) or stage_side:
            found.append(f"{rel}:{node.lineno}: {v!r}")
    return found


def test_no_contract_literal_outside_its_home() -> None:
    files = [p for d in (*PACKAGES, *HELPERS) for p in sorted((REPO_ROOT / d).rglob("*.py"))]
    assert len(files) > 20  # the walk found the packages
    found = []
    for p in files:
        rel = p.relative_to(REPO_ROOT).as_posix()
        if rel not in HOMES:
            found += offending_literals(p, rel)
    assert found == [], "contract names spelled outside their home:\n" + "\n".join(found)


def test_the_check_finds_a_literal(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        '"""doc with sequence_ids"""\nx = {"past_lengths": 1}\ny = f"stage-{x}"\n'
        'z = f"{y}/v2/models/{x}/sequences/fork"\nw = {"children": [], "capacity_bytes": 0}\n'
    )
    assert [f.split(": ", 1)[1] for f in offending_literals(bad, "gateway/clients.py")] == [
        "'past_lengths'",
        "'stage-'",
        "'/v2/models/'",
        "'/sequences/fork'",
        "'children'",
        "'capacity_bytes'",
    ]
    assert {"parent", "children", "released", "capacity_bytes"} <= BODY_KEYS
