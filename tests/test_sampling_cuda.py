"""CUDA kernel specifics of lmkern::sample / lmkern::softmax that the backend-generic tests do not
reach: row starts and strides that break 16-byte alignment, the split-over-blocks path for few
long rows (and its agreement with one block per row), determinism, CUDA graph capture.

Runs only where lmkern._C has the CUDA kernels and a GPU is present (the CPU-side check of the
same algorithm is tests/test_sampling_cuda_algo.py).
"""

from __future__ import annotations

import pytest
import torch

from lmkern import _ext
from lmkern.reference import sampling as ref

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.HAS_CUDA_EXT),
    reason="needs a GPU and lmkern._C built with CUDA",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def op_sample(logits, T, k, p, m, seed=0, seeds=None):
    return torch.ops.lmkern.sample(logits, 1.0, 0, 1.0, 0.0, T, k, p, m, seed, seeds, True)


def random_rows(B, V, dtype, gen_seed):
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    x = torch.randn(B, V, device="cuda", generator=g) * 3
    return x.to(dtype)


def random_params(B, V, gen_seed):
    g = torch.Generator().manual_seed(gen_seed)
    T = torch.tensor([0.0, 0.7, 1.0, 1.5])[torch.randint(0, 4, (B,), generator=g)]
    k = torch.tensor([0, 1, 20, 1000, V - 1, V])[torch.randint(0, 6, (B,), generator=g)]
    p = torch.tensor([1.0, 0.95, 0.7, 0.2])[torch.randint(0, 4, (B,), generator=g)]
    m = torch.tensor([0.0, 0.0, 0.05])[torch.randint(0, 3, (B,), generator=g)]
    return T.cuda(), k.cuda(), p.cuda(), m.cuda()


def assert_matches_reference(logits, T, k, p, m, ids, lps, seed=None, seeds=None):
    B = logits.shape[0]
    if seeds is None:
        rid, rlp = ref.sample(logits, temperatures=T, top_ks=k, top_ps=p, min_ps=m, seed=seed)
    else:
        rid, rlp = ref.sample(logits, temperatures=T, top_ks=k, top_ps=p, min_ps=m, seeds=seeds)
    differ = int((ids != rid).sum())
    assert differ <= max(1, B // 1000), f"{differ} of {B} ids differ from the reference's"
    x = logits.float()
    greedy = T == 0
    z = x / torch.where(greedy, torch.ones_like(T), T)[:, None]
    keep = ref.survivors(z, k, torch.where(p < 1, (p + 1e-4).clamp(max=1), p), m * (1 - 1e-4))
    rows = torch.nonzero(~greedy).flatten()
    assert keep[rows, ids[rows]].all(), "a drawn id is not among the reference's survivors"
    torch.testing.assert_close(lps, torch.log_softmax(x, -1).gather(1, ids[:, None]).squeeze(1),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset,extra", [(0, 0), (1, 0), (3, 13), (5, 1)])
def test_unaligned_rows_give_the_contiguous_result(dtype, offset, extra):
    """Row starts off 16-byte boundaries and odd row strides read the same elements: the ids are
    identical to those of a contiguous copy, and agree with the reference."""
    B, V = 64, 4099
    base = random_rows(B, V + offset + extra, dtype, 11)
    view = base[:, offset : offset + V]
    T, k, p, m = random_params(B, V, 12)
    ids, lps = op_sample(view, T, k, p, m, seed=5)
    ids_c, lps_c = op_sample(view.contiguous(), T, k, p, m, seed=5)
    assert torch.equal(ids, ids_c)
    torch.testing.assert_close(lps, lps_c, rtol=1e-6, atol=1e-6)
    assert_matches_reference(view, T, k, p, m, ids, lps, seed=5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [65536, 131072 + 7, 262144])
def test_split_rows_match_one_block_rows(dtype, V):
    """Few long rows take the split path (2 * B <= SMs); the same rows among many (one block per
    row) give the same ids: per-row seeds make the draw independent of the batch position."""
    B = 3
    x = random_rows(B, V, dtype, 21)
    T, k, p, m = random_params(B, V, 22)
    T = T.clamp(min=0.5)  # sampled rows, not greedy ones
    seeds = torch.tensor([1, -2, 2**40 + 3], device="cuda", dtype=torch.int64)
    ids, lps = op_sample(x, T, k, p, m, seeds=seeds)
    assert_matches_reference(x, T, k, p, m, ids, lps, seeds=seeds)
    reps = 2 * torch.cuda.get_device_properties(0).multi_processor_count // B + 1
    big = x.repeat(reps, 1)
    ids_big, _ = op_sample(big, T.repeat(reps), k.repeat(reps), p.repeat(reps), m.repeat(reps),
                           seeds=seeds.repeat(reps))
    assert torch.equal(ids_big.view(reps, B), ids.expand(reps, B))


def test_deterministic():
    B, V = 8, 50000
    x = random_rows(B, V, torch.bfloat16, 31)
    T, k, p, m = random_params(B, V, 32)
    a = op_sample(x, T, k, p, m, seed=9)
    b = op_sample(x, T, k, p, m, seed=9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_invalid_and_greedy_rows():
    V = 70000
    x = torch.randn(4, V, device="cuda")
    x[0, 17] = float("nan")
    x[1, 5] = float("inf")
    x[2] = float("-inf")
    x[3, [100, 200]] = 40.0
    T = torch.tensor([1.0, 1.0, 1.0, 0.0], device="cuda")
    zeros = torch.zeros(4, device="cuda")
    ids, lps = op_sample(x, T, torch.zeros(4, dtype=torch.int64, device="cuda"), zeros + 1, zeros)
    assert ids.tolist() == [-1, -1, -1, 100]
    assert torch.isnan(lps[:3]).all() and torch.isfinite(lps[3])


def test_cuda_graph_capture():
    """The op (including the split path's cooperative launch and workspace) replays in a graph."""
    B, V = 2, 131072
    x = random_rows(B, V, torch.float32, 41)
    T = torch.full((B,), 0.8, device="cuda")
    k = torch.tensor([0, 50], device="cuda")
    p = torch.tensor([0.9, 1.0], device="cuda")
    m = torch.zeros(B, device="cuda")
    eager = op_sample(x, T, k, p, m, seed=3)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        op_sample(x, T, k, p, m, seed=3)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = op_sample(x, T, k, p, m, seed=3)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,offset", [(1, 0), (7, 1), (1000, 3), (50257, 1), (131072, 0)])
def test_softmax_matches_torch(dtype, V, offset):
    B = 5
    base = random_rows(B, V + offset, dtype, 51)
    x = base[:, offset:]
    T = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0], device="cuda")
    x[4, 0] = float("nan")
    probs = torch.ops.lmkern.softmax(x, 1.0, T)
    expect = ref.softmax(x, temperatures=T)
    assert probs.dtype == torch.float32 and probs.shape == (B, V)
    torch.testing.assert_close(probs, expect, rtol=1e-5, atol=1e-6, equal_nan=True)
