"""The code's shape: the import layers of pyproject.toml's [tool.importlinter] hold (and the contract bites), and no
function under framework/ is longer than 80 lines.

The layers, top imports bottom only (lazy imports inside functions count): entry points > framework.evaluation >
trainer | infer > compress > checkpoint, data, parallel, plan > weights > config, models, kernels > cli, with no
import cycles between packages or between the modules of one package.
"""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
LINT_IMPORTS = pathlib.Path(sys.executable).with_name("lint-imports")
MAX_FUNCTION_LINES = 80


def lint_imports(cwd: pathlib.Path) -> subprocess.CompletedProcess:
    """lint-imports over the ``framework`` package found first from ``cwd`` (its own copy there, if it has one),
    with ``cwd``'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_import_layers_hold():
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} is missing: pip install -e '.[dev]' (it brings import-linter)"
    proc = lint_imports(REPO)
    assert proc.returncode == 0, f"lint-imports found imports that break the layers:\n{proc.stdout}\n{proc.stderr}"


def test_an_upward_import_and_a_cycle_break_the_contracts(tmp_path):
    """The contracts bite: a copy of the package where a bottom module imports the engine, and data and checkpoint
    import each other, fails lint-imports, naming both."""
    shutil.copytree(REPO / "framework", tmp_path / "framework", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "framework" / "models" / "upward_probe.py").write_text("import framework.infer.engine\n")
    (tmp_path / "framework" / "data" / "cycle_probe.py").write_text("import framework.checkpoint.cycle_probe\n")
    (tmp_path / "framework" / "checkpoint" / "cycle_probe.py").write_text("import framework.data.cycle_probe\n")
    proc = lint_imports(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "framework.models is not allowed to import framework.infer" in out, out
    assert "framework.models.upward_probe -> framework.infer.engine" in out, out
    assert ".data -> .checkpoint" in out or ".checkpoint -> .data" in out, out


def long_functions(root: pathlib.Path, limit: int) -> list[str]:
    """``path:line name (n lines)`` of every function (def line to last line, nested ones on their own too) longer
    than ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_is_over_80_lines():
    offenders = long_functions(REPO / "framework", MAX_FUNCTION_LINES)
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n" + "\n".join(
        offenders)
