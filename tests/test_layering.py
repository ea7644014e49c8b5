"""The package's imports obey docs/architecture.md: no import cycle, no import against the rooms.

Every import of `src/tepo` is read with `ast`, module level and inside functions alike (most
cycles hide in the deferred ones), relative imports resolved, and, in a module that calls
`importlib.import_module`, every string that names a tepo module (the lazy exports of
`tepo.training`, the sub-commands of `tepo.cli`). Nothing is imported: the test reads source only.
The rooms below are docs/architecture.md's table; change both together.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "tepo"

# room -> the rooms it may import (besides itself). "leaves" are the package root and every single
# module at the top of the package other than cli.py (advantages, models, vllm_engine, ...).
ROOMS: dict[str, set[str]] = {
    "objectives": set(),
    "leaves": {"leaves"},
    "tasks": {"leaves"},
    "rewards": {"leaves", "tasks"},
    "evaluation": {"leaves", "objectives", "tasks", "rewards"},
    "training": {"leaves", "objectives", "tasks", "rewards", "evaluation"},
    "analysis": {"leaves", "objectives", "tasks", "rewards", "evaluation", "training"},
    "cli": {"leaves", "objectives", "tasks", "rewards", "evaluation", "training", "analysis"},
}
# the third-party packages a room may import (rooms not named here: any)
THIRD_PARTY = {"objectives": {"torch"}}


def room_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "leaves"
    if parts[1] == "cli" and len(parts) == 2:
        return "cli"
    return parts[1] if parts[1] in ROOMS else "leaves"


def read_modules(src: Path = SRC) -> dict[str, Path]:
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def read_imports(modules: dict[str, Path]) -> tuple[list[tuple[str, str, str, int]], dict[str, set[str]]]:
    """(importer, imported tepo module, name or "", line) for every import of a tepo module, and each
    module's third-party top-level packages."""
    found, third_party = [], {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        outside = third_party.setdefault(module, set())

        def add(target: str, name: str, line: int) -> None:
            top = target.split(".")[0]
            if top == PACKAGE:
                found.append((module, target, name, line))
            elif top and top not in sys.stdlib_module_names and top != "__future__":
                outside.add(top)

        dynamic = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, "", node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    # `from tepo.training import vllm_sync` imports the module tepo.training.vllm_sync
                    add(sub, "", node.lineno) if sub in modules else add(target, alias.name, node.lineno)
            elif isinstance(node, ast.Attribute) and node.attr == "import_module":
                dynamic = True
        if dynamic:
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in modules and node.value != module:
                    found.append((module, node.value, "", node.lineno))
    return found, third_party


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan, iterative enough for a package of this size
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def graph_of(imports) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for importer, target, _, _ in imports:
        graph.setdefault(importer, set()).add(target)
    return graph


def layering_violations(imports, modules) -> list[str]:
    bad = []
    for importer, target, name, line in imports:
        where = f"{modules[importer].relative_to(SRC.parent)}:{line}: {importer} imports {target}" + (f".{name}" if name else "")
        if target not in modules:
            bad.append(f"{where}: no such module")
            continue
        src_room, dst_room = room_of(importer), room_of(target)
        if src_room == dst_room:
            continue
        if dst_room not in ROOMS[src_room]:
            bad.append(f"{where}: room {src_room!r} may not import room {dst_room!r}")
        # another room's internals: a private module or a private name
        private = [p for p in target.split(".")[1:] + ([name] if name else []) if p.startswith("_") and not p.startswith("__")]
        if private:
            bad.append(f"{where}: {private[0]!r} is internal to room {dst_room!r}")
    return bad


MODULES = read_modules()
IMPORTS, THIRD = read_imports(MODULES)


def test_the_reader_sees_imports_inside_functions():
    # tepo.training.callbacks imports the evaluation runner inside a function only
    deferred = [(i, t) for i, t, _, _ in IMPORTS if i == "tepo.training.callbacks" and t == "tepo.evaluation.runner"]
    assert deferred, "the import reader missed a function-level import"
    assert len(IMPORTS) > 100


def test_no_import_cycle_between_modules():
    cycles = find_cycles(graph_of(IMPORTS))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_every_import_follows_the_rooms():
    bad = layering_violations(IMPORTS, MODULES)
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_objectives_import_only_torch():
    for module, packages in THIRD.items():
        allowed = THIRD_PARTY.get(room_of(module))
        if allowed is not None:
            assert packages <= allowed, f"{module} imports {sorted(packages - allowed)}"


def test_the_architecture_page_states_these_rooms():
    text = (SRC.parent / "docs" / "architecture.md").read_text()
    for room, allowed in ROOMS.items():
        row = f"| `{room}` | " + (", ".join(f"`{r}`" for r in sorted(allowed - {room})) or "nothing") + " |"
        assert row in text, f"docs/architecture.md lacks the row starting {row!r}"
    section = text.split("## The rooms", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) == len(ROOMS), "docs/architecture.md's table has rooms the test does not know"
    assert "objectives" in text and "torch" in text


# The checks themselves fail when they should (on constructed graphs and imports).


def test_a_cycle_is_found_also_through_three_modules_and_a_self_import():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("importer, target, name, message", [
    ("tepo.evaluation.generation", "tepo.training.vllm_sync", "", "may not import room 'training'"),
    ("tepo.objectives.ppo", "tepo.rewards", "", "may not import room 'rewards'"),
    ("tepo.tasks.data", "tepo.rewards", "", "may not import room 'rewards'"),
    ("tepo.vllm_engine", "tepo.training.vllm_sync", "", "may not import room 'training'"),
    ("tepo.training.trainer", "tepo.objectives._registry", "", "internal to room 'objectives'"),
    ("tepo.training.trainer", "tepo.objectives", "_common", "internal to room 'objectives'"),
])
def test_an_import_against_the_rooms_is_reported(importer, target, name, message):
    bad = layering_violations([(importer, target, name, 1)], MODULES)
    assert len(bad) == 1 and message in bad[0]


def test_the_rooms_allow_what_the_architecture_allows():
    assert layering_violations([("tepo.training.callbacks", "tepo.evaluation.runner", "greedy_accuracy", 1),
                                ("tepo.rewards.gold", "tepo.tasks.data", "", 1),
                                ("tepo.analysis.compare", "tepo.objectives", "list_objectives", 1),
                                ("tepo.objectives.ppo", "tepo.objectives._registry", "", 1)], MODULES) == []
