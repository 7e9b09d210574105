"""The README and docs/ as a user reads them: every Python snippet runs as pasted, every link
to a file of the repository points at one, the README stays a short front door, and its two
setup commands are where .ci/run reads them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

if not README.exists():
    pytest.skip(f"no README.md next to the tests ({README})", allow_module_level=True)


def python_snippets() -> list[tuple[str, str]]:
    """(id, code) of every ```python block of the README and docs/, in page order."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return found


SNIPPETS = python_snippets()

# Deprecation notices that trl's, transformers' and peft's own defaults raise between each other
# (e.g. trl's configs still set `gradient_checkpointing`): not about qengine, so not errors here.
pytestmark = [pytest.mark.filterwarnings(f"ignore::{cat}:{mod}.*") for cat in ("FutureWarning", "DeprecationWarning")
              for mod in ("transformers", "trl", "peft")]


@pytest.mark.parametrize("code", [c for _, c in SNIPPETS], ids=[i for i, _ in SNIPPETS])
def test_snippet_runs_as_pasted(code, tmp_path, monkeypatch):
    # Each block alone, in a fresh namespace and an empty working directory, as a user pastes it.
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    try:
        exec(compile(code, "<snippet>", "exec"), {"__name__": "__snippet__"})
    finally:
        torch.set_num_threads(threads)


def test_every_page_has_a_snippet_or_none_is_expected():
    # The extraction must see the blocks at all (a changed fence would silently test nothing).
    assert len(SNIPPETS) >= 8, [i for i, _ in SNIPPETS]
    assert any(i.startswith("README.md") for i, _ in SNIPPETS)


def test_readme_is_a_short_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: move detail to docs/"


def test_two_commands_block():
    # .ci/run extracts these lines and runs them in a fresh virtual environment.
    text = README.read_text()
    match = re.search(r"<!-- two-commands:begin -->\n```bash\n(.*?)```\n<!-- two-commands:end -->", text, re.S)
    assert match, "README.md lost its marked two-commands block"
    commands = [c for c in match.group(1).splitlines() if c.strip()]
    assert len(commands) == 2, commands
    assert "qengine demo" in commands[0]
    assert "pytest tests" in commands[1]
    for command in commands:
        assert command.count("pip install") == 1, f"one pip install per command (one native build): {command}"
        assert "torch==" in command, f"torch pinned, or a bare requirement pulls a CUDA build: {command}"


def test_links_to_repository_files_exist():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text()
    unlinked = [p.name for p in DOCS if f"(docs/{p.name})" not in text]
    assert not unlinked, unlinked
