"""The CUDA attention kernels' own code, run on the CPU, against the reference in float64.

tests/attention_cuda_algo.cpp compiles csrc/include/lmkern/attention_decode.cuh and
attention_prefill.cuh with g++, emulating the CUDA pieces they use (one std::thread per CUDA
thread, shared memory, barriers, warp shuffles, and ldmatrix / mma.sync / cp.async with the PTX
ISA's layouts), and runs them on small inputs. So the kernels' thread layouts, index math, masks,
split/combine and fragment layouts are checked here without a GPU; the real kernels are tested
through the ops by tests/test_attention_cuda.py on CUDA machines. Inputs are fresh random
tensors each run (tests/conftest.py seeds them).
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from attention_helpers import check_row_stats

from lmkern.reference import attention as ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler to build the host check")

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
INF = float("inf")


@pytest.fixture(scope="module")
def algo(tmp_path_factory):
    d = tmp_path_factory.mktemp("attention_algo")
    shim = d / "shim"
    shim.mkdir()
    for name in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h"):  # all defined by the program
        (shim / name).write_text("#pragma once\n")
    exe = str(d / "attention_cuda_algo")
    try:
        subprocess.run(
            [CXX, "-O2", "-std=c++20", "-pthread", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
             "-I", str(shim), "-I", os.path.join(ROOT, "csrc", "include"),
             os.path.join(ROOT, "tests", "attention_cuda_algo.cpp"), "-o", exe],
            check=True, capture_output=True, text=True,
        )
    except subprocess.CalledProcessError as e:
        if "barrier" in e.stderr and "No such file" in e.stderr:
            pytest.skip("the C++ compiler has no C++20 <barrier>")
        raise AssertionError(e.stderr) from e
    return exe


def run(exe, tmp_path, header, scale, arrays, n_out, n_lse, n_stats=0):
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(src, "wb") as f:
        np.array(header, dtype=np.int64).tofile(f)
        np.array([scale], dtype=np.float32).tofile(f)
        for a in arrays:
            a.tofile(f)
    subprocess.run([exe, str(src), str(dst)], check=True, timeout=600)
    raw = np.fromfile(dst, dtype=np.float32)
    assert raw.size == n_out + n_lse + n_stats
    parts = torch.from_numpy(raw.copy()).split([n_out, n_lse, n_stats])
    return parts if n_stats else parts[:2]


def f32(t):
    return t.float().contiguous().numpy()


def expand_kv(k, hq):
    return k.repeat_interleave(hq // k.shape[-3], dim=-3)


def core64(q, k, v, scale, allowed, bias=None):
    """float64 (out (Sq, Hq, D), lse (Hq, Sq)) of one sequence, q (Sq, Hq, D), k/v (Sk, Hkv, D)."""
    qt = q.double().transpose(0, 1)
    kt = expand_kv(k.double().transpose(0, 1), qt.shape[0])
    vt = expand_kv(v.double().transpose(0, 1), qt.shape[0])
    out, lse = ref.attention_core(qt, kt, vt, scale, allowed, None if bias is None else bias.double())
    return out.transpose(0, 1), lse


def check(out, lse, out64, lse64, dtype, what, p_rounded):
    """out was rounded to dtype; p_rounded: the forward rounds probabilities to dtype too."""
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse64)), f"{what}: lse -inf pattern"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    eps = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    tol = eps * (4 if p_rounded else 1)
    torch.testing.assert_close(out.double(), out64.to(dtype).double(), rtol=tol, atol=tol, msg=what)
    live = ~torch.isneginf(lse64)
    torch.testing.assert_close(lse.double()[live], lse64[live], rtol=1e-5, atol=1e-5, msg=what)


# ----------------------------------------------------------------------------- decode


def decode_case(exe, tmp_path, dtype, B, Sq, Hq, Hkv, D, Smax, lens, causal, splits):
    q = torch.randn(B, Sq, Hq, D).to(dtype)
    k = torch.randn(B, Smax, Hkv, D).to(dtype)
    v = torch.randn(B, Smax, Hkv, D).to(dtype)
    pos = torch.arange(Smax)[None, :, None, None]
    past = pos >= torch.tensor(lens).clamp(min=0, max=Smax)[:, None, None, None]
    k, v = k.masked_fill(past, float("nan")), v.masked_fill(past, float("nan"))  # never read
    scale = 1 / math.sqrt(D)
    header = [0, DTYPE_CODE[dtype], B, Sq, Hq, Hkv, D, Smax, int(causal), splits]
    out, lse = run(exe, tmp_path, header, scale,
                   [f32(q), f32(k), f32(v), np.array(lens, dtype=np.int32)],
                   B * Sq * Hq * D, B * Hq * Sq)
    out, lse = out.view(B, Sq, Hq, D), lse.view(B, Hq, Sq)
    outs, lses = [], []
    scale32 = float(np.float32(scale))
    for b in range(B):
        L = max(0, min(lens[b], Smax))
        allowed = torch.ones(Sq, L, dtype=torch.bool)
        if causal:
            allowed = torch.arange(L)[None, :] <= torch.arange(Sq)[:, None] + lens[b] - Sq
        o, l = core64(q[b], k[b, :L], v[b, :L], scale32, allowed)
        outs.append(o)
        lses.append(l)
    check(out, lse, torch.stack(outs), torch.stack(lses), dtype,
          f"decode {dtype} B={B} Sq={Sq} heads={Hq}/{Hkv} D={D} lens={lens} causal={causal} splits={splits}",
          p_rounded=False)


# Each kernel instantiation family once (fp32 with two vectors per thread, 1/4/8 rows per block,
# several row tiles, one split or several); the full sweep is marked slow (the emulation runs one
# OS thread per CUDA thread).
# ~3 minutes of emulation beyond the quick cases: opt-in, since the quick cases already run every
# kernel instantiation family and the GPU suite runs the real kernels over the full grid.
SWEEP = pytest.mark.skipif(
    os.environ.get("LMKERN_EMULATION_SWEEP") != "1",
    reason="full emulation sweep: set LMKERN_EMULATION_SWEEP=1 (the quick cases above cover each kernel family)",
)
DECODE_CASES = [  # dtype, D, (Hq, Hkv), Sq, causal, splits
    (torch.float32, 136, (8, 1), 2, False, 3),
    (torch.float16, 64, (4, 1), 1, True, 4),
    (torch.bfloat16, 80, (6, 2), 3, True, 1),
    (torch.float16, 8, (2, 2), 1, False, 1),
    (torch.bfloat16, 256, (2, 1), 5, True, 2),
]
LENS = [0, 70, 300, 1]  # Smax = 100; 300 > Smax reads all slots, its diagonal placed by 300


@pytest.mark.parametrize("dtype, D, heads, Sq, causal, splits", DECODE_CASES)
def test_decode(algo, tmp_path, dtype, D, heads, Sq, causal, splits):
    decode_case(algo, tmp_path, dtype, 4, Sq, heads[0], heads[1], D, 100, LENS, causal, splits)


@pytest.mark.slow
@SWEEP
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D, heads, Sq", [(8, (2, 2), 1), (64, (4, 1), 1), (80, (6, 2), 3), (136, (8, 1), 2),
                                          (256, (2, 1), 5), (32, (3, 3), 1)])
def test_decode_sweep(algo, tmp_path, dtype, D, heads, Sq):
    for causal, splits in ((True, 1), (False, 3), (True, 4)):
        decode_case(algo, tmp_path, dtype, 4, Sq, heads[0], heads[1], D, 100, LENS, causal, splits)


# ----------------------------------------------------------------------------- forward


def forward_case(exe, tmp_path, dtype, D, Hq, Hkv, seqs_q, seqs_k, packed, causal, top_left,
                 used=None, bias_mode=None, max_q=None, nan_query=None):
    """nan_query: (batch, row, head) of a dense query that holds a NaN: its output row and lse
    are NaN, as the reference's (a NaN in q must not read as "no key": zeros)."""
    B = len(seqs_q)
    scale = 1 / math.sqrt(D)
    scale32 = float(np.float32(scale))
    if packed:
        Sq, Sk = sum(seqs_q) + 2, sum(seqs_k)  # 2 packed rows outside every sequence
        q = torch.randn(Sq, Hq, D).to(dtype)
        k, v = (torch.randn(Sk, Hkv, D).to(dtype) for _ in range(2))
        cu_q = np.array([0, *itertools.accumulate(seqs_q)], dtype=np.int32)
        cu_k = np.array([0, *itertools.accumulate(seqs_k)], dtype=np.int32)
    else:
        Sq, Sk = seqs_q[0], seqs_k[0]
        q = torch.randn(B, Sq, Hq, D).to(dtype)
        k, v = (torch.randn(B, Sk, Hkv, D).to(dtype) for _ in range(2))
        if nan_query is not None:
            q[nan_query][3] = float("nan")
    bias_base, strides, bias = np.zeros(0, dtype=np.float32), [0, 0, 0, 0], None
    if bias_mode == "full":
        base = torch.randn(B * Hq * Sq * Sk)
        base[::7] = -INF
        strides = [Hq * Sq * Sk, Sq * Sk, Sk, 1]
    elif bias_mode == "float32_min_rows":  # Hugging Face's masking value: rows of only it attend uniformly
        base = torch.randn(B, Hq, Sq, Sk)
        base[:, :, :3] = torch.finfo(torch.float32).min
        base[:, :, 3, ::2] = torch.finfo(torch.float32).min
        base = base.flatten()
        strides = [Hq * Sq * Sk, Sq * Sk, Sk, 1]
    elif bias_mode == "broadcast_transposed":  # (1, 1, Sq, Sk) from a (Sk, Sq) buffer
        base = torch.randn(Sk * Sq)
        strides = [0, 0, 1, Sq]
    if bias_mode is not None:
        bias = base.as_strided((B, Hq, Sq, Sk), strides)
        bias_base = base.numpy().astype(np.float32)
    header = [1, DTYPE_CODE[dtype], B, Hq, Hkv, D, Sq, Sk, int(packed), int(causal), int(top_left),
              max_q if max_q is not None else max(seqs_q), int(used is not None), bias_base.size, *strides]
    arrays = [f32(q), f32(k), f32(v)]
    if packed:
        arrays += [cu_q, cu_k]
    if used is not None:
        arrays.append(np.array(used, dtype=np.int32))
    arrays.append(bias_base)
    n_lse = Hq * Sq * (1 if packed else B)
    out, lse, stats = run(exe, tmp_path, header, scale, arrays, q.numel(), n_lse, 2 * n_lse)
    out = out.view(q.shape)
    lse = lse.view(Hq, Sq) if packed else lse.view(B, Hq, Sq)
    check_row_stats(lse, stats.view((2,) + lse.shape), base=2)
    out64 = torch.zeros(q.shape, dtype=torch.float64)
    lse64 = torch.full(lse.shape, -INF, dtype=torch.float64)
    for b in range(B):
        if packed:
            q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
            qb, kb, vb = q[q0:q1], k[k0:k1], v[k0:k1]
        else:
            qb, kb, vb = q[b], k[b], v[b]
        Sq_b, Sk_b = qb.shape[0], kb.shape[0]
        if used is not None:
            Sk_b = max(0, min(Sk_b, used[b]))
        allowed = torch.ones(Sq_b, Sk_b, dtype=torch.bool)
        if causal:
            off = 0 if top_left else Sk_b - Sq_b
            allowed = torch.arange(Sk_b)[None, :] <= torch.arange(Sq_b)[:, None] + off
        bb = None if bias is None else bias[b, :, :Sq_b, :Sk_b]
        o, l = core64(qb, kb[:Sk_b], vb[:Sk_b], scale32, allowed, bb)
        if packed:
            out64[q0:q1], lse64[:, q0:q1] = o, l
        else:
            out64[b], lse64[b] = o, l
    if bias_mode == "float32_min_rows":
        # the kernels score in log2 units, where float32's min does not fit: those rows' lse is
        # about -2.3e38 (the floor) instead of -3.4e38; both mean "far below any real score"
        assert (lse[:, :, :3] < -2.2e38).all() and (lse[:, :, :3] > -2.4e38).all()
        lse64[:, :, :3] = lse[:, :, :3].double()
    if nan_query is not None:
        assert torch.equal(out.isnan(), out64.isnan()) and torch.equal(lse.isnan(), lse64.isnan())
        assert out[nan_query].isnan().all() and lse.isnan().sum() == 1
        out, out64 = out.nan_to_num(), out64.nan_to_num()
        lse, lse64 = lse.nan_to_num(nan=0.0, neginf=-INF), lse64.nan_to_num(nan=0.0, neginf=-INF)
    check(out, lse, out64, lse64, dtype,
          f"forward {dtype} D={D} heads={Hq}/{Hkv} q={seqs_q} k={seqs_k} packed={packed} "
          f"causal={causal}/{top_left} used={used} bias={bias_mode}", p_rounded=True)


FORWARD_SHAPES = [((70, 70), (True, False)), ((20, 90), (True, False)), ((90, 20), (True, True)),
                  ((33, 65), (False, False))]  # (Sq, Sk), (causal, causal_top_left)
FORWARD_CASES = [  # dtype, D, shape index
    (torch.float16, 64, 0),
    (torch.bfloat16, 128, 1),
    (torch.float16, 80, 2),
    (torch.bfloat16, 256, 3),
]


@pytest.mark.parametrize("dtype, D, shape", FORWARD_CASES)
def test_forward_dense(algo, tmp_path, dtype, D, shape):
    (Sq, Sk), (causal, top_left) = FORWARD_SHAPES[shape]
    forward_case(algo, tmp_path, dtype, D, 2, 1, [Sq, Sq], [Sk, Sk], False, causal, top_left)


def test_forward_nan_query(algo, tmp_path):
    forward_case(algo, tmp_path, torch.float16, 64, 2, 1, [20, 20], [30, 30], False, True, False, nan_query=(1, 15, 0))


@pytest.mark.slow
@SWEEP
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 64, 80, 96, 128, 160, 192, 256])
def test_forward_dense_sweep(algo, tmp_path, dtype, D):
    for (Sq, Sk), (causal, top_left) in FORWARD_SHAPES:
        forward_case(algo, tmp_path, dtype, D, 2, 1, [Sq, Sq], [Sk, Sk], False, causal, top_left)


def test_forward_bias_seqused(algo, tmp_path):
    forward_case(algo, tmp_path, torch.float16, 64, 2, 2, [40, 40], [75, 75], False, True, True,
                 used=[75, 9], bias_mode="full")
    forward_case(algo, tmp_path, torch.bfloat16, 32, 2, 1, [40, 40], [75, 75], False, True, False,
                 bias_mode="broadcast_transposed")
    forward_case(algo, tmp_path, torch.float16, 64, 2, 1, [40, 40], [75, 75], False, False, False,
                 bias_mode="float32_min_rows")


@pytest.mark.parametrize("dtype, causal, top_left", [(torch.bfloat16, True, False), (torch.float16, False, False),
                                                     (torch.float16, True, True)])
def test_forward_varlen(algo, tmp_path, dtype, causal, top_left):
    seqs_q, seqs_k = [17, 0, 70, 1], [17, 5, 90, 0]
    if causal and not top_left:
        # a too-small max_seqlen_q (blocks stride over the row blocks) and seqused_k
        forward_case(algo, tmp_path, dtype, 64, 2, 1, seqs_q, seqs_k, True, causal, top_left,
                     used=[3, 5, 200, 0], max_q=1)
    else:
        forward_case(algo, tmp_path, dtype, 64, 2, 1, seqs_q, seqs_k, True, causal, top_left)
