"""The package's layering (README, "Files"): lower layers never import higher ones, no import cycles, and no
function-local import (which would hide a cycle) except of optional dependencies."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# Lowest first. A module may import its own layer and those below it.
LAYERS = [
    ("usaf.units", "usaf.integrity", "usaf.io", "usaf.config", "usaf.runtime", "usaf.progress"),  # foundation
    ("usaf.engine",),  # the math: families, experts, deltas, selection, optimizer
    ("usaf.load", "usaf.data"),  # where weights and data come from
    ("usaf.memory",),  # the planner and the frozen-prefix cache
    ("usaf.train", "usaf.export"),  # the run, and what leaves it
    ("usaf.integrations",),  # usaf inside other training frameworks (transformers.Trainer, trl.SFTTrainer)
    ("usaf.bench", "usaf.testing", "usaf.tiny_configs"),  # measurements and test models
    ("usaf.cli", "usaf.demo", "usaf.__main__", "usaf"),  # the commands and the public API
]
OPTIONAL = {"peft", "gguf", "matplotlib", "llama_cpp", "trl", "tensorboard", "datasets"}
# Heavy modules imported on first use (transformers' auto-model tables cost ~27 MB at `import usaf`).
DEFERRED = {"transformers.models.auto.modeling_auto"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "usaf").rglob("*.py"):
        name = ".".join(p.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _rank(mod: str) -> int:
    best = None
    for r, prefixes in enumerate(LAYERS):
        for pre in prefixes:
            if mod == pre or (pre != "usaf" and mod.startswith(pre + ".")):
                best = r
    if best is None:
        raise AssertionError(f"{mod} is in no layer of tests/test_layers.py")
    return best


def _imports(mod: str, path: Path, mods: dict):
    """(target module, line, function-local) for every import of a usaf module; and third-party local ones."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                head = ".".join(base + ([node.module] if node.module else []))
            else:
                head = node.module or ""
            names = [head] + [f"{head}.{a.name}" for a in node.names]
        else:
            continue
        local = id(node) in local_nodes
        for t in names:
            while t and t not in mods and t != "usaf":
                t = t.rpartition(".")[0]
            if t:
                yield t, node.lineno, local
        if local and not any(n.split(".")[0] == "usaf" for n in names) and not getattr(node, "level", 0):
            top = names[0].split(".")[0]
            if top not in OPTIONAL and names[0] not in DEFERRED:
                yield f"third-party:{top}", node.lineno, True


def test_lower_layers_never_import_higher_ones_and_no_local_imports():
    mods = _modules()
    problems = []
    for mod, path in mods.items():
        for target, line, local in _imports(mod, path, mods):
            if target.startswith("third-party:"):
                problems.append(f"{mod}:{line} imports {target[12:]} inside a function (only optional "
                                f"dependencies may be imported lazily: {sorted(OPTIONAL)})")
                continue
            if target == mod or target == "usaf":
                continue
            if local:
                problems.append(f"{mod}:{line} imports {target} inside a function")
            if _rank(target) > _rank(mod):
                problems.append(f"{mod}:{line} imports the higher layer {target}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    mods = _modules()
    edges = {m: {t for t, _, _ in _imports(m, p, mods) if t in mods and t not in (m, "usaf")}
             for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in edges[m]:
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])


def test_every_module_is_in_a_layer():
    for mod in _modules():
        _rank(mod)
