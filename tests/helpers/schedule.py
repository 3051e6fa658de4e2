"""How a run is spread over pytest-xdist workers: `make test` runs `-n auto --dist loadscope
--no-loadscope-reorder`, so each module runs whole on one worker (its module-scoped fixtures, a
stack say, set up once) and modules are handed out in collection order, which the Ordering plugin
makes costliest first (COST, from the cost markers): the long ones start at once, the short ones
fill in around them; modules marked `quiet` (they read millisecond splits that a busy host blurs)
go last. Tests that use a process fixture get the `processes` marker without asking.
(Not --dist loadgroup: pytest-xdist 3.8 appends the group to `_nodeid`, which pytest 9 no longer
reads, so every test would be its own unit.)
"""

from __future__ import annotations

import pytest

# cost markers, costliest first: a module is queued by its costliest test
COST = {"docker": 6, "export": 5, "slow": 4, "browser": 3, "fuzz": 2, "processes": 1}
# fixtures that start processes: a test using one is marked `processes`
PROCESS_FIXTURES = frozenset({"stages", "stage_sets", "stacks", "default_stack"})


def module_of(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


def cost(item: pytest.Item) -> int:
    if item.get_closest_marker("quiet") is not None:
        return -1  # last: by then the other workers are winding down
    return max((w for m, w in COST.items() if item.get_closest_marker(m) is not None), default=0)


def mark(items: list[pytest.Item]) -> None:
    """`processes` on every test that uses a fixture which starts them."""
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.processes)


def order(items: list[pytest.Item]) -> None:
    """Costliest modules first (then the larger), each module's tests in pytest's own order."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(module_of(item), []).append(item)
    ranked = sorted(modules.values(), key=lambda m: (-max(cost(i) for i in m), -len(m)))
    items[:] = [item for module in ranked for item in module]


class Ordering:
    """The plugin that orders a run's tests (registered by tests/conftest.py)."""

    @pytest.hookimpl(trylast=True)  # after every other hook has reordered or deselected
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        order(items)
