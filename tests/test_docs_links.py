"""The documentation's relative links hold: every `[text](path)` and `![alt](path)` in README.md,
docs/ and the deployment guide names a file or folder that exists, and every `path#anchor` (or
`#anchor` on the same page) names a heading of that markdown file, by GitHub's rule for heading
anchors. Links inside code (fenced blocks, inline spans) and absolute URLs are not checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.procs import REPO_ROOT

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target) or ![alt](target), the text possibly over several lines, an optional "title"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]\n]+\]:[ \t]*<?([^\s>]+)>?", re.MULTILINE)  # [label]: target
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto: ...


def pages(root: Path) -> list[Path]:
    """The markdown files whose links are checked."""
    found = [root / "README.md", *sorted((root / "docs").rglob("*.md")), root / "infra" / "README.md"]
    return [p for p in found if p.is_file()]


def unfenced(text: str) -> list[str]:
    """The page's lines with those of fenced code blocks (fences included) emptied."""
    out, fenced = [], False
    for line in text.splitlines():
        is_fence = bool(FENCE.match(line))
        out.append("" if fenced or is_fence else line)
        fenced = fenced != is_fence
    return out


def prose(text: str) -> str:
    """The page without code: fenced blocks emptied and inline spans blanked, line breaks kept."""
    return INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), "\n".join(unfenced(text)))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, every character but letters,
    digits, `_`, `-` and spaces dropped, spaces to `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a markdown file; a repeated heading gets -1, -2 ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in unfenced(page.read_text()):
        if m := HEADING.match(line):
            base = slug(m.group(2))
            count = seen.get(base, 0)
            found.add(f"{base}-{count}" if count else base)
            seen[base] = count + 1
    return found


def targets(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link on a page."""
    text = prose(page.read_text())
    found = [m for pattern in (LINK, REFERENCE) for m in pattern.finditer(text)]
    return sorted((text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in found)


def broken(page: Path, target: str) -> str | None:
    """Why a relative link does not hold; None when it does (or is not relative)."""
    if not target or SCHEME.match(target) or target.startswith("//"):
        return None
    path, _, anchor = target.partition("#")
    dest = (page.parent / path).resolve() if path else page
    if not dest.exists():
        return "no such file"
    if anchor and dest.is_file() and dest.suffix == ".md" and anchor.lower() not in anchors(dest):
        return f"no heading '#{anchor}' in {dest.name}"
    return None


def broken_links(root: Path) -> list[str]:
    out = []
    for page in pages(root):
        for number, target in targets(page):
            if why := broken(page, target):
                out.append(f"{page.relative_to(root)}:{number}: ({target}) {why}")
    return out


def test_the_pages_are_found() -> None:
    names = {p.relative_to(REPO_ROOT).as_posix() for p in pages(REPO_ROOT)}
    assert {"README.md", "docs/usage.md", "docs/benchmarks.md", "infra/README.md"} <= names, names


def test_every_relative_link_resolves() -> None:
    assert broken_links(REPO_ROOT) == []


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("URLs (defaults)", "urls-defaults"),
        ("The local stack (`make up`)", "the-local-stack-make-up"),
        ("Pipelining, hop delays and int8 (2026-12-03)", "pipelining-hop-delays-and-int8-2026-12-03"),
        ("The KV cache on the device (`TANDEM_KV_STORE`)", "the-kv-cache-on-the-device-tandem_kv_store"),
        ("docker-compose (one host)", "docker-compose-one-host"),
        ("Model families and N stages", "model-families-and-n-stages"),
    ],
)
def test_slug_follows_github(heading: str, anchor: str) -> None:
    assert slug(heading) == anchor


def test_the_checker_finds_what_is_broken(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Page A\n\n## Setup (`make up`)\n\n## Setup (`make up`)\n")
    (tmp_path / "pic.png").write_bytes(b"")
    (tmp_path / "README.md").write_text(
        "# Top\n\n"
        "[fine](docs/a.md) [fine](docs/a.md#setup-make-up) [fine](docs/a.md#setup-make-up-1) ![p](pic.png)\n"
        "[fine](#top) [web](https://example.com/nowhere.md) `[code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n"
        "[missing file over\ntwo lines](docs/b.md)\n"
        "[missing anchor](docs/a.md#install)\n"
        "[missing here](#bottom)\n"
        "[ref]: docs/c.md\n"
    )
    assert broken_links(tmp_path) == [
        "README.md:9: (docs/b.md) no such file",
        "README.md:10: (docs/a.md#install) no heading '#install' in a.md",
        "README.md:11: (#bottom) no heading '#bottom' in README.md",
        "README.md:12: (docs/c.md) no such file",
    ]
