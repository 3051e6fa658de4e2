"""The suite's own machinery: the export cache hands out only intact bundles and lives where
TANDEM_TEST_CACHE says, and the scheduler queues the costliest modules first without reordering
a module's tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import exports, schedule
from tests.helpers.bundles import make_fake_bundle


def test_a_cached_bundle_with_a_changed_file_is_not_intact(tmp_path: Path) -> None:
    bundle = make_fake_bundle(tmp_path / "b")
    assert exports.intact(bundle)
    data = bytearray((bundle / "stage2.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "stage2.onnx").write_bytes(bytes(data))
    assert not exports.intact(bundle)
    assert not exports.intact(tmp_path / "missing")
    (bundle / "manifest.json").write_text("{")
    assert not exports.intact(bundle)


def test_cache_root_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(exports.CACHE_ENV, raising=False)
    assert exports.cache_root(tmp_path) == exports.DEFAULT_ROOT
    monkeypatch.setenv(exports.CACHE_ENV, "off")
    assert exports.cache_root(tmp_path) == tmp_path / "export-cache"
    monkeypatch.setenv(exports.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert exports.cache_root(tmp_path) == tmp_path / "elsewhere"


def test_code_hash_covers_the_export_and_the_pins() -> None:
    assert {"export", "functions", "requirements/export.txt"} <= set(exports.HASHED)
    assert len(exports.code_hash()) == 16 and exports.code_hash() == exports.code_hash()


def test_an_unknown_family_says_where_to_add_it(tmp_path: Path) -> None:
    cache = exports.ExportCache(tmp_path)
    with pytest.raises(KeyError, match="TINY_MODELS"):
        cache.hf_dir("no-such-family")


@dataclass
class FakeItem:
    nodeid: str
    marks: set[str] = field(default_factory=set)

    def get_closest_marker(self, name: str) -> object | None:
        return name if name in self.marks else None


def test_costliest_modules_first_each_module_in_its_own_order() -> None:
    items = [
        FakeItem("tests/a.py::one"),
        FakeItem("tests/b.py::one", {"processes"}),
        FakeItem("tests/a.py::two"),
        FakeItem("tests/c.py::one"),
        FakeItem("tests/c.py::two", {"docker"}),
        FakeItem("tests/d.py::one", {"export"}),
        FakeItem("tests/e.py::one", {"slow", "quiet"}),
    ]
    schedule.order(items)  # type: ignore[arg-type]
    assert [i.nodeid for i in items] == [
        "tests/c.py::one",
        "tests/c.py::two",
        "tests/d.py::one",
        "tests/b.py::one",
        "tests/a.py::one",
        "tests/a.py::two",
        "tests/e.py::one",
    ]
