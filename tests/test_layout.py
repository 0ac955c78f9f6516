"""The shape of the codebase: modules under 300 lines, functions under 60, one way in for each job."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "llm_jax").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")])
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 300, 60


def test_no_module_over_300_lines():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_no_function_over_60_lines():
    """From `def` (decorators excluded) to the function's last line, docstring included; nested functions
    count inside their parent and on their own."""
    long = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert not long, long


def test_the_kind_of_run_is_tested_only_inside_the_tasks():
    """Which algorithm runs is the Task's business: nothing else reads a task name to branch on it."""
    outside = [p for p in (ROOT / "llm_jax").rglob("*.py") if "tasks" not in p.relative_to(ROOT).parts]
    pattern = re.compile(r"data\.format\b|model\.head\b|\.task\s*[!=]=|[!=]=\s*[\"'](pretrain|sft)[\"']")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in outside for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert not hits, hits
