"""The package's house rules, read from the code itself (every import, lazy ones too).

Layers, lowest first: the vocabulary (``sieve.contracts``, ``settings``, ``routeset``,
``topology``, ...) < ``kafka`` (wire records, clients, the dev broker) < ``encoders`` <
``flow`` (the pure batch stages) < ``store`` < ``worker`` < ``review`` and ``quality``
< ``console`` < ``cli`` < ``__main__``. A module imports only from its own layer's package or
from lower layers, there is no import circle, and no module is over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "workers" / "sieve"
MAX_LINES = 400

# Each subpackage's layer; top-level modules are the vocabulary (layer 0).
LAYERS = {
    "kafka": 1,
    "encoders": 2,
    "flow": 3,
    "store": 4,
    "worker": 5,
    "review": 6,
    "quality": 6,
    "console": 7,  # the review console: above the reviewer it settles hand-offs for
    "cli": 8,
    "__main__": 9,  # python -m sieve: the CLI
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def package_of(module: str) -> str:
    """``sieve.flow.decide`` -> ``flow``; a top-level module -> ``""`` (the vocabulary)."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    return ""


def layer_of(module: str) -> int:
    return LAYERS.get(package_of(module), 0)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The sieve modules ``path`` imports, anywhere in the file."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            # the longest known module that the target names (``sieve.flow.decide.decide`` -> the module)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("sieve") and target != name and target != "sieve":
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, set(known)) for name, path in known.items()}


def test_every_subpackage_has_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(LAYERS), f"give these packages a layer: {sorted(folders - set(LAYERS))}"


def test_no_import_runs_up_a_layer_or_sideways_into_a_peer() -> None:
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            up = layer_of(target) > layer_of(module)
            peer = layer_of(target) == layer_of(module) and package_of(target) != package_of(module)
            if up or peer:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_no_import_circle() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_over_the_line_limit(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by responsibility"


def test_the_checks_see_a_violation() -> None:
    """The import reader finds lazy and relative imports, so the rules above can fail."""
    sample = PACKAGE / "flow" / "decide.py"
    assert "sieve.contracts" in imports_of(sample, set(modules()))
    assert layer_of("sieve.cli") > layer_of("sieve.flow.decide") > layer_of("sieve.contracts")
