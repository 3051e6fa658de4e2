"""EleutherAI lm-evaluation-harness against the stack as real processes on 127.0.0.1:
`local-completions` runs a local multiple-choice (loglikelihood: echo + logprobs) task and a greedy
generate_until task, and gets what the same harness gets with `--model hf` on the same weights:
per-sample loglikelihoods within 1e-3, the same is_greedy flags, identical generations.
Nothing is downloaded: the tasks and their data are under tests/clients/lm_eval_tasks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.stack import Stack

pytestmark = [
    pytest.mark.slow,
    pytest.mark.processes,
    # third-party import-time warnings (lm-eval's dependencies), not ours
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ["tandem_mc", "tandem_gen"]


@pytest.fixture(scope="module")
def stack(default_stack: Stack) -> Stack:
    return default_stack


@pytest.fixture(scope="module")
def include_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The task YAMLs with DATA_DIR pointing at the local data (datasets' json loader)."""
    out = tmp_path_factory.mktemp("lm-eval-tasks")
    for yaml in TASKS_DIR.glob("*.yaml"):
        (out / yaml.name).write_text(yaml.read_text().replace("DATA_DIR", str(TASKS_DIR)))
    return out


def evaluate(model: str, model_args: dict[str, Any], include_path: Path) -> dict[str, Any]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    result: dict[str, Any] = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(include_path)),
        log_samples=True,
        batch_size=1,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    return result


def by_doc(result: dict[str, Any], task: str) -> list[Any]:
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [[r for r in s["resps"]] for s in samples]


def test_local_completions_matches_hf(stack: Stack, tiny_hf_dir: Path, include_path: Path) -> None:
    api = evaluate(
        "local-completions",
        {
            "base_url": f"{stack.gateway_url}/v1/completions",
            "model": "gpt2",
            "tokenizer": str(tiny_hf_dir),
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "max_retries": 1,
        },
        include_path,
    )
    hf = evaluate("hf", {"pretrained": str(tiny_hf_dir), "device": "cpu", "dtype": "float32"}, include_path)

    mc_api, mc_hf = by_doc(api, "tandem_mc"), by_doc(hf, "tandem_mc")
    assert len(mc_api) == len(mc_hf) == 4
    n = 0
    for doc_api, doc_hf in zip(mc_api, mc_hf, strict=True):
        for (ll_api, greedy_api), (ll_hf, greedy_hf) in zip(
            [r[0] for r in doc_api], [r[0] for r in doc_hf], strict=True
        ):
            assert abs(float(ll_api) - float(ll_hf)) <= 1e-3, (ll_api, ll_hf)
            assert bool(greedy_api) == bool(greedy_hf)
            n += 1
    assert n == 12  # every choice of every question
    assert api["results"]["tandem_mc"]["acc,none"] == hf["results"]["tandem_mc"]["acc,none"]

    gen_api, gen_hf = by_doc(api, "tandem_gen"), by_doc(hf, "tandem_gen")
    assert len(gen_api) == 3
    assert gen_api == gen_hf
    assert any(r[0][0] for r in gen_api)  # something was generated
