"""The layout rules of docs/CONVENTIONS.md, checked on the source: the import graph of ``kernels/`` (lazy imports
inside functions included) has no cycle, no file imports a private (underscore) name from another file, every op
module is named like its op, and no file is over the size limit."""

import ast
import pathlib

import pytest

import kernels
from kernels import library

ROOT = pathlib.Path(kernels.__file__).parent
MAX_LINES = 450
# single-concept Triton kernel files may be longer (the exception)
LONG_OK_SUFFIX = "_triton.py"


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _sources()


def _is_module(name: str) -> bool:
    return name in MODULES or name == "kernels._C"


def _imports(path: pathlib.Path):
    """(imported module, imported name or None, line) for every import of a kernels module in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kernels"):
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            if not base.startswith("kernels"):
                continue
            for alias in node.names:
                yield base, alias.name, node.lineno


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for base, name, _ in _imports(path):
            target = f"{base}.{name}" if name and _is_module(f"{base}.{name}") else base
            if target in MODULES and target != mod:
                graph[mod].add(target)
    return graph


def _cycles(graph):
    """Every elementary cycle found by a depth-first search (enough to report one per strongly connected part)."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_kernels_import_graph_has_no_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles in kernels/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_no_private_name_is_imported_across_files():
    bad = []
    for mod, path in MODULES.items():
        for base, name, line in _imports(path):
            if name and name.startswith("_") and not _is_module(f"{base}.{name}"):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: from {base} import {name}")
    assert not bad, "private names imported across files:\n" + "\n".join(bad)


def test_no_kernels_file_is_over_the_size_limit():
    long = []
    for path in MODULES.values():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and not path.name.endswith(LONG_OK_SUFFIX):
            long.append(f"{path.relative_to(ROOT.parent)}: {n} lines")
    assert not long, f"files over {MAX_LINES} lines (split them by concept):\n" + "\n".join(long)


@pytest.mark.parametrize("op", sorted(library.OPS))
def test_every_registered_op_has_a_module_named_like_it(op):
    homes = [p for p in ROOT.rglob(f"{op}.py")]
    assert len(homes) == 1, f"{op}: expected one kernels/<family>/{op}.py, found {homes}"
    tests = ROOT.parent / "tests" / f"test_{op}.py"
    assert tests.exists(), f"{op}: expected its tests in {tests.relative_to(ROOT.parent)}"


def test_family_packages_do_not_shadow_their_op_modules():
    """``kernels.<family>.<op>`` must stay the module: a package re-exporting a same-named function would
    rebind it."""
    import importlib

    for op in library.OPS:
        (home,) = ROOT.rglob(f"{op}.py")
        name = _module_name(home)
        package = importlib.import_module(name.rpartition(".")[0])
        attr = getattr(package, op, None)
        assert attr is None or isinstance(attr, type(kernels)), f"{package.__name__}.{op} is {attr!r}, not the module"
