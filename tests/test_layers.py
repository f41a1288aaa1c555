"""The package's layers: every import of ours points down the list, and no modules import each other in a circle.

Read top to bottom, the layers tell where a request goes (README "Code map"). A module may import
its own layer and any layer below it, never one above. Imports for the type checker only count too:
a class named in an annotation is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"

# Highest first. A module's layer is its subpackage, or its own name at the top of the package.
LAYERS = (
    ("__main__", "cli"),
    ("devtools",),
    ("server",),
    ("app",),
    ("ops",),
    ("request",),
    ("limits",),
    ("redisio",),
    ("records",),
    ("http",),
    ("config",),
    ("redact",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The modules of ours that one file imports, relative imports resolved, `from x import module` included."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "proxy")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.split(".")[0] == "proxy":
                target = node.module
            else:
                continue
            found.add(target)
            for alias in node.names:  # `from . import billing`: the module billing
                if (PACKAGE.parent / Path(*f"{target}.{alias.name}".split("."))).with_suffix(".py").exists():
                    found.add(f"{target}.{alias.name}")
    return found - {name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in graph() if layer(m) not in RANK and m != "proxy")
    assert unplaced == [], f"modules in no layer (add them to LAYERS and the README's code map): {unplaced}"


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in graph().items()
        if module != "proxy"
        for target in sorted(targets)
        if target != "proxy" and RANK[layer(target)] < RANK[layer(module)]
    ]
    assert upward == []


def test_no_import_circles() -> None:
    edges = graph()
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in edges:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert circles == []
