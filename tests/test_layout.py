"""The package's import graph: no cycles (counting imports inside functions, which hide one at
import time; not those under `if TYPE_CHECKING:`, which never run), and the dependencies point the
way the README's Architecture section says."""
import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


@functools.lru_cache
def import_graph() -> dict[str, set[str]]:
    # Parsed in a fresh interpreter: late in a long test session CPython 3.11.7's ast.parse can raise
    # a spurious SystemError ("AST constructor recursion depth mismatch").
    out = subprocess.run([sys.executable, __file__], capture_output=True, text=True, check=True).stdout
    return {name: set(deps) for name, deps in json.loads(out).items()}


def parse_import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / "fastssl").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        tree = ast.parse(path.read_text())
        type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                     for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import sub` imports the submodule; `from pkg import name` the package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "fastssl.train.engine" in graph and "fastssl.config" in graph["fastssl.train.engine"]
    assert find_cycle(graph) is None


def test_dependencies_point_one_way():
    graph = import_graph()
    assert graph["fastssl.errors"] == set()
    for name, deps in graph.items():
        # data and models know nothing of training, evaluation or launching
        if name.startswith(("fastssl.data", "fastssl.models")):
            assert not {d for d in deps if d.startswith(("fastssl.train", "fastssl.eval", "fastssl.run"))}, name
        # training does not reach up into the evaluations or the launcher
        if name.startswith("fastssl.train") and name != "fastssl.train.pretrain":  # pretraining runs the kNN monitor
            assert not {d for d in deps if d.startswith("fastssl.eval")}, name
        if name.startswith(("fastssl.train", "fastssl.eval")):
            assert not {d for d in deps if d.startswith(("fastssl.run.launcher", "fastssl.run.job"))}, name


if __name__ == "__main__":
    print(json.dumps({name: sorted(deps) for name, deps in parse_import_graph().items()}))
