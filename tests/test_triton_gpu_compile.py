"""Every Triton kernel compiles for the GPUs lmkern targets, on a machine without one: the
interpreter that runs them in this suite never lowers them to PTX (see tests/triton_gpu_compile.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmkern import _ext

SCRIPT = Path(__file__).with_name("triton_gpu_compile.py")


@pytest.mark.skipif(not _ext.HAS_TRITON, reason=f"no Triton: {_ext.TRITON_ERROR}")
@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_cuda(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The checkout under test, as in this process: the script's own sys.path starts at tests/, so
    # it would otherwise import whichever lmkern is installed (another checkout's, say).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPT.parent.parent), env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, str(SCRIPT), str(arch)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"sm_{arch} compile failed:\n{done.stdout}\n{done.stderr[-6000:]}"
    compiled = [line for line in done.stdout.splitlines() if line.startswith(f"sm_{arch} ")]
    # every kernel, with every autotune candidate (sm_90 adds the forward's TMA tiles)
    assert len(compiled) == {80: 78, 90: 93}[arch] and all(": ok" in line for line in compiled), done.stdout
