"""Shared fixtures: devices and backends present in this installation, and a fresh seed per run.

Backends are parametrized from what the installation can run, so a GPU machine runs the same
tests on cuda/triton. A backend that should be present but is not is caught by
tests/test_environment.py (LMKERN_REQUIRE_BACKENDS), not silently skipped.
"""

import atexit
import os
import random
import shutil
import tempfile
import zlib

# torch.compile's on-disk caches do not see a change in a custom op's schema or autograd (a
# known torch limit, pytorch#144344): a run after such a change would replay the old graphs.
# Each run compiles into a fresh directory, as on a fresh machine (set before lmkern's import,
# which sets torch's default; pytest-xdist's workers inherit the directory and share it).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmkern-tests-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

import lmkern  # noqa: F401, E402  (registers the ops)
from lmkern import dispatch  # noqa: E402

# The Triton launchers' config tuning (lmkern/kernels/autotune.py) would time every candidate tile
# for each new shape the suite uses, on a GPU: the suite tests the default tiles, every candidate
# tile explicitly (tests/test_attention_triton.py) and the tuner itself (tests/test_autotune.py).
os.environ.setdefault("LMKERN_AUTOTUNE", "0")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# A fresh seed each run (fresh random inputs), printed in the header so any failure reproduces
# with LMKERN_TEST_SEED=<seed>.
SEED = int(os.environ.get("LMKERN_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"lmkern test seed: LMKERN_TEST_SEED={SEED}; devices: {DEVICES}; " + ", ".join(
        f"{d}: {backends_on(d)}" for d in DEVICES
    )


def backends_on(device: str) -> list[str]:
    """Backends this installation can run on tensors of ``device``."""
    return [b for b in dispatch.BACKENDS if dispatch.device_support(b, device) is None]


DEVICE_BACKENDS = [(d, b) for d in DEVICES for b in backends_on(d)]


@pytest.fixture(params=DEVICE_BACKENDS, ids=[f"{d}-{b}" for d, b in DEVICE_BACKENDS])
def device_backend(request):
    return request.param


KERNEL_DEVICE_BACKENDS = [(d, b) for d, b in DEVICE_BACKENDS if b != "reference"]


@pytest.fixture(params=KERNEL_DEVICE_BACKENDS, ids=[f"{d}-{b}" for d, b in KERNEL_DEVICE_BACKENDS])
def kernel_device_backend(request):
    """Like device_backend, without the pure-PyTorch reference."""
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # Different tests draw different inputs, each reproducible from the session seed.
    torch.manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))
    yield
