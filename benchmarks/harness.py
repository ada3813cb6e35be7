"""Benchmark plumbing shared by every suite: timing, the copy-bandwidth ceiling, memory, results.

Timing: warm up first, then the median of repeated runs. On CUDA the runs are timed with events
(triton.testing.do_bench when Triton is present), on the CPU with perf_counter. Inputs are large
enough (tens of MB) that repeated runs do not measure the cache.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Callable

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- device


def device_slug(device: str) -> str:
    """A file-name-safe name for the machine, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-amd-epyc-9b14-2t'."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1]
                        break
        except OSError:
            pass
        name = f"cpu {name} {torch.get_num_threads()}t"
    name = re.sub(r"\((r|tm)\)|cpu @.*?ghz|processor", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def device_description(device: str) -> str:
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
    return f"{device_slug('cpu')}: {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def lmkern_backends(device: str) -> list[str]:
    """lmkern backends worth timing on ``device``: not the reference, not Triton's CPU interpreter
    (a test tool, not a backend to time)."""
    from lmkern import dispatch

    return [
        b for b in dispatch.BACKENDS
        if b != "reference" and dispatch.device_support(b, device) is None and (b != "triton" or device == "cuda")
    ]


# ----------------------------------------------------------------------------- timing


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 3, min_runs: int = 7, budget_s: float = 2.0) -> float:
    """Median milliseconds of ``fn()``."""
    if device == "cuda":
        try:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 200):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: str, nbytes: int = 256 * 2**20) -> float:
    """The measured ceiling for memory-bound kernels: a large tensor copy, bytes read + written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- memory


@contextmanager
def saved_tensor_bytes():
    """Counts the bytes autograd saves for backward inside the block (storage counted once):
    the memory a forward+backward holds beyond inputs and outputs, on any device."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except Exception:
            pass
        return t

    result = {"bytes": 0}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())


def peak_cuda_bytes(fn: Callable[[], object]) -> int | None:
    """Peak CUDA memory allocated while running ``fn`` beyond what was allocated before it."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ----------------------------------------------------------------------------- results


def environment(device: str) -> dict:
    import lmkern
    from lmkern import _ext

    return {
        "device": device_slug(device),
        "device_description": device_description(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "lmkern": lmkern.__version__,
        "build": _ext.build_info(),
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------- running a suite


def run_suite(suite, device: str, quick: bool = False, log=print, deadline: float | None = None) -> dict:
    """Runs one suite module: the copy-bandwidth ceiling, then ``suite.measurements`` (a generator
    of result rows, the sizes its targets name first), then ``suite.summarize``. With ``deadline``
    (a time.monotonic() value) no new measurement starts after it and the payload is marked
    partial: a GPU lease is short, and a cut run still keeps the rows it measured."""
    _tuned_configs(reset=True)  # a suite's results name the configs its own runs chose
    copy_gbps = copy_bandwidth_gbps(device)
    log(f"copy bandwidth on {device_slug(device)}: {copy_gbps:.1f} GB/s")
    rows = []
    measured = suite.measurements(device, quick, copy_gbps, log)
    for row in measured:
        rows.append(row)
        if deadline is not None and time.monotonic() > deadline:
            measured.close()
            log(f"time budget reached after {len(rows)} rows: the rest of this suite is not measured")
            payload = suite.summarize(device, rows, copy_gbps)
            payload["partial"] = f"stopped at the time budget after {len(rows)} rows"
            return _with_tuned_configs(payload)
    return _with_tuned_configs(suite.summarize(device, rows, copy_gbps))


def _tuned_configs(reset: bool = False) -> dict:
    """The launch configs the Triton autotuner measured and chose so far (GPU runs); reset:
    forget them first."""
    try:
        from lmkern.kernels import autotune
    except ImportError:  # no Triton
        return {}
    if reset:
        autotune.reset()
    return autotune.chosen()


def _with_tuned_configs(payload: dict) -> dict:
    """Adds the tuned configs to a suite's results, so a result says which tiles it ran with."""
    tuned = _tuned_configs()
    if tuned:
        payload["autotune"] = tuned
    return payload


def results_path(device: str) -> str:
    return os.path.join(RESULTS_DIR, f"{device_slug(device)}.json")


def save_suite(device: str, suite: str, payload: dict, out_dir: str | None = None) -> str:
    """Merges ``payload`` as ``suite`` into results/<device>.json (other suites are kept)."""
    path = results_path(device) if out_dir is None else os.path.join(out_dir, f"{device_slug(device)}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data.update(environment(device))
    data.setdefault("suites", {})[suite] = payload
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return path
