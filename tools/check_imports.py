#!/usr/bin/env python3
"""The import rules of python/qengine, read from the source with `ast` (run by .ci/run and by
tests/test_import_graph.py); exits 1 on any finding that ALLOWED_CYCLES / ALLOWED_PRIVATE
does not name, or on an allowlist entry that no longer matches anything.

The graph. Every `import` and `from ... import` in every module counts, at module level and
inside functions, classes and `if` blocks alike (an import moved into a function still runs,
so it still closes a cycle). Relative imports are resolved against the importing module's
package. `from P import x` is an edge to the submodule P.x when x is a module, else to P;
`import a.b.c` is an edge to a.b.c. Importing a.b.c also runs the packages a and a.b first,
so those are edges too, except the packages the importer itself is inside (already running
by then: otherwise every module would depend on qengine/__init__.py). Imports of other
distributions are ignored; qengine._C (NATIVE_MODULES) is a leaf. Not seen: imports by
computed name (importlib.import_module(f".{name}", ...), the lazy attributes of qengine and
qengine.compat).

The rules.
1. No cycle: no strongly connected component of more than one module (nor a module that
   imports itself). Break one by moving the shared piece into the module both need, or by
   inverting the dependency; never by hiding the import in a function.
2. A private name stays home. A private *module* (a dotted component `_x`, not a dunder) may
   be imported only by modules inside the package that holds it: qengine._checks by any qengine
   module, qengine.calibrate._blocks only by qengine.calibrate.*. A private *attribute* (a function,
   class or constant named `_x` in a module) may be used only by the module that defines it:
   neither `from m import _x` nor `alias._x` on a module bound by an import, in any other
   module. A name several modules share is public in the (possibly private) module that owns it.
3. No import of a module of the package that does not exist (one inside a function would fail
   only when called).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "python"  # holds the package directory
PACKAGE = "qengine"

# Built by CMake (pybind11_add_module(_C ...) in CMakeLists.txt): no .py file to parse.
NATIVE_MODULES = frozenset({"qengine._C"})

# Each tolerated cycle, named by its modules exactly, with the reason it is still here (none
# now). An entry that no longer matches a cycle fails the check too: the list only shrinks.
ALLOWED_CYCLES: dict[frozenset, str] = {}

# (importer, owning module, private name) -> the reason it is still here.
ALLOWED_PRIVATE: dict[tuple, str] = {}


@dataclass(frozen=True)
class Edge:
    importer: str
    target: str
    path: Path
    line: int
    in_function: bool
    implicit: bool = False  # a package that importing the target runs first

    def where(self, root: Path = ROOT) -> str:
        scope = (" (in a function)" if self.in_function else "") + (" (runs the package)" if self.implicit else "")
        return f"{self.importer} -> {self.target}  {_shown(self.path, root)}:{self.line}{scope}"


@dataclass(frozen=True)
class PrivateUse:
    importer: str
    owner: str  # the module (or package) the private name belongs to
    name: str
    path: Path
    line: int

    @property
    def key(self) -> tuple:
        return (self.importer, self.owner, self.name)


def discover(source: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every .py file of the package under `source`."""
    modules = {}
    for path in sorted((source / package).rglob("*.py")):
        parts = list(path.relative_to(source).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_private(component: str) -> bool:
    return component.startswith("_") and not (component.startswith("__") and component.endswith("__"))


class _ModuleReader(ast.NodeVisitor):
    """Collects one module's import edges and private-name uses."""

    def __init__(self, name: str, path: Path, known: frozenset):
        self.name, self.path, self.known = name, path, known
        self.is_package = path.name == "__init__.py"
        self.edges: list[Edge] = []
        self.private: list[PrivateUse] = []
        self.missing: list[str] = []  # imports of modules of the package that are not there
        self.aliases: dict[str, str] = {}  # local name -> qengine module it is bound to
        self.attribute_nodes: list[ast.Attribute] = []
        self.depth = 0  # > 0 inside a function body

    # -- resolution
    def _base(self, level: int, module: Optional[str]) -> Optional[str]:
        if level == 0:
            return module
        package = self.name if self.is_package else self.name.rpartition(".")[0]
        parts = package.split(".")
        if level - 1 >= len(parts):
            return None  # beyond the top package: Python raises, nothing to check here
        parts = parts[: len(parts) - (level - 1)]
        return ".".join(parts + ([module] if module else []))

    def _edge(self, target: str, node: ast.AST) -> None:
        self.edges.append(Edge(self.name, target, self.path, node.lineno, self.depth > 0))
        self._check_private_module(target, node)
        parts = target.split(".")
        for n in range(1, len(parts)):
            package = ".".join(parts[:n])
            if package in self.known and not (self.name == package or self.name.startswith(package + ".")):
                self.edges.append(Edge(self.name, package, self.path, node.lineno, self.depth > 0, implicit=True))

    def _check_private_module(self, target: str, node: ast.AST) -> None:
        parts = target.split(".")
        for i, part in enumerate(parts):
            if not _is_private(part):
                continue
            home = ".".join(parts[:i])
            if not (self.name == home or self.name.startswith(home + ".")):
                self.private.append(PrivateUse(self.name, home, ".".join(parts[i:]), self.path, node.lineno))
            return

    def _private_attribute(self, owner: str, name: str, node: ast.AST) -> None:
        if _is_private(name):
            self.private.append(PrivateUse(self.name, owner, name, self.path, node.lineno))

    # -- visitors
    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _ours(self, module: str) -> bool:
        return module.split(".")[0] == self.name.split(".")[0]

    def _missing(self, module: str, node: ast.AST) -> None:
        self.missing.append(f"{self.name} imports {module}, which is not a module of the package  "
                            f"{_shown(self.path, ROOT)}:{node.lineno}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            name = alias.name
            if not self._ours(name):
                continue
            if name not in self.known:
                self._missing(name, node)
                continue
            parts = name.split(".")
            target = name
            self._edge(target, node)
            if alias.asname:
                self.aliases[alias.asname] = target
            else:
                self.aliases[parts[0]] = parts[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._base(node.level, node.module)
        if base is None or not self._ours(base):
            return  # another distribution's (or beyond the top package: Python raises)
        if base not in self.known:
            self._missing(base, node)
            return
        for alias in node.names:
            if alias.name == "*":
                self._edge(base, node)
                continue
            sub = f"{base}.{alias.name}"
            if sub in self.known:
                self._edge(sub, node)
                self.aliases[alias.asname or alias.name] = sub
            else:
                self._edge(base, node)
                self._private_attribute(base, alias.name, node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.attribute_nodes.append(node)
        self.generic_visit(node)

    def finish(self) -> None:
        """`alias._x` on a module bound by an import, once every alias is known."""
        for node in self.attribute_nodes:
            chain = []
            value: ast.AST = node
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if not isinstance(value, ast.Name) or value.id not in self.aliases:
                continue
            chain.reverse()
            # Every Attribute node of a chain is visited: each reports only its own last name.
            module = self.aliases[value.id]
            for i, attr in enumerate(chain):
                if f"{module}.{attr}" in self.known:
                    module = f"{module}.{attr}"
                    self._check_private_module(module, node)
                elif i == len(chain) - 1:
                    self._private_attribute(module, attr, node)
                else:
                    break


@dataclass
class PackageImports:
    modules: list  # every module name, the native ones included
    edges: list  # Edge
    private: list  # PrivateUse
    missing: list  # printable lines: imports of the package's modules that are not there


def read_package(source: Path = SOURCE, package: str = PACKAGE,
                 native: Iterable[str] = NATIVE_MODULES) -> PackageImports:
    """Every import edge, private-name use and missing module among the package's modules."""
    modules = discover(source, package)
    known = frozenset(modules) | frozenset(m for m in native if m.split(".")[0] == package)
    edges, private, missing = set(), set(), []
    for name, path in modules.items():
        reader = _ModuleReader(name, path, known)
        reader.visit(ast.parse(path.read_text(), filename=str(path)))
        reader.finish()
        edges.update(reader.edges)
        private.update(reader.private)
        missing += reader.missing
    return PackageImports(sorted(known), sorted(edges, key=lambda e: (e.importer, e.line, e.target, e.implicit)),
                          sorted(private, key=lambda u: (u.importer, u.line, u.name)), missing)


def strongly_connected(nodes: Iterable[str], graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iterative (no recursion limit), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set = set()
    stack: list[str] = []
    components = []
    counter = 0
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def find_cycles(edges: Iterable[Edge], nodes: Iterable[str] = ()) -> list[tuple[list[str], list[Edge]]]:
    """Each import cycle: its modules (a component of more than one module, or a module importing
    itself) and the import statements that run inside it."""
    edges = list(edges)
    graph: dict[str, set] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.target)
    all_nodes = set(nodes) | set(graph) | {e.target for e in edges}
    cycles = []
    for component in strongly_connected(all_nodes, graph):
        members = set(component)
        inside = [e for e in edges if e.importer in members and e.target in members]
        if len(component) > 1 or inside:
            cycles.append((component, sorted(inside, key=lambda e: (e.importer, e.line, e.target))))
    return cycles


def check(source: Path = SOURCE, package: str = PACKAGE, allowed_cycles: Optional[Mapping] = None,
          allowed_private: Optional[Mapping] = None, root: Path = ROOT) -> list[str]:
    """Every break of the rules that the allowlists do not name, and every allowlist entry that
    names nothing, as printable lines: empty when the package keeps its rules."""
    allowed_cycles = ALLOWED_CYCLES if allowed_cycles is None else allowed_cycles
    allowed_private = ALLOWED_PRIVATE if allowed_private is None else allowed_private
    found = read_package(source, package)
    problems = list(found.missing)
    seen = set()
    for component, inside in find_cycles(found.edges, found.modules):
        key = frozenset(component)
        seen.add(key)
        if key in allowed_cycles:
            continue
        problems.append(f"import cycle among {len(component)} modules: {', '.join(component)}")
        problems += [f"    {e.where(root)}" for e in inside]
    problems += [f"ALLOWED_CYCLES names a cycle that is gone (remove the entry): {sorted(key)}"
                 for key in allowed_cycles if key not in seen]
    used = set()
    for use in found.private:
        used.add(use.key)
        if use.key not in allowed_private:
            problems.append(f"private name used across modules: {use.importer} uses {use.owner}.{use.name}  "
                            f"{_shown(use.path, root)}:{use.line}")
    problems += [f"ALLOWED_PRIVATE names a use that is gone (remove the entry): {key}"
                 for key in allowed_private if key not in used]
    return problems


def _shown(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return path


def main() -> int:
    problems = check()
    for line in problems:
        print(line)
    found = read_package()
    print(f"check_imports: {len(found.modules)} modules, {len(found.edges)} import edges; allowed: "
          f"{len(ALLOWED_CYCLES)} cycles, {len(ALLOWED_PRIVATE)} private uses: {'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
