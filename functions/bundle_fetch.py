"""The model bundle at a function's start. With `TANDEM_BUNDLE_URL` set (an http(s):// or file://
location of a bundle directory, e.g. an object-store URL), `manifest.json` and the files this role
serves are fetched into the local bundle directory, each checked against the manifest's sha256
before it is moved into place; `TANDEM_BUNDLE_SHA256` pins the manifest itself, and
`TANDEM_BUNDLE_WAIT` (seconds) keeps asking for a manifest not published yet (a bundle store still
waiting for its export). Without it the
bundle is already there (mounted or baked into the image); `TANDEM_VERIFY_HASHES` then checks the
role's files in place. Either way a bad file stops the process before it reports ready.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

from functions import contract
from functions.bundle import (
    MANIFEST,
    BundleError,
    Manifest,
    load_manifest,
    sha256_file,
    tokenizer_files,
    verify_files,
)
from functions.settings import Env

TOKENIZER_ROLE = "tokenizer"
WAIT_STEP = 2.0  # seconds between asks for a manifest not there yet
CHUNK = 1 << 20
TIMEOUT = httpx.Timeout(30.0, connect=10.0)


def role_files(manifest: Manifest, role: str) -> dict[str, str]:
    """The files (name -> sha256) the tokenizer or a stage ('2' or 'stage-2') needs."""
    if role == TOKENIZER_ROLE:
        return tokenizer_files(manifest)
    return dict(manifest.stage(contract.normalize_stage_name(role)).files)


def _chunks(url: str) -> Iterator[bytes]:
    """The bytes at `url` (http, https or file), streamed."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "file":
        path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
        try:
            with open(path, "rb") as f:
                yield from iter(lambda: f.read(CHUNK), b"")
        except OSError as e:
            raise BundleError(f"cannot read {url}: {e.strerror}") from None
        return
    if scheme not in ("http", "https"):
        raise BundleError(f"TANDEM_BUNDLE_URL must be an http(s):// or file:// URL, got {url!r}")
    try:
        with httpx.stream("GET", url, timeout=TIMEOUT, follow_redirects=True) as r:
            if r.status_code != 200:
                raise BundleUnavailableError(f"GET {url} answered {r.status_code}")
            yield from r.iter_bytes(CHUNK)
    except httpx.HTTPError as e:
        raise BundleUnavailableError(f"GET {url} failed: {e!r}") from None


def _download(url: str, target: Path, sha256: str | None) -> None:
    """Write `url` to `target` atomically once its sha256 matches (when one is given)."""
    partial = target.with_name(f".{target.name}.partial")
    h = hashlib.sha256()
    with open(partial, "wb") as f:
        for chunk in _chunks(url):
            h.update(chunk)
            f.write(chunk)
    if sha256 is not None and h.hexdigest() != sha256:
        partial.unlink()
        raise BundleError(
            f"{url}: sha256 {h.hexdigest()} does not match the expected {sha256}; refusing the bundle"
        )
    os.replace(partial, target)


class BundleUnavailableError(BundleError):
    """The location did not answer with the file (yet): refused, unreachable, not 200."""


def _download_manifest(url: str, target: Path, sha256: str | None, wait: float) -> None:
    """The manifest, asked for again every WAIT_STEP seconds for up to `wait` seconds while it is
    unavailable (a hash mismatch is final at once)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return _download(url, target, sha256)
        except BundleUnavailableError as e:
            if time.monotonic() + WAIT_STEP > deadline:
                raise
            print(f"bundle: {e}; asking again for up to {deadline - time.monotonic():.0f} s", flush=True)
            time.sleep(WAIT_STEP)


def fetch_bundle(
    url: str, dest: Path, role: str, *, manifest_sha256: str | None = None, wait: float = 0.0
) -> list[str]:
    """Fetch the manifest and `role`'s files from `url` into `dest`; files already there with the
    right sha256 are kept. Returns the names downloaded."""
    base = url.rstrip("/") + "/"
    dest.mkdir(parents=True, exist_ok=True)
    manifest_path = dest / MANIFEST
    _download_manifest(base + MANIFEST, manifest_path, manifest_sha256, wait)
    manifest = load_manifest(dest)
    fetched = []
    for name, digest in role_files(manifest, role).items():
        target = dest / name
        if target.is_file() and sha256_file(target) == digest:
            continue
        _download(base + urllib.parse.quote(name), target, digest)
        fetched.append(name)
    return fetched


def prepare_bundle(
    dest: Path, role: str, env: Mapping[str, str] | None = None, *, verify_in_place: bool = True
) -> list[str]:
    """Fetch (TANDEM_BUNDLE_URL) or verify in place (TANDEM_VERIFY_HASHES, when `verify_in_place`)
    the bundle for `role`; raises BundleError naming the bad file. Returns the names downloaded."""
    e = Env(env)
    url = e.text("TANDEM_BUNDLE_URL")
    if url is not None:
        wait = float(e.number("TANDEM_BUNDLE_WAIT", 0.0, minimum=0.0))
        return fetch_bundle(url, dest, role, manifest_sha256=e.text("TANDEM_BUNDLE_SHA256"), wait=wait)
    if verify_in_place and e.flag("TANDEM_VERIFY_HASHES"):
        manifest = load_manifest(dest)
        problems = verify_files(dest, manifest, only=list(role_files(manifest, role)))
        if problems:
            raise BundleError(f"bundle {dest}: " + "; ".join(problems))
    return []
