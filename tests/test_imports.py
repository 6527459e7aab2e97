"""The package's shape: imports point one way, no cycle, no reaching into private names.

Layers, top to bottom (a module may import its own layer's modules and any
lower layer's, never a higher one's):

    cli, experiments  ->  crossbow_jax (api, demo, sweeps)  ->  tuning  ->  engine
    ->  transformation, models, data

Every import is read from the source, function-local ones included.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("crossbow_jax", "experiments")
LAYERS = {
    "crossbow_jax.cli": 4,
    "crossbow_jax.__main__": 4,  # `python -m crossbow_jax`: the shell
    "experiments": 4,
    "crossbow_jax": 3,  # the package itself, api.py, demo.py, __main__.py
    "crossbow_jax.sweeps": 3,  # the sweep runner: calls `train`, the engine and the tuner
    "crossbow_jax.tuning": 2,
    "crossbow_jax.engine": 1,
    "crossbow_jax.transformation": 0,
    "crossbow_jax.models": 0,
    "crossbow_jax.data": 0,
}
MAX_LINES = 400


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports(name: str, path: pathlib.Path, known: set[str]):
    """(imported module, line, names taken from it) for every import of the project's modules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name, node.lineno, ()
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:  # `from pkg import module`
                    yield full, node.lineno, ()
                elif base in known:
                    yield base, node.lineno, (alias.name,)


def graph():
    known = set(modules())
    edges = {}
    for name, path in modules().items():
        edges[name] = list(imports(name, path, known))
    return edges


def test_imports_never_point_up_a_layer():
    wrong = [
        f"{name}:{line} imports {target}"
        for name, found in graph().items()
        for target, line, _ in found
        if layer(target) > layer(name)
    ]
    assert not wrong, "\n".join(wrong)


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    """One import cycle, as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges.get(node, ()):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    # A package's __init__ re-exports its modules; a module importing a name
    # from its own package's __init__ would close a cycle, and is counted.
    edges = {name: sorted({t for t, _, _ in found} - {name}) for name, found in graph().items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a"]}) is None


def package(name: str) -> str:
    """The package a module belongs to (a package's __init__: the package itself)."""
    return name if modules()[name].name == "__init__.py" else name.rpartition(".")[0]


def test_no_module_takes_another_packages_private_names():
    """`from other import _x`, `import other._private`, `other_module._x` are refused
    across packages; inside one package private modules and names are its own."""
    known, wrong = set(modules()), []
    for name, path in modules().items():
        home = package(name)

        def mine(target, home=home):
            """A module of the importer's own package (for the top package, its top level)."""
            inside = target == home or target.startswith(home + ".")
            return inside and (home not in PACKAGES or package(target) == home)

        aliases = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    if f"{node.module}.{a.name}" in known:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for target, line, names in imports(name, path, known):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if any(part.startswith("_") for part in target.split(".")):
                private.append(target)
            if private and not mine(target):
                wrong.append(f"{name}:{line} takes {private} from {target}")
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not mine(aliases[node.value.id])
            ):
                wrong.append(f"{name}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("crossbow_jax")))
def test_no_module_is_over_400_lines(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"
