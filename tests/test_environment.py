"""The installation under test has the backends it is supposed to have.

`make test` sets LMKERN_REQUIRE_BACKENDS (cpu, triton in the interpreter, reference on a CPU
machine; cuda too on a GPU machine) so that a failed build or a missing Triton fails here
instead of silently shrinking the backend-parametrized tests.
"""

import os
import subprocess
import sys

import pytest
import torch

import lmkern
from lmkern import _ext, dispatch

REQUIRED = [b for b in os.environ.get("LMKERN_REQUIRE_BACKENDS", "").split(",") if b]


@pytest.mark.parametrize("backend", REQUIRED or ["reference"])
def test_required_backend_present(backend):
    device = "cuda" if backend == "cuda" else ("cuda" if torch.cuda.is_available() and backend == "triton" else "cpu")
    assert dispatch.device_support(backend, device) is None, dispatch.device_support(backend, device)


def test_import_does_not_initialize_cuda():
    code = "import torch, lmkern; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_info_lists_every_backend_and_reason():
    text = lmkern.info()
    for name in dispatch.BACKENDS:
        assert name in text
    for op in ("layer_norm", "rms_norm"):
        assert op in text
    out = subprocess.run([sys.executable, "-m", "lmkern", "info", "--json"], capture_output=True, text=True, check=True)
    assert '"matrix"' in out.stdout and '"build"' in out.stdout


def test_build_info_consistent():
    info = _ext.build_info()
    assert info["cpp_extension"] == _ext.HAS_CPP
    if _ext.HAS_CPP:
        assert info["cpp_built_for_torch"] == torch.__version__.split("+")[0]
