"""House rules, checked on the source: layers that only reach down (lazy imports inside functions included),
serving that never loads the trainer, no import circle, and functions short enough to read, with few
parameters. docs/design.md draws the same layers."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "conch_dna"
KD = "conch_dna.training.kd."

# Lowest first. A module may import its own layer and the ones below, never one above.
LAYERS = {
    "base": ["conch_dna", "conch_dna._blas", "conch_dna._faults", "conch_dna.atomic", "conch_dna.inputs",
             "conch_dna.defaults", "conch_dna.log_setup"],
    "models": ["conch_dna.models", "conch_dna.models.__main__", "conch_dna.models.defaults",
               "conch_dna.models.fuse", "conch_dna.models.gguf_convert", "conch_dna.models.templates", "conch_dna.models.tiny"],
    "core": [KD + m for m in ("losses", "kernels", "fused", "vocab", "cross_vocab", "flat", "distributed", "config")]
    + ["conch_dna.neuron"],
    "data": [KD + m for m in ("domains", "examples", "teacher_cache", "teacher_data", "cross_examples", "corpus",
                              "targets")],
    "training": [KD + m for m in ("trainer", "lean", "checkpoints", "update", "validation", "memory", "report", "signals", "lora_init")],
    "application": [KD + m for m in ("distiller", "evaluate", "cli", "__main__")]
    + ["conch_dna.training", "conch_dna.training.kd", "conch_dna.training.true_kd", "conch_dna.ego",
       "conch_dna.ego.ego", "conch_dna.ego.experience", "conch_dna.cortex", "conch_dna.cortex.cortex", "conch_dna.cortex.adapters",
       "conch_dna.cortex.engine", "conch_dna.cortex.server",
       "conch_dna.cortex.registry", "conch_dna.progress"],
}
LEVEL = {module: i for i, names in enumerate(LAYERS.values()) for module in names}
# What serving a neuron may load of the distillation package: the signals the registry sends.
SERVING_MAY_LOAD = {"conch_dna.training", "conch_dna.training.kd", KD + "signals"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every module's imports of conch_dna modules, at the top or inside functions."""
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


def test_every_module_has_a_layer():
    graph = imports()
    assert set(graph) == set(LEVEL), {"unplaced": sorted(set(graph) - set(LEVEL)), "gone": sorted(set(LEVEL) - set(graph))}


def test_imports_only_reach_down():
    up = [f"{m} ({layer_of(m)}) -> {t} ({layer_of(t)})" for m, targets in imports().items() for t in sorted(targets)
          if LEVEL[t] > LEVEL[m]]
    assert not up, "\n".join(up)


def layer_of(module: str) -> str:
    return list(LAYERS)[LEVEL[module]]


def test_serving_never_loads_the_trainer():
    """What CORTEX can reach through its imports, lazy ones included, and what a process that serves loads."""
    graph = imports()
    seen, todo = set(), ["conch_dna.cortex", "conch_dna.cortex.cortex", "conch_dna.cortex.adapters",
       "conch_dna.cortex.engine", "conch_dna.cortex.server", "conch_dna.cortex.registry"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    reached = {m for m in seen if m.startswith("conch_dna.training")} - SERVING_MAY_LOAD
    assert not reached, sorted(reached)
    code = ("import sys, conch_dna; from conch_dna.cortex import Cortex, NeuronRegistry; "
            "print(sorted(m for m in sys.modules if m.startswith('conch_dna.training')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert set(eval(loaded)) <= SERVING_MAY_LOAD, loaded


def test_no_import_circle():
    graph = imports()
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


def parameters(node) -> int:
    a = node.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
    return n - bool(a.args and a.args[0].arg in ("self", "cls"))


def test_no_function_over_60_lines_or_7_parameters():
    long = [f"{p.relative_to(ROOT.parent)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)" for p, n in functions()
            if n.end_lineno - n.lineno + 1 > 60]
    wide = [f"{p.relative_to(ROOT.parent)}:{n.name} ({parameters(n)} parameters)" for p, n in functions()
            if parameters(n) > 7]
    assert not long + wide, long + wide
