"""Session fixtures shared by the whole suite, and how the suite is spread over workers.

Bundles (tests.helpers.exports; built once per run and kept between runs of the same code):
  exports        ExportCache. `exports.bundle(family, stages, *options)` is the tiny random-weight
                 model of `family` exported by the real `python -m export` into `stages` stages
                 (`layers="0:1,1:6"` for an explicit split; options such as "--quantize", "int8"),
                 parity verified by the export; `exports.hf_dir(family)` is that model as a local HF
                 directory named `family` (so the bundle's model is called `family`). Each distinct export runs once for all the workers of a run (a file
                 lock), and its files are checked against the manifest before each hand-out. A new
                 family adds its tiny-model writer to exports.TINY_MODELS.
  tiny_hf_dir    exports.hf_dir("gpt2")
  tiny_bundle    exports.bundle("gpt2", None, "--with-reference", layers=TINY_LAYERS): the tiny
                 GPT-2 in 3 stages of 2 layers, with the optimum monolith the benchmark compares against
  reference      Reference(tiny_hf_dir): PyTorch greedy generation and log-probabilities
  chat_bundle    the tiny bundle as a chat model (tests/helpers/chat.py), one copy per worker

Processes (tests.helpers.stack; every process of a stack starts at once):
  stacks         StackPool. `stacks.get(bundle, replicas=(1, 1, 1), gateway_env=None)` is a running
                 stack (tokenizer, stage replicas, gateway) shared by every module that asks for the
                 same one; stopped at the end of the run. Only for tests that read: a test that
                 stops, restarts or reconfigures a process starts its own with start_stack().
  default_stack  stacks.get(tiny_bundle): the stack most end-to-end modules use
  stages         (tests/functions/conftest.py) stage processes without a gateway, per serving mode,
                 each mode's set started once and kept

Cost markers (pyproject.toml; `make test-fast` leaves out every one but `processes`):
  export     runs `python -m export` itself (beyond the shared bundles above)
  processes  starts service processes (given automatically to users of stacks, default_stack, stages)
  docker     builds images and runs containers in a private dockerd
  browser    drives Chromium
  fuzz       schema and protocol fuzzing (thousands of generated requests)
  slow       long on its own: benchmark smoke runs, load, third-party clients and harnesses
  quiet      (not a cost) reads millisecond splits a busy host blurs: queued after everything else

Workers: `make test` runs pytest-xdist (`-n auto --dist loadscope`): each module whole on one
worker, the costliest modules first (tests.helpers.schedule). Session fixtures are per worker,
except the bundles, which the workers share. So a fixture that several modules share is started
at most once per worker, and never depends on the order the tests run in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import schedule
from tests.helpers.exports import TINY_LAYERS, ExportCache, cache_root, run_export
from tests.helpers.reference import Reference
from tests.helpers.stack import Stack, StackPool

__all__ = ["Reference", "run_export"]  # imported from here by test modules


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(schedule.Ordering(), "tandem-ordering")


@pytest.hookimpl(tryfirst=True)  # before -m selects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    schedule.mark(items)


def run_root(factory: pytest.TempPathFactory) -> Path:
    """This run's temporary directory, shared by its xdist workers (each has its own below it)."""
    base = factory.getbasetemp()
    return base.parent if base.name.startswith("popen-gw") else base


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> ExportCache:
    return ExportCache(cache_root(run_root(tmp_path_factory)))


@pytest.fixture(scope="session")
def tiny_hf_dir(exports: ExportCache) -> Path:
    """A GPT-2-architecture model with seeded random weights, saved like a hub download. Its folder
    is named gpt2, so its bundle's model is called "gpt2", as the test stacks' configs name it (the
    gateway checks model_name against the bundle)."""
    return exports.hf_dir("gpt2")


@pytest.fixture(scope="session")
def tiny_bundle(exports: ExportCache) -> Path:
    """The tiny model exported as a 3-stage bundle of two layers each, with the monolithic reference.
    The split is explicit: the default one balances bytes, which puts the tiny model's large
    position table alone with one layer on the first stage."""
    return exports.bundle("gpt2", None, "--with-reference", layers=TINY_LAYERS)


@pytest.fixture(scope="session")
def reference(tiny_hf_dir: Path) -> Reference:
    return Reference(tiny_hf_dir)


@pytest.fixture(scope="session")
def chat_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle as a chat model: a tokenizer with chat special tokens (same vocabulary size,
    BOS added by its post-processor when asked) and a ChatML-with-BOS chat template, written as the
    export writes them (tests/helpers/chat.py)."""
    from tests.helpers.chat import TEMPLATES
    from tests.helpers.chat import chat_bundle as make

    return make(
        tiny_bundle,
        tmp_path_factory.mktemp("bundles") / "tiny-chat",
        (TEMPLATES / "served.jinja").read_text(),
    )


@pytest.fixture(scope="session")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackPool]:
    pool = StackPool(tmp_path_factory.mktemp("stacks"))
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="session")
def default_stack(stacks: StackPool, tiny_bundle: Path) -> Stack:
    return stacks.get(tiny_bundle)
