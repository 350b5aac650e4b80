"""The import direction of docs/CONVENTIONS.md, read from the source with `ast`.

core <- sampling <- eval; core/models/data <- train; everything <- builders/runs <- commands.
Function-level (lazy) imports count like top-level ones.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "xdlm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every `xdlm...` module `path` imports (absolute or relative, at any depth)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else None
    package = package or _module_name(path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from xdlm import train`
    return {m for m in found if m == "xdlm" or m.startswith("xdlm.")}


GRAPH = {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _violations(importer: str, allowed) -> list[str]:
    return [
        f"{src} imports {dst}"
        for src, deps in GRAPH.items()
        if _within(src, importer)
        for dst in deps
        if dst in GRAPH and not allowed(dst)
    ]


def test_graph_is_read():
    assert "xdlm.core.kernel" in GRAPH["xdlm.core.fused"]
    assert "xdlm.runs" in GRAPH["xdlm.commands.sample"]


def test_core_imports_nothing_of_ours_but_core():
    assert _violations("xdlm.core", lambda d: _within(d, "xdlm.core")) == []


def test_sampling_imports_only_core_and_the_model_protocol():
    allowed = ("xdlm.core", "xdlm.sampling", "xdlm.models.protocol")
    assert _violations("xdlm.sampling", lambda d: _within(d, *allowed)) == []


@pytest.mark.parametrize("package", ["xdlm.eval", "xdlm.data", "xdlm.models", "xdlm.sampling"])
def test_inference_packages_never_import_train(package):
    assert _violations(package, lambda d: not _within(d, "xdlm.train")) == []


def test_only_commands_import_train():
    importers = {
        src
        for src, deps in GRAPH.items()
        if any(_within(d, "xdlm.train") for d in deps) and not _within(src, "xdlm.train")
    }
    assert importers and all(_within(src, "xdlm.commands") for src in importers), importers


def test_builders_and_runs_never_import_commands_or_train():
    for name in ("xdlm.builders", "xdlm.runs", "xdlm.config"):
        bad = [d for d in GRAPH[name] if _within(d, "xdlm.train", "xdlm.commands")]
        assert bad == [], f"{name} imports {bad}"


def _cycles() -> list[list[str]]:
    """The import cycles of GRAPH: its strongly connected components of more than one module
    (Tarjan's algorithm)."""
    graph = {src: sorted(d for d in deps if d in GRAPH and d != src) for src, deps in GRAPH.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """Regression: `xdlm.hub` and `xdlm.runs` imported each other (lazily); export reading now
    lives in runs.py and hub.py only writes."""
    assert _cycles() == []


def test_only_the_cli_imports_commands():
    bad = [
        src
        for src, deps in GRAPH.items()
        if any(_within(d, "xdlm.commands") for d in deps)
        and not _within(src, "xdlm.commands", "xdlm.cli")
    ]
    assert bad == []


# Called by an external framework, never by our code: lm_eval reads `LM.tokenizer_name`;
# torch.distributed.checkpoint calls `read_metadata` / `load_bytes` of our safe reader / planner.
EXTERNAL_HOOKS = {"tokenizer_name", "read_metadata", "load_bytes"}


def test_no_dead_definitions():
    """Every function and class defined in src/xdlm is named somewhere besides its definition
    (src, tests, scripts, experiments, benchmarks). Regression: `Fixed.window`, `gumbel_argmax`
    and `TransitionCounts.totals` were defined and never used."""
    root = SRC.parents[1]
    files = [p for d in ("src", "tests", "scripts", "experiments", "benchmarks")
             for p in (root / d).rglob("*.py")]  # fmt: skip
    words = Counter(re.findall(r"\b\w+\b", "\n".join(p.read_text() for p in files)))
    dead = [
        f"{path.relative_to(root)}: {node.name}"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and not node.name.startswith("__")
        and node.name not in EXTERNAL_HOOKS
        and words[node.name] <= 1
    ]
    assert dead == []


def test_the_chunk_size_is_defined_once_and_documented_as_it_is():
    """Regression: `CHUNK_ELEMENTS` was defined in core/fused.py and core/logit_stats.py, and
    `fused_nelbo`'s docstring said 64 MB chunks while the constant gave 16 MB. The fused loss
    now measures its rows per chunk (core/fused_plan.py) under one memory cap, documented as
    what it is."""
    from xdlm.core import fused_plan

    assert "CHUNK_ELEMENTS =" not in (SRC / "core" / "fused.py").read_text()
    cap_mb = fused_plan.MAX_CHUNK_ELEMENTS * 4 // 2**20
    assert f"{cap_mb} MB of float32" in (SRC / "core" / "fused_plan.py").read_text()
