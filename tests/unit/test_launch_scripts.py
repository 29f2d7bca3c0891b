"""launch/*.sh pick the interpreter: $PYTHON, else the active one when it imports the framework (a conda or
system install), else the checkout's .venv."""

import os
import subprocess
import sys

from tests.helpers import REPO

VENV_PYTHON = os.path.join(REPO, ".venv", "bin", "python")


def chosen_python(tmp_path, target: str, **extra) -> str:
    """The PYTHON that launch/common.sh picks when the first `python` on PATH runs ``target``."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "python"
    wrapper.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    wrapper.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PATH=f"{bindir}:/usr/bin:/bin", NPROC="1", **extra)
    proc = subprocess.run(["bash", "-c", f'source {REPO}/launch/common.sh train && echo "$PYTHON"'],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_active_interpreter_that_imports_the_framework_is_preferred(tmp_path):
    # an "installed" environment: any interpreter on PATH with torch, hydra and deepspeed (here the venv's, behind
    # a wrapper outside the checkout)
    assert chosen_python(tmp_path, sys.executable) == str(tmp_path / "bin" / "python")


def test_active_interpreter_without_the_framework_falls_back_to_the_venv(tmp_path):
    assert chosen_python(tmp_path, "/bin/false") == VENV_PYTHON
    assert chosen_python(tmp_path, "/bin/false", PYTHON="/some/python") == "/some/python"
