"""Runs the Triton kernel equality tests in a subprocess started with TRITON_INTERPRET=1.

``triton.language`` decorates its own helpers once, at import, in whichever mode the variable selects, so
the interpreter cannot be switched on inside a test process that has already imported triton (and must not
leak into GPU tests that need compiled kernels). A fresh interpreter process is the one robust way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.gpu_worker.kernels.selection import BACKEND_ENV, INTERPRET_ENV, interpreter_enabled

REPO_ROOT = Path(__file__).resolve().parents[2]
INTERPRETED_MODULES = (
    "tests/unit/test_kernels_attention.py",
    "tests/unit/test_kernels_norm.py",
    "tests/unit/test_kernels_rope.py",
    "tests/unit/test_kernels_pack.py",
)
SUBPROCESS_TIMEOUT_S = 240


@pytest.mark.skipif(interpreter_enabled(), reason="this process already interprets; the modules run in-process")
def test_every_triton_kernel_equals_its_torch_reference_under_the_interpreter() -> None:
    env = {**os.environ, INTERPRET_ENV: "1"}
    env.pop(BACKEND_ENV, None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", *INTERPRETED_MODULES]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
    )
    report = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, f"interpreted kernel tests failed (rc={result.returncode}):\n{report}"
    assert " passed" in result.stdout and "skipped" not in result.stdout, report
