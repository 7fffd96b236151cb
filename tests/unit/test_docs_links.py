"""The docs point at things that exist: links, backticked repository paths, cited tests, the module map.

Docs rot silently when a module moves or a test is renamed; these checks make that a test failure.
Checked, in ``README.md`` and every ``docs/*.md``:

- every relative Markdown link (``[text](path)``, anchors dropped) names a file or directory;
- every inline code span that is a repository path (it starts with ``cached/``, ``tests/``,
  ``scripts/``, ``systemd/``, ``deploy/`` or ``docs/``) names one; a span followed by ``::name``
  (``tests/x/test_y.py::test_z``, a parametrized ``[...]`` suffix allowed) names a test function
  that file defines, and the short forms ``test_y.py::test_z`` and ``::test_z`` (the file cited
  last before it) are checked the same way; ``tests/support/corrupt.flip_byte`` (a module path,
  a dot, a name) must name something that module defines;
- every module under ``cached/`` is named in ``docs/design.md``'s module map, and every ``.py``
  name in that map exists under ``cached/``.

Fenced code blocks are not scanned for paths (they hold commands, output and the map, which has
its own check). A span is an example, not a claim, when it carries a placeholder (``<...>``,
``{...}``, ``*``, ``...``, ``$VAR``): such spans are skipped.
What fails today and is owned by someone else is listed in ``KNOWN_ROT`` with the reason; an
entry that no longer fails is itself an error, so the list only shrinks.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
ROOTS = ("cached/", "tests/", "scripts/", "systemd/", "deploy/", "docs/")
# Characters that mark a span as a pattern or an example rather than a path that must exist.
PLACEHOLDER = re.compile(r"[<>{}*$…]|\.\.\.")

# (page relative to the repo, the reference as written) -> why it is tolerated. Each entry is a
# failure on main that the page's owner is to fix; remove the entry with the fix.
KNOWN_ROT: dict[tuple[str, str], str] = {
    ("docs/benchmarks-cluster.md", "cached/transfer/scheduler.py"): (
        "a historical analysis names the module by its old name (it says 'since renamed transfer/blob.py');"
        " the page's owner is to write the current path next to it"
    ),
}

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
_TEST_REF = re.compile(r"^(?P<file>[\w./-]*test_\w+\.py)?::(?P<name>[A-Za-z_]\w*)(?:\[[^\]]*\])?$")


def _prose(text: str) -> str:
    """The page without fenced code blocks (kept as blank lines so line numbers still match)."""
    return _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _test_files() -> dict[str, list[Path]]:
    by_name: dict[str, list[Path]] = {}
    for p in (REPO / "tests").rglob("test_*.py"):
        by_name.setdefault(p.name, []).append(p)
    return by_name


def _defines(path: Path, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def {re.escape(name)}\(", path.read_text(), re.M) is not None


def _names_an_attribute(span: str) -> bool:
    """``tests/support/corrupt.flip_byte``: a module path, a dot, a name that module defines."""
    module, _, name = span.rpartition(".")
    path = REPO / (module + ".py")
    return (
        bool(module and name.isidentifier() and path.is_file())
        and re.search(
            rf"^(?:(?:async\s+)?def |class ){re.escape(name)}\b|^{re.escape(name)}\s*[:=]", path.read_text(), re.M
        )
        is not None
    )


def problems_in(page: Path) -> list[tuple[str, str]]:
    """(reference as written, what is wrong) for every dangling reference on one page."""
    text = _prose(page.read_text())
    found: list[tuple[str, str]] = []
    tests = _test_files()

    for m in (*_LINK.finditer(text), *_IMAGE.finditer(text)):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor on the same page
        path = target.split("#", 1)[0]
        if path and not (page.parent / path).exists():
            found.append((target, f"line {_line(text, m.start())}: link to a missing file"))

    last_test: Path | None = None
    for m in _SPAN.finditer(text):
        span = m.group(2).strip()
        if PLACEHOLDER.search(span) or " " in span:
            continue
        where = f"line {_line(text, m.start())}"
        if span.startswith(ROOTS):
            path, _, rest = span.partition("::")
            if not (REPO / path).exists() and not _names_an_attribute(path):
                found.append((span, f"{where}: no such path in the repository"))
                continue
            if path.endswith(".py") and "test_" in Path(path).name:
                last_test = REPO / path
            if rest:
                name = re.sub(r"\[.*\]$", "", rest)
                if not _defines(REPO / path, name):
                    found.append((span, f"{where}: {path} defines no {name}"))
            continue
        t = _TEST_REF.match(span)
        if t is None:
            continue
        if t["file"]:
            candidates = tests.get(Path(t["file"]).name, [])
            if len(candidates) != 1:
                found.append((span, f"{where}: {len(candidates)} test files named {Path(t['file']).name}"))
                continue
            last_test = candidates[0]
        if last_test is None:
            continue  # "::1" and the like: not a test reference
        if not _defines(last_test, t["name"]):
            found.append((span, f"{where}: {last_test.relative_to(REPO)} defines no {t['name']}"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_link_and_cited_test_on_the_page_exists(page: Path) -> None:
    rel = str(page.relative_to(REPO))
    found = problems_in(page)
    new = [f"{ref!r}: {why}" for ref, why in found if (rel, ref) not in KNOWN_ROT]
    assert not new, f"{rel} points at things that do not exist:\n" + "\n".join(new)
    stale = [ref for (p, ref) in KNOWN_ROT if p == rel and ref not in {r for r, _ in found}]
    assert not stale, f"KNOWN_ROT entries for {rel} that no longer fail; remove them: {stale}"


def _module_map() -> str:
    text = (REPO / "docs" / "design.md").read_text()
    section = text.split("## Module map", 1)[1]
    return _FENCE.search(section).group(0)  # type: ignore[union-attr]


def test_the_design_module_map_names_every_module_and_only_modules_that_exist() -> None:
    block = _module_map()
    named = set(re.findall(r"\b(\w+\.py)\b", block)) | {d + "/" for d in re.findall(r"^\s*(\w+)/(?:\s|$)", block, re.M)}
    package = REPO / "cached"
    modules = {p.name for p in package.rglob("*.py") if p.name != "__init__.py"}
    packages = {p.parent.name + "/" for p in package.rglob("__init__.py") if p.parent != package}
    missing = sorted((modules | packages) - named - {"cached/"})
    assert not missing, f"modules of cached/ that docs/design.md's module map does not name: {missing}"
    ghosts = sorted(n for n in named - {"cached/"} if n not in modules | packages)
    assert not ghosts, f"docs/design.md's module map names modules that do not exist: {ghosts}"


def test_the_checker_finds_each_kind_of_rot_and_skips_examples(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("x")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#a) [gone](gone.md) [web](https://example.invalid/x) ![img](gone.png)\n"
        "`cached/daemon.py` `cached/gone.py` `cached/<kind>.py` `cached/origins/*.py` `cached/store/`\n"
        "`tests/unit/test_docs_links.py::test_the_checker_finds_each_kind_of_rot_and_skips_examples`\n"
        "`tests/unit/test_docs_links.py::test_gone[param]` `::test_gone_too` `test_docs_links.py::problems_in`\n"
        "`tests/support/corrupt.flip_byte` `tests/support/corrupt.no_such_name` `[::1]` `::1`\n"
        "```\ncached/in_a_fence.py `cached/in_a_fence.py`\n```\n"
    )
    found = [ref for ref, _ in problems_in(page)]
    assert found == [
        "gone.md",
        "gone.png",
        "cached/gone.py",
        "tests/unit/test_docs_links.py::test_gone[param]",
        "::test_gone_too",
        "tests/support/corrupt.no_such_name",
    ]
