"""House rules, checked on the source: no import circle between conch_dna's modules (lazy imports
inside functions included), no function over 100 lines, and the training loop's top level short enough to
read as its stages."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "conch_dna"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        # A package's __init__ re-exporting its modules is not a dependency of those modules on it.
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def test_no_import_circle():
    graph = imports()
    assert "conch_dna.training.kd.trainer" in graph and graph["conch_dna.training.kd.trainer"]
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node)


def functions():
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path, node


def test_no_function_over_100_lines():
    long = [f"{p.relative_to(ROOT.parent)}:{n.name} ({n.end_lineno - n.lineno + 1})" for p, n in functions()
            if n.end_lineno - n.lineno + 1 > 100]
    assert not long, long


def test_the_training_loop_reads_in_under_60_lines():
    (node,) = [n for p, n in functions() if p.name == "trainer.py" and n.name == "train_with_kd"]
    body = node.body[1:] if isinstance(node.body[0], ast.Expr) else node.body  # after the docstring
    assert body[-1].end_lineno - body[0].lineno + 1 < 60
