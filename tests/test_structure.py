"""The package's shape: imports run one way (no cycle, counting imports inside functions), none
hidden inside functions but in the CLI's commands, and a family's config imports nothing heavy."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1] / "src"
PKG = ROOT / "kvshrink"
LAZY = {"kvshrink.cli"}  # the top floor: commands import torch and the model only when they run


def _modules() -> dict:
    out = {}
    for path in PKG.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: pathlib.Path, mods: dict):
    """(target module, line, inside a function) for every import of the package in one module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            heads = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            head = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            heads = [head] + [f"{head}.{a.name}" for a in node.names]
        else:
            continue
        for target in heads:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and target != "kvshrink":
                yield target, node.lineno, id(node) in inner


def _graph():
    mods = _modules()
    return {name: {t for t, _, _ in _imports(name, path, mods)} for name, path in mods.items()}


def _cycles(graph: dict) -> list:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    assert _cycles(_graph()) == []


def test_no_import_hidden_inside_a_function():
    mods = _modules()
    hidden = [f"{name}:{line} -> {target}" for name, path in mods.items() if name not in LAZY
              for target, line, inner in _imports(name, path, mods) if inner]
    assert hidden == []


def test_listing_methods_imports_neither_torch_nor_a_kernel():
    code = ("import sys; from kvshrink.cli import main; main(['methods']); "
            "print('HEAVY', sorted(m for m in ('torch', 'numba', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "int4" in out.stdout and "QuantConfig options" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"
