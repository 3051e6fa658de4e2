"""Fetching a bundle at start (functions.bundle_fetch): from a real HTTP server on 127.0.0.1 and
from file://, only the role's files, each checked against the manifest before it lands; a
corrupt file, a manifest that is not the pinned one, or an unreachable location refuses to start.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from functions.bundle import BundleError
from functions.bundle_fetch import TOKENIZER_ROLE, fetch_bundle, prepare_bundle
from tests.helpers.bundles import make_fake_bundle
from tests.helpers.procs import REPO_ROOT, free_port
from tests.helpers.static_server import serve_directory


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """A bundle directory as an object store would hold it: the manifest and the files it lists."""
    return make_fake_bundle(tmp_path / "published")


@pytest.fixture
def server(published: Path) -> Iterator[tuple[str, list[str]]]:
    """The published directory over HTTP; yields its URL and the paths it was asked for."""
    with serve_directory(published) as served:
        yield served


def test_fetches_only_the_stages_files_over_http(
    server: tuple[str, list[str]], published: Path, tmp_path: Path
) -> None:
    url, paths = server
    dest = tmp_path / "bundle"
    assert fetch_bundle(url, dest, "2") == ["stage2.onnx"]
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "stage2.onnx"]
    assert (dest / "stage2.onnx").read_bytes() == (published / "stage2.onnx").read_bytes()
    assert paths == ["/manifest.json", "/stage2.onnx"]
    # a restart over the same directory downloads only the manifest again
    assert fetch_bundle(url, dest, "stage-2") == []
    assert paths[2:] == ["/manifest.json"]


def test_tokenizer_role_from_file_url(published: Path, tmp_path: Path) -> None:
    dest = tmp_path / "bundle"
    env = {"TANDEM_BUNDLE_URL": published.as_uri()}
    assert prepare_bundle(dest, TOKENIZER_ROLE, env) == ["tokenizer.json"]
    assert (dest / "tokenizer.json").read_bytes() == (published / "tokenizer.json").read_bytes()


def test_a_corrupt_file_is_refused_and_never_lands(
    server: tuple[str, list[str]], published: Path, tmp_path: Path
) -> None:
    url, _ = server
    (published / "stage3.onnx").write_bytes(b"tampered")
    dest = tmp_path / "bundle"
    with pytest.raises(BundleError, match=r"stage3\.onnx: sha256 .* does not match"):
        fetch_bundle(url, dest, "3")
    assert sorted(p.name for p in dest.iterdir()) == ["manifest.json"]


def test_the_manifest_can_be_pinned(server: tuple[str, list[str]], published: Path, tmp_path: Path) -> None:
    url, _ = server
    pin = _sha((published / "manifest.json").read_bytes())
    env = {"TANDEM_BUNDLE_URL": url, "TANDEM_BUNDLE_SHA256": pin}
    assert prepare_bundle(tmp_path / "ok", "1", env) == ["stage1.onnx"]
    env["TANDEM_BUNDLE_SHA256"] = "0" * 64
    with pytest.raises(BundleError, match=r"manifest\.json: sha256 .* does not match"):
        prepare_bundle(tmp_path / "refused", "1", env)


def test_unreachable_or_unsupported_locations(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"GET http://127\.0\.0\.1:\d+/manifest\.json failed"):
        fetch_bundle(f"http://127.0.0.1:{free_port()}", tmp_path / "a", "1")
    with pytest.raises(BundleError, match="must be an http"):
        prepare_bundle(tmp_path / "b", "1", {"TANDEM_BUNDLE_URL": "ftp://example.invalid/b"})


def test_waits_for_a_manifest_not_published_yet(published: Path, tmp_path: Path) -> None:
    """TANDEM_BUNDLE_WAIT: the store answers 404 until the export has written the bundle."""
    store = tmp_path / "store"
    store.mkdir()
    env = {"TANDEM_BUNDLE_URL": "", "TANDEM_BUNDLE_WAIT": "20"}
    with serve_directory(store) as (url, paths):
        env["TANDEM_BUNDLE_URL"] = url
        publish = threading.Timer(1.0, lambda: shutil.copytree(published, store, dirs_exist_ok=True))
        publish.start()
        try:
            assert prepare_bundle(tmp_path / "bundle", "2", env) == ["stage2.onnx"]
        finally:
            publish.cancel()
        assert paths.count("/manifest.json") >= 2  # asked before it was there, then again
        with pytest.raises(BundleError, match="answered 404"):  # no wait: at once
            prepare_bundle(tmp_path / "other", "2", {"TANDEM_BUNDLE_URL": url + "missing/"})


def test_verify_in_place(published: Path) -> None:
    env = {"TANDEM_VERIFY_HASHES": "1"}
    assert prepare_bundle(published, TOKENIZER_ROLE, env) == []
    (published / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match="tokenizer.json does not match its sha256"):
        prepare_bundle(published, TOKENIZER_ROLE, env)
    prepare_bundle(published, TOKENIZER_ROLE, {})  # not asked: not checked


def test_tokenizer_process_refuses_a_corrupt_bundle(published: Path, tmp_path: Path) -> None:
    (published / "tokenizer.json").write_text("{}")
    r = subprocess.run(
        [sys.executable, "-m", "functions.tokenizer", "--bundle", str(tmp_path / "b"), "--port", "0"],
        cwd=REPO_ROOT,
        env={"TANDEM_BUNDLE_URL": published.as_uri(), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "tokenizer: error:" in r.stderr and "does not match the expected" in r.stderr
