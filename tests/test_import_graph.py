"""Module boundaries: tools/check_imports.py finds no import cycle (imports inside functions
counted) and no private name used across modules in python/qengine beyond its allowlist; its
cycle finder and rules on small synthetic packages; no test module imports another; and no module
of the package is over 400 lines."""

from __future__ import annotations

import ast
import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "check_imports.py"
TESTS = Path(__file__).resolve().parent

if not SCRIPT.exists() or not (ROOT / "python" / "qengine").is_dir():
    pytest.skip(f"no source tree next to the tests ({SCRIPT})", allow_module_level=True)

_spec = importlib.util.spec_from_file_location("check_imports", SCRIPT)
check_imports = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("check_imports", check_imports)  # dataclasses look their module up there
_spec.loader.exec_module(check_imports)


def write_package(root: Path, files: dict[str, str]) -> Path:
    """Writes {relative path: source} under root and returns root (the directory holding the package)."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def cycles_of(source: Path, package: str = "pkg") -> list[list[str]]:
    found = check_imports.read_package(source, package)
    return [component for component, _ in check_imports.find_cycles(found.edges, found.modules)]


def test_qengine_keeps_its_import_rules():
    problems = check_imports.check()
    assert not problems, "tools/check_imports.py:\n" + "\n".join(problems)


def test_every_allowlist_entry_gives_its_reason():
    for key, reason in {**check_imports.ALLOWED_CYCLES, **check_imports.ALLOWED_PRIVATE}.items():
        assert isinstance(reason, str) and reason.strip(), key


def test_cycle_through_a_function_level_import(tmp_path):
    src = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",  # the submodule b, not pkg/__init__.py
        "pkg/b.py": """
            def late():
                from .a import thing  # hidden in a function: still a cycle
                return thing
        """,
        "pkg/c.py": "from .a import thing\n",  # depends on the cycle, not part of it
    })
    found = check_imports.read_package(src, "pkg")
    assert {(e.importer, e.target) for e in found.edges} == {("pkg.a", "pkg.b"), ("pkg.b", "pkg.a"),
                                                            ("pkg.c", "pkg.a")}
    [(component, inside)] = check_imports.find_cycles(found.edges, found.modules)
    assert component == ["pkg.a", "pkg.b"]
    assert [(e.importer, e.target, e.in_function) for e in inside] == [("pkg.a", "pkg.b", False),
                                                                      ("pkg.b", "pkg.a", True)]
    problems = check_imports.check(src, "pkg", allowed_cycles={}, allowed_private={}, root=tmp_path)
    assert problems[0] == "import cycle among 2 modules: pkg.a, pkg.b"
    assert any("pkg/b.py:3 (in a function)" in line for line in problems)


def test_absolute_imports_and_packages_run_on_the_way(tmp_path):
    src = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/x.py": "from .sub.d import f\n",  # runs pkg/sub/__init__.py first
        "pkg/sub/__init__.py": """
            def g():
                import pkg.x
        """,
        "pkg/sub/d.py": "def f():\n    pass\n",
        "pkg/y.py": "import pkg.z as zz\n",
        "pkg/z.py": "from pkg import y\n",
    })
    assert cycles_of(src) == [["pkg.sub", "pkg.x"], ["pkg.y", "pkg.z"]]


def test_a_package_importing_its_own_submodules_is_no_cycle(tmp_path):
    src = write_package(tmp_path, {
        "pkg/__init__.py": "from .a import f\nfrom . import b\n",
        "pkg/a.py": "from . import b\ndef f():\n    pass\n",
        "pkg/b.py": "import os\nimport json as _json\n",
    })
    assert cycles_of(src) == []
    assert check_imports.check(src, "pkg", allowed_cycles={}, allowed_private={}, root=tmp_path) == []


def test_private_names_stay_home(tmp_path):
    src = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/_impl.py": "def helper():\n    pass\ndef _secret():\n    pass\n",
        "pkg/a.py": "def _hidden():\n    pass\n",
        "pkg/b.py": """
            from . import _impl, a
            from ._impl import helper  # a private module, inside its package: fine
            from .a import _hidden  # a private function of another module

            def use():
                return a._hidden, _impl._secret, _impl.helper
        """,
        "pkg/sub/__init__.py": "",
        "pkg/sub/_inner.py": "VALUE = 1\n",
        "pkg/sub/c.py": "from ._inner import VALUE\n",  # inside pkg.sub: fine
        "pkg/d.py": "from .sub._inner import VALUE\n",  # outside pkg.sub
    })
    found = check_imports.read_package(src, "pkg")
    assert sorted((u.importer, u.owner, u.name, u.line) for u in found.private) == [
        ("pkg.b", "pkg._impl", "_secret", 7),
        ("pkg.b", "pkg.a", "_hidden", 4),
        ("pkg.b", "pkg.a", "_hidden", 7),
        ("pkg.d", "pkg.sub", "_inner", 1),
    ]
    assert sorted({u.key for u in found.private}) == [
        ("pkg.b", "pkg._impl", "_secret"),
        ("pkg.b", "pkg.a", "_hidden"),
        ("pkg.d", "pkg.sub", "_inner"),
    ]
    allowed = {("pkg.b", "pkg._impl", "_secret"): "reason", ("pkg.b", "pkg.a", "_hidden"): "reason",
               ("pkg.d", "pkg.sub", "_inner"): "reason"}
    assert check_imports.check(src, "pkg", allowed_cycles={}, allowed_private=allowed, root=tmp_path) == []


def test_stale_allowlist_entries_and_missing_modules_fail(tmp_path):
    src = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from .gone import x\n",
    })
    problems = check_imports.check(src, "pkg", allowed_cycles={frozenset({"pkg.a", "pkg.b"}): "reason"},
                                   allowed_private={("pkg.a", "pkg.b", "_x"): "reason"}, root=tmp_path)
    assert len(problems) == 3, problems
    assert "pkg.a imports pkg.gone, which is not a module of the package" in problems[0]
    assert problems[1].startswith("ALLOWED_CYCLES names a cycle that is gone")
    assert problems[2].startswith("ALLOWED_PRIVATE names a use that is gone")


def test_strongly_connected_components():
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": ["e"], "e": ["d"], "f": ["f"], "g": []}
    assert check_imports.strongly_connected(graph, graph) == [["a", "b", "c"], ["d", "e"], ["f"], ["g"]]
    # A long chain: iterative, so no recursion limit.
    chain = {str(i): [str(i + 1)] for i in range(5000)}
    chain["5000"] = ["0"]
    [component] = check_imports.strongly_connected(chain, chain)
    assert len(component) == 5001


def test_no_test_module_imports_another():
    # Shared helpers live in support modules (cases.py, reference.py, support.py,
    # sparse_reference.py, property/checks.py ...), never in a test_*.py another test imports.
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[-1].startswith("test_") for n in names):
                offenders.append(f"{path.relative_to(TESTS)}:{node.lineno}")
    assert not offenders, offenders


def test_no_package_module_over_400_lines():
    # Small files with one job: a module that grows past this splits by what it holds (as
    # ops/cpu_moe.py left ops/cpu.py).
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "python" / "qengine").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
