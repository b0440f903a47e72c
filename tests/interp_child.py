"""Run a test file's ``interp`` tests in a child pytest with TRITON_INTERPRET=1 set from the
start (triton wraps its builtins at import, so the variable cannot be turned on later)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def run_interp_tests_in_child(test_file: str, expected_min: int) -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    from helix_compiler.kernels.triton_attention import interpreting

    if interpreting():
        pytest.skip("the interpreter is active in this process: the interp tests ran here")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("HELIX_ATTENTION_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test_file, "-k", "interp"],
        cwd=root, env=env, capture_output=True, text=True, timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"interpreter tests failed in the child:\n{out[-6000:]}"
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= expected_min, f"too few interpreter tests ran:\n{out[-3000:]}"
    assert "skipped" not in out, f"interpreter tests were skipped in the child:\n{out[-3000:]}"
