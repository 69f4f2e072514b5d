"""The README and docs/: links that resolve, a map of every page, the test command CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> str:
    """The page without its code blocks and code spans, where brackets are not links."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set:
    """GitHub's anchors for the headings of `path`: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


def relative_links(path: Path) -> list:
    return [target for target in LINK.findall(prose(path)) if not re.match(r"[a-z]+:", target)]


def test_every_relative_link_in_the_readme_and_docs_resolves():
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            file, _, anchor = target.partition("#")
            linked = (page.parent / file).resolve() if file else page
            if not linked.is_file():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


def test_the_readme_maps_every_page_of_docs():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in relative_links(REPO / "README.md")}
    unmapped = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert unmapped == []


def test_the_readme_test_command_is_the_one_ci_runs():
    ci_command = re.search(r'bash -c "(pip install [^"]*python -m pytest[^"]*)"', (REPO / ".ci" / "run").read_text())
    assert ci_command is not None, ".ci/run no longer runs pytest through `bash -c \"pip install ...\"`"
    assert ci_command.group(1) in (REPO / "README.md").read_text().splitlines()
