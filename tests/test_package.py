"""The package as a whole: modules import each other without cycles, the description says what exists."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "seekformer"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from pkg import mod` imports the module pkg.mod, `from mod import name` the module mod
                deps.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_graph_sees_real_imports():
    graph = _import_graph()
    assert "seekformer.checkpoint" in graph["seekformer.model.transformer"]
    assert "seekformer.config" in graph["seekformer.checkpoint"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    # checkpoint.py works on any module laid out as Transformer; the model imports it, never the reverse
    assert not any(m.startswith("seekformer.model") for m in _import_graph()["seekformer.checkpoint"])
    assert _find_cycle(_import_graph()) is None


# what pyproject.toml's description may name, and the module that makes it true
FEATURES = {
    "MLA": "model/attention.py", "DeepSeekMoE": "model/moe.py", "MTP": "model/transformer.py", "FP8": "quant/fp8.py",
    "YaRN": "model/layers.py", "Engram": "model/engram.py", "GRPO": "training/grpo.py", "SFT": "training/sft.py",
    "distillation": "training/sft.py", "serving": "serve", "pretraining": "training/pretrain.py",
    "generation": "inference/generation.py", "hub checkpoints": "checkpoint.py",
    "distributed training": "distributed/trainer.py",
}


def test_the_package_description_names_only_what_exists():
    import re

    pyproject = (PACKAGE.parents[1] / "pyproject.toml").read_text()
    description = re.search(r'^description = "(.*)"$', pyproject, re.M).group(1)
    named = [feature for feature in FEATURES if re.search(rf"\b{re.escape(feature)}\b", description)]
    assert len(named) >= 6, description
    assert [f for f in named if not (PACKAGE / FEATURES[f]).exists()] == []
