"""The core's import graph: the model, the architecture table and the adapters read config.json
through one leaf reader (quantkit.hfconfig) and import one another in one direction only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "quantkit"
ONE_WAY = ("quantkit.hfconfig", "quantkit.model", "quantkit.archs", "quantkit.archs.adapters", "quantkit.archs.adapters.base",
           "quantkit.archs.adapters.workcopy", "quantkit.archs.adapters.gpt_neox", "quantkit.archs.adapters.stablelm")


def _graph() -> dict[str, set[str]]:
    """Every quantkit import of every module, the lazy ones inside functions included."""
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        name = ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = p
    graph = {}
    for name, p in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("quantkit"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            if nxt == goal:
                return True
            seen.add(nxt)
            todo.append(nxt)
    return False


def test_no_circle_through_the_model_and_architecture_modules() -> None:
    graph = _graph()
    circular = [m for m in ONE_WAY if _reaches(graph, m, m)]
    assert circular == []


def test_the_config_reader_is_a_leaf() -> None:
    assert _graph()["quantkit.hfconfig"] == {"quantkit.errors"}


def test_the_working_copy_does_not_load_the_model_module() -> None:
    code = "import sys, quantkit.archs.adapters.workcopy; print('quantkit.model' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.strip() == "False"
