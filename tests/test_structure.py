"""The import structure: arrows run one way.

Loading a model (checkpoint, serving, generation, the tokenizer and chat templates, adapters) must not need the
training packages, the strategies must not know the Lightning layer, and no two modules may import each other,
even lazily inside a function (a lazy import hides a circle from Python, not from the reader).
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmkit"

# what inference and loading are built from, and what they may never reach
INFERENCE = ("llmkit.checkpoint", "llmkit.serve", "llmkit.text", "llmkit.adapters", "llmkit.generation", "llmkit.model",
             "llmkit.quantize", "llmkit.hf", "llmkit.onnx")
TRAINING = ("llmkit.posttrain", "llmkit.lit", "llmkit.train", "llmkit.commands", "llmkit.data")


def _modules() -> dict[str, Path]:
    return {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in PACKAGE.rglob("*.py")}


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every llmkit module each module imports, at its top or inside a function."""

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("llmkit"):
                for alias in node.names:  # `from llmkit.data.prep import layout` imports the module layout
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else resolve(node.module))
            elif isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.startswith("llmkit")}
        graph[module] = deps - {module, "llmkit"}
    return graph


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_module_imports_itself_through_others() -> None:
    cycle = _cycle(_imports(_modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_circle() -> None:
    # the check above would pass vacuously if _cycle never found anything
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_loading_and_inference_never_import_training_code() -> None:
    graph = _imports(_modules())
    wrong = sorted(f"{m} -> {d}" for m, deps in graph.items() if _within(m, INFERENCE)
                   for d in deps if _within(d, TRAINING))
    assert not wrong, "inference/loading modules import training packages:\n" + "\n".join(wrong)


def test_strategies_know_nothing_of_the_lightning_layer() -> None:
    deps = _imports(_modules())["llmkit.distributed"]
    assert not [d for d in deps if _within(d, ("llmkit.lit",))], deps


@pytest.mark.parametrize("entry", ["llmkit.checkpoint", "llmkit.serve.app", "llmkit.serve.engine"])
def test_a_fresh_interpreter_loading_a_model_imports_no_training_package(entry: str) -> None:
    code = (f"import sys, {entry}\n"
            "print(sorted(m for m in sys.modules if m.startswith(('llmkit.posttrain', 'llmkit.lit', 'llmkit.data.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {entry} pulled in {out.strip()}"
