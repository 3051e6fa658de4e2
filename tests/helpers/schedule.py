"""How a run is spread over pytest-xdist workers (`make test` runs `-n auto --dist loadgroup`).

Every test gets an xdist_group, so that whatever its module shares (a module-scoped stack, a
parametrised session fixture) is set up on one worker only: its own xdist_group mark if it has one,
else the group of the parametrised shared fixture it uses (SHARED_PARAMS: the `stages` processes
that every stage-function module reuses), else its module. Groups are queued costliest first
(COST, from the cost markers), so that the long ones start at once and the short ones fill in
around them. Tests that use a process fixture get the `processes` marker without asking.
"""

from __future__ import annotations

import pytest

# cost markers, costliest first: a group is queued by its costliest test
COST = {"docker": 6, "export": 5, "slow": 4, "browser": 3, "fuzz": 2, "processes": 1}
# fixtures that start processes: a test using one is marked `processes`
PROCESS_FIXTURES = frozenset({"stages", "stacks", "default_stack"})
# parametrised session fixtures: the tests that use one run on one worker, in pytest's order
SHARED_PARAMS = ("stages",)


def group_of(item: pytest.Item) -> str:
    mark = item.get_closest_marker("xdist_group")
    if mark is not None:
        return str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
    fixtures = getattr(item, "fixturenames", ())
    for name in SHARED_PARAMS:
        if name in fixtures:
            return f"fixture-{name}"
    return item.nodeid.split("::", 1)[0]


def cost(item: pytest.Item) -> int:
    return max((w for m, w in COST.items() if item.get_closest_marker(m) is not None), default=0)


def mark(items: list[pytest.Item]) -> None:
    """Give every item its group (and `processes` where a fixture starts them)."""
    for item in items:
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.processes)
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group_of(item)))


def order(items: list[pytest.Item]) -> None:
    """Costliest groups first (then the larger), each group's tests in pytest's own order."""
    groups: dict[str, list[pytest.Item]] = {}
    for item in items:
        groups.setdefault(group_of(item), []).append(item)
    ranked = sorted(groups.values(), key=lambda g: (-max(cost(i) for i in g), -len(g)))
    items[:] = [item for group in ranked for item in group]


class Ordering:
    """The plugin that orders a run's tests (registered by tests/conftest.py)."""

    @pytest.hookimpl(trylast=True)  # after pytest grouped the parametrised fixtures' tests
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        order(items)
