"""The code stays a size a reader can hold: short functions, short engine files, imports that
never go round in a circle, and no measured timings in docstrings or comments (they go stale;
numbers belong in the README's tables and the benchmark output)."""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lora_jax", "models", "pallas_kernels")
MAX_FUNCTION_LINES = 60
MAX_ENGINE_FILE_LINES = 300
TIMING = re.compile(r"\b\d+(\.\d+)?\s?(ms|us|µs|ns|s|seconds?|milliseconds?|microseconds?)\b"
                    r"|\b\d+(\.\d+)?\s?x (faster|slower)\b|\btok(ens)?/s\b\s*[:=]?\s*\d",
                    re.IGNORECASE)


def _sources(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (ROOT / root).rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in _sources(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{_name(path)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)


def test_no_engine_file_is_longer_than_300_lines():
    long = [f"{_name(p)} ({n} lines)" for p in _sources("lora_jax/engine")
            if (n := len(p.read_text().splitlines())) > MAX_ENGINE_FILE_LINES]
    assert not long, "split these files:\n" + "\n".join(long)


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The project modules `path` imports anywhere in it (functions included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from package import submodule` needs the submodule, not the package's names.
            subs = {f"{base}.{alias.name}" for alias in node.names} & modules
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(base)
    return {name for name in found if name in modules and name != module}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], path[len(path):] = 1, [node]
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    paths = {_module(p): p for p in _sources(*PACKAGES)}
    graph = {m: _imports(p, m, set(paths)) for m, p in paths.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _prose(path: Path):
    """(line, text) of every comment and docstring of a Python file."""
    source = path.read_text()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False)
            if doc and node.body:
                yield node.body[0].lineno, doc


@pytest.mark.parametrize("root", [*PACKAGES, "scripts"])
def test_no_timing_figure_in_a_docstring_or_comment(root):
    found = [f"{_name(path)}:{line}: {match.group(0)!r}" for path in _sources(root)
             for line, text in _prose(path) if (match := TIMING.search(text))]
    assert not found, "move these numbers to the README or the benchmark output:\n" + "\n".join(
        found)


def test_the_timing_pattern_catches_measured_figures():
    for text in ("(187 ms scanned)", "84 vs 155 us", "1.2 s against 0.8 s", "about 5x faster",
                 "took 3 seconds"):
        assert TIMING.search(text), text
    for text in ("[32, 32000] int32", "8 rows of 16 tokens", "a 2-core machine"):
        assert not TIMING.search(text), text
