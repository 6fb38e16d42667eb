"""The README's Layout section is the architecture: every module of reproduce/ is listed there, and each
imports only from the entries above its own (or within it), with no import cycles between modules.
Imports inside functions count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import re
from collections import defaultdict

from tests.conftest import REPO

PACKAGE = REPO / "reproduce"


def layout_entries() -> list[str]:
    """The `reproduce/...` entries of the README's Layout block, top to bottom ("reproduce/models/" -> "models")."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Layout") :]
    block = section[section.index("```") + 3 :]
    block = block[: block.index("```")]
    return [m.group(1).rstrip("/").removesuffix(".py") for m in re.finditer(r"^reproduce/(\S+)", block, re.M)]


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path) -> set[str]:
    """The reproduce.* modules `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "reproduce":
            if node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)  # `from reproduce import checkpoint`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "reproduce")
    return found


def modules() -> dict[str, set[str]]:
    every = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {i for i in imports_of(path) if i in every} for name, path in every.items()}


def entry_of(module: str, entries: list[str]) -> int | None:
    """The index of the entry `module` belongs to: the longest entry that is it or a package above it."""
    rel = module.split(".")[1:]
    best = None
    for index, entry in enumerate(entries):
        parts = entry.split("/")
        if rel[: len(parts)] == parts and (best is None or len(parts) > len(entries[best].split("/"))):
            best = index
    return best


def test_every_module_is_in_the_readme_layout():
    entries = layout_entries()
    assert len(entries) == len(set(entries)), "an entry is listed twice"
    missing = sorted(m for m in modules() if m != "reproduce" and entry_of(m, entries) is None)
    assert not missing, f"modules the README's Layout does not list: {missing}"


def test_each_module_imports_only_from_entries_above_its_own():
    entries = layout_entries()
    wrong = []
    for module, imported in modules().items():
        if module == "reproduce":
            continue
        mine = entry_of(module, entries)
        for other in imported:
            theirs = entry_of(other, entries) if other != "reproduce" else -1
            if theirs is not None and mine is not None and theirs > mine:
                wrong.append(f"{module} ({entries[mine]}) imports {other} ({entries[theirs]}), listed below it")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = modules()
    deps = defaultdict(set)
    for module, imported in graph.items():
        # importing `reproduce.x.y` also runs reproduce.x's __init__, but that is not a dependency of our
        # code on the package's own modules: only the module named is an edge
        deps[module] = {i for i in imported if i != module and not module.startswith(i + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(deps[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(deps):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
