"""lmkern.sample / lmkern.softmax on every backend against an independent float64 oracle and the
reference: filters, per-row parameters, greedy rows, dtypes, strides, odd sizes, seeds, invalid
rows, the custom ops (opcheck, torch.compile) and the softmax gradient."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch
from helpers import assert_close_2x
from sampling_helpers import U64, allowed_mismatches, as_int64, check_against_oracle, oracle

import lmkern
from lmkern import _ext, dispatch
from lmkern.ops import sampling as sampling_ops
from lmkern.reference import sampling as reference

CONFIGS = {
    "plain": dict(),
    "cold": dict(temperature=0.7),
    "hot-top_p": dict(temperature=2.0, top_p=0.5),
    "top_k": dict(top_k=5),
    "top_k1": dict(top_k=1),
    "top_p": dict(top_p=0.8),
    "min_p": dict(min_p=0.1),
    "all": dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05),
}


def _bf16_on_interpreter(device, backend, dtype):
    return backend == "triton" and device == "cpu" and dtype == torch.bfloat16


def _logits(B, V, device, dtype=torch.float32, scale=3.0):
    return (torch.randn(B, V) * scale).to(device=device, dtype=dtype)


def _check(ids, logprobs, x, what, **cfg):
    want = oracle(x, **cfg)
    bad = check_against_oracle(ids, logprobs, want, what)
    assert bad <= allowed_mismatches(ids.shape[0]), f"{what}: {bad} of {ids.shape[0]} ids differ from the oracle"
    return want


# ----------------------------------------------------------------------------- agreement


def test_philox_matches_the_published_answer():
    # Random123's known-answer test for Philox4x32-10: key 0, counter 0 -> first word 0x6627e8d5.
    z = torch.zeros(1, dtype=torch.int64)
    assert reference.philox_first_word(z, z, z).item() == 0x6627E8D5
    u = reference.uniform_open01(torch.tensor([0, 2**32 - 1]))
    assert 0 < u[0].item() < u[1].item() < 1


@pytest.mark.parametrize("V", [1, 3, 97, 1025])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_oracle_and_reference(device_backend, config, V):
    device, backend = device_backend
    B = 1000 if V <= 97 else 256
    cfg = CONFIGS[config]
    x = _logits(B, V, device)
    seed = random.getrandbits(64)
    ids, logprobs = lmkern.sample(x, **cfg, seed=seed, return_logprobs=True, backend=backend)
    assert ids.device == x.device and logprobs.device == x.device
    _check(ids, logprobs, x, f"{backend} {config} V={V}", **cfg, seed=seed)
    ref = lmkern.sample(x, **cfg, seed=seed, backend="reference")
    assert int((ids != ref).sum()) <= allowed_mismatches(B)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("V", [1, 3, 97, 1025, 50257])
def test_dtypes_and_odd_sizes(device_backend, dtype, V):
    device, backend = device_backend
    if _bf16_on_interpreter(device, backend, dtype):
        # the dispatcher declines (Triton's interpreter is wrong for bf16) and says why
        with pytest.raises(dispatch.BackendError, match="bfloat16"):
            lmkern.sample(_logits(2, V, device, dtype), backend=backend)
        return
    B = 8 if V == 50257 else 300
    x = _logits(B, V, device, dtype)
    cfg = dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01)
    for c in (cfg, dict()):
        ids, logprobs = lmkern.sample(x, **c, seed=11, return_logprobs=True, backend=backend)
        _check(ids, logprobs, x, f"{backend} {dtype} V={V}", **c, seed=11)
    greedy = lmkern.sample(x, 0.0, backend=backend)
    torch.testing.assert_close(greedy, x.float().argmax(-1), rtol=0, atol=0)


def test_per_row_parameters_mixing_disabled_and_greedy_rows(device_backend):
    device, backend = device_backend
    B, V = 400, 97
    x = _logits(B, V, device)
    pick = lambda values, dtype: torch.tensor(values, dtype=dtype)[torch.randint(len(values), (B,))]
    T = pick([0.0, 0.5, 1.0, 2.0], torch.float32)
    k = pick([0, 1, 5, 96, 97, 500], torch.int64)
    p = pick([1.0, 0.5, 0.9], torch.float32)
    m = pick([0.0, 0.1, 1.0], torch.float32)
    seeds = torch.randint(-(2**63), 2**63 - 1, (B,), dtype=torch.int64)
    ids, logprobs = lmkern.sample(x, T, k, p, m, seed=seeds, return_logprobs=True, backend=backend)
    _check(ids, logprobs, x, f"{backend} per-row", temperature=T, top_k=k, top_p=p, min_p=m, seeds=seeds)
    greedy = (T == 0).to(device)
    assert torch.equal(ids[greedy], x.argmax(-1)[greedy])
    only_max = ((m == 1.0) | (k == 1)).to(device)  # min_p 1 / top_k 1 leave the most likely token
    assert torch.equal(ids[only_max], x.argmax(-1)[only_max])
    # per-row tensors holding one value equal the scalar; an int8 top_k tensor and CPU tensors for
    # device logits are converted
    a = lmkern.sample(x, torch.full((B,), 0.7), torch.full((B,), 5, dtype=torch.int8), seed=5, backend=backend)
    b = lmkern.sample(x, 0.7, 5, seed=5, backend=backend)
    assert torch.equal(a, b)
    c = lmkern.sample(x, torch.tensor(0.7, dtype=torch.float64), top_k=torch.tensor(5), seed=5, backend=backend)
    assert torch.equal(c, b)


def test_greedy_takes_the_first_maximum(device_backend):
    device, backend = device_backend
    x = torch.zeros(4, 10, device=device)
    x[0, [2, 7]] = 1.0
    x[1] = float("-inf")
    x[1, [4, 9]] = 3.0
    x[3, :] = 5.0
    ids = lmkern.sample(x, temperature=0.0, top_k=3, top_p=0.5, backend=backend)
    assert ids.tolist() == [2, 4, 0, 0]
    ids = lmkern.sample(x, temperature=torch.tensor([0.0, 0.0, 1.0, 0.0]), seed=3, backend=backend)
    assert ids[[0, 1, 3]].tolist() == [2, 4, 0]


def test_top_k_of_v_or_more_is_no_filter(device_backend):
    device, backend = device_backend
    x = _logits(200, 33, device, scale=1.0)
    base = lmkern.sample(x, seed=9, backend=backend)
    for k in (33, 34, 10**6, 2**63 - 1, 2**63, 2**70, 0):  # beyond int64 too: still no filter
        assert torch.equal(lmkern.sample(x, top_k=k, seed=9, backend=backend), base)
    assert torch.equal(lmkern.sample(x, top_p=1.0, min_p=0.0, seed=9, backend=backend), base)


def test_ties_at_the_kth_value_are_all_kept(device_backend):
    device, backend = device_backend
    B = 2000
    x = torch.tensor([5.0, 4.0, 4.0, 4.0, 0.0, -1.0], device=device).expand(B, 6)
    ids = lmkern.sample(x, top_k=2, seed=torch.arange(B), backend=backend)
    counts = torch.bincount(ids.cpu(), minlength=6)
    assert counts[4:].sum() == 0 and (counts[1:4] > 0).all(), counts.tolist()


def test_ties_at_the_kth_value_are_kept_when_z_is_subnormal(device_backend):
    # T = 1e37 puts z = x / T among float32's subnormals, whose steps are absolute (2^-149), so
    # many logits that differ share one z: the tie at the k-th z is all of them, as in the
    # float64 sort; a relative bound on raw logits alone would drop some (the CPU's fast path did)
    device, backend = device_backend
    V, B, T = 2000, 300, 1e37
    x = 1e-3 + (torch.randperm(V) % 9).float() * 3e-8
    z = x / T
    tied = (z >= torch.sort(z, descending=True).values[0]).nonzero().flatten()
    assert 100 < len(tied) < V  # the case this test is about: a large tie, not everything
    ids = lmkern.sample(x.to(device).expand(B, V), temperature=T, top_k=1, seed=torch.arange(B), backend=backend).cpu()
    assert torch.isin(ids, tied).all()
    assert len(set(ids.tolist())) > B // 2  # drawn uniformly over ~220 tied tokens: most draws differ


def test_minus_inf_logits_are_never_drawn(device_backend):
    device, backend = device_backend
    B, V = 500, 64
    x = torch.randn(B, V)
    masked = torch.rand(B, V) < 0.8
    masked[torch.arange(B), torch.randint(V, (B,))] = False
    x = x.masked_fill(masked, float("-inf")).to(device)
    for cfg in (dict(temperature=50.0), dict(temperature=50.0, top_k=60, top_p=0.99), dict(temperature=0.0)):
        ids, logprobs = lmkern.sample(x, **cfg, seed=1, return_logprobs=True, backend=backend)
        assert not masked.gather(1, ids.cpu()[:, None]).any(), cfg
        assert torch.isfinite(logprobs).all()
    one = torch.full((3, 7), float("-inf"), device=device)
    one[:, 5] = -1e30
    assert lmkern.sample(one, seed=4, backend=backend).tolist() == [5, 5, 5]


def _overflow_rows(V, device):
    """(x, T, degenerate): rows whose largest logit over T overflows float32 (the limit T -> 0,
    reached numerically: the first argmax), beside rows that come close and do not."""
    x = torch.randn(6, V) * 3
    x[:, V // 3] = 20.0  # a clear argmax
    x[1] = x[1] - 1e30  # every logit hugely negative: every x / T is -inf
    x[2, ::2] = float("-inf")
    x[2, V // 3 + 1] = 20.0  # a tie at the max: the first index wins
    x[3, V // 3] = 19.0  # the max moves to a tie of 20s below:
    x[3, [V - 1, V // 2]] = 20.0  # the first of them
    T = torch.tensor([1e-38, 1e-10, 1e-38, 1e-38, 1e-37, 2.0])  # row 4: 20 / 1e-37 = 2e38 fits
    return x.to(device), T.to(device), torch.tensor([True, True, True, True, False, False], device=device)


@pytest.mark.parametrize("config", ["plain", "top_k", "top_p", "min_p", "all"])
def test_overflowing_temperature_takes_the_first_argmax(device_backend, config):
    # Before, x / T overflowed to +inf for every token near the max (or -inf for all), so the draw
    # fell on the first such token, and softmax gave a NaN row.
    device, backend = device_backend
    cfg = {k: v for k, v in CONFIGS[config].items() if k != "temperature"}
    x, T, degenerate = _overflow_rows(257, device)
    first_argmax = x.argmax(-1)
    for temperature in (T, 1e-38):
        rows = degenerate if isinstance(temperature, torch.Tensor) else torch.ones_like(degenerate)  # |max| > 3.4
        ids, logprobs = lmkern.sample(x, temperature, **cfg, seed=11, return_logprobs=True, backend=backend)
        assert torch.equal(ids[rows], first_argmax[rows]), (ids.tolist(), first_argmax.tolist())
        torch.testing.assert_close(logprobs, torch.log_softmax(x, -1).gather(1, ids[:, None])[:, 0])
        want = lmkern.sample(x, temperature, **cfg, seed=11, backend="reference")
        assert torch.equal(ids, want)
        probs = lmkern.softmax(x, temperature, backend=backend)
        onehot = torch.nn.functional.one_hot(first_argmax, x.shape[-1]).float()
        assert torch.equal(probs[rows], onehot[rows])
        torch.testing.assert_close(probs, lmkern.softmax(x, temperature, backend="reference"), rtol=1e-5, atol=1e-7)
    # one-hot rows have zero gradient, also with respect to a tiny temperature (no 0 / 0)
    xg, Tg = x.clone().requires_grad_(), T.clone().requires_grad_()
    probs = lmkern.softmax(xg, Tg, backend=backend)
    probs.backward(torch.randn_like(probs))
    assert torch.isfinite(xg.grad).all() and torch.isfinite(Tg.grad).all()
    assert (xg.grad[degenerate] == 0).all() and (Tg.grad[degenerate] == 0).all()
    # a NaN or +inf logit still makes an invalid row (ValueError) and a NaN softmax row
    x[0, 7], x[2, 9] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="logits row 0 contains NaN"):
        lmkern.sample(x, T, **cfg, backend=backend)
    probs = lmkern.softmax(x, T, backend=backend)
    assert probs[[0, 2]].isnan().all() and not probs[[1, 3, 4, 5]].isnan().any()


def test_strided_rows(device_backend):
    device, backend = device_backend
    B, V = 64, 97
    big = _logits(B, V + 29, device)
    x = big[:, 3 : 3 + V]  # row stride V + 29
    assert x.stride() == (V + 29, 1)
    cfg = dict(temperature=0.8, top_k=10, top_p=0.9)
    assert torch.equal(lmkern.sample(x, **cfg, seed=2, backend=backend), lmkern.sample(x.contiguous(), **cfg, seed=2, backend=backend))
    cols = big[:, ::2]  # element stride 2: copied
    assert torch.equal(lmkern.sample(cols, **cfg, seed=2, backend=backend), lmkern.sample(cols.contiguous(), **cfg, seed=2, backend=backend))
    row = _logits(1, V, device)
    expanded = row.expand(B, V)  # row stride 0
    seeds = torch.arange(B)
    ids, lp = lmkern.sample(expanded, **cfg, seed=seeds, return_logprobs=True, backend=backend)
    ids2, lp2 = lmkern.sample(expanded.contiguous(), **cfg, seed=seeds, return_logprobs=True, backend=backend)
    assert torch.equal(ids, ids2) and torch.equal(lp, lp2)


def test_one_dimensional_logits_give_scalars(device_backend):
    device, backend = device_backend
    x = _logits(1, 50, device)
    ids, lp = lmkern.sample(x[0], 0.9, top_k=10, seed=77, return_logprobs=True, backend=backend)
    assert ids.shape == () and lp.shape == () and ids.dtype == torch.int64
    ids2, lp2 = lmkern.sample(x, 0.9, top_k=10, seed=77, return_logprobs=True, backend=backend)
    assert ids.item() == ids2.item() and lp.item() == lp2.item()
    per_row = lmkern.sample(x[0], torch.tensor([0.9]), top_k=torch.tensor(10), seed=torch.tensor(77), backend=backend)
    assert per_row.item() == ids.item()  # a one-row seed tensor has stream 0, as row 0 of an int seed


def test_empty_batch(device_backend):
    device, backend = device_backend
    x = torch.randn(0, 10, device=device)
    ids = lmkern.sample(x, backend=backend)
    assert ids.shape == (0,) and ids.dtype == torch.int64
    ids, lp = lmkern.sample(x, temperature=torch.ones(0), return_logprobs=True, backend=backend)
    assert ids.shape == (0,) and lp.shape == (0,) and lp.dtype == torch.float32


def test_input_is_not_modified_and_not_differentiated(device_backend):
    device, backend = device_backend
    x = _logits(8, 40, device).requires_grad_()
    before = x.detach().clone()
    ids, lp = lmkern.sample(x, 0.5, top_p=0.9, return_logprobs=True, backend=backend)
    assert torch.equal(x.detach(), before) and not lp.requires_grad


# ----------------------------------------------------------------------------- seeds


def test_seed_reproducibility_and_mod_2_64(device_backend):
    device, backend = device_backend
    x = torch.zeros(256, 1000, device=device)  # uniform: any change of seed shows
    for s in (0, 12345, 2**63 - 1, 2**63, U64 - 1, -1, 3 * U64 + 7):
        a = lmkern.sample(x, seed=s, backend=backend)
        assert torch.equal(a, lmkern.sample(x, seed=s, backend=backend))
        assert torch.equal(a, lmkern.sample(x, seed=s + U64, backend=backend))
        assert torch.equal(a, lmkern.sample(x, seed=as_int64(s), backend=backend))
    assert torch.equal(lmkern.sample(x, seed=-1, backend=backend), lmkern.sample(x, seed=U64 - 1, backend=backend))


def test_seed_sensitivity(device_backend):
    device, backend = device_backend
    B, V = 256, 1000
    x = torch.zeros(B, V, device=device)
    ids = {s: lmkern.sample(x, seed=s, backend=backend) for s in (0, 1, 2**32, 2**63)}  # low word, high word
    values = list(ids.values())
    for i in range(len(values)):
        for j in range(i):
            assert (values[i] == values[j]).float().mean() < 0.05
    # identical rows differ: each row has its own stream (scalar seed) or key (seed tensor)
    assert ids[0].unique().numel() > 150
    assert lmkern.sample(x, seed=torch.arange(B), backend=backend).unique().numel() > 150


def test_batch_independence(device_backend):
    device, backend = device_backend
    B, V = 128, 97
    x = _logits(B, V, device, scale=1.0)
    T = torch.rand(B) + 0.5
    seeds = torch.randint(-(2**63), 2**63 - 1, (B,))
    cfg = dict(top_k=30, top_p=0.95)
    full = lmkern.sample(x, T, **cfg, seed=seeds, backend=backend)
    perm = torch.randperm(B)[: B // 3]
    part = lmkern.sample(x[perm.to(device)], T[perm], **cfg, seed=seeds[perm], backend=backend)
    assert torch.equal(part, full[perm.to(device)])  # a row's id depends on its own seed only
    # a scalar seed uses stream = row index: a prefix of the batch draws the same ids
    full = lmkern.sample(x, 0.8, **cfg, seed=42, backend=backend)
    assert torch.equal(lmkern.sample(x[:50], 0.8, **cfg, seed=42, backend=backend), full[:50])


def test_generator_and_default_generator(device_backend):
    device, backend = device_backend
    x = torch.zeros(64, 1000, device=device)
    gen_device = device if device == "cuda" else "cpu"
    g1 = torch.Generator(gen_device).manual_seed(7)
    g2 = torch.Generator(gen_device).manual_seed(7)
    a = lmkern.sample(x, generator=g1, backend=backend)
    assert torch.equal(a, lmkern.sample(x, generator=g2, backend=backend))
    assert (a == lmkern.sample(x, generator=g1, backend=backend)).float().mean() < 0.1  # it advanced
    torch.manual_seed(1234)
    b = lmkern.sample(x, backend=backend)
    torch.manual_seed(1234)
    assert torch.equal(b, lmkern.sample(x, backend=backend))
    assert (b == lmkern.sample(x, backend=backend)).float().mean() < 0.1
    if device == "cuda":  # a CPU generator with CUDA logits works too
        g = torch.Generator().manual_seed(3)
        assert lmkern.sample(x, generator=g, backend=backend).device == x.device


# ----------------------------------------------------------------------------- invalid rows


@pytest.mark.parametrize("bad", ["nan", "inf", "all_-inf", "nan_in_filtered_token"])
def test_invalid_rows_raise_naming_the_row(device_backend, bad):
    device, backend = device_backend
    x = _logits(6, 20, device)
    if bad == "nan":
        x[3, 7] = float("nan")
    elif bad == "inf":
        x[3, 0] = float("inf")
    elif bad == "all_-inf":
        x[3] = float("-inf")
    else:  # the token top_k would drop still makes the row invalid
        x[3] = torch.arange(20.0)
        x[3, 0] = float("nan")
    x[5, 1] = float("nan")  # a later bad row: the first one is named
    for kwargs in (dict(), dict(temperature=0.0), dict(top_k=2, seed=torch.arange(6))):
        with pytest.raises(ValueError, match=r"logits row 3 contains NaN or \+inf, or no finite value"):
            lmkern.sample(x, backend=backend, **kwargs)


def test_invalid_rows_are_minus_one_under_compile(device_backend):
    device, backend = device_backend
    x = _logits(4, 20, device)
    x[1, 2] = float("nan")
    x[2] = float("-inf")
    torch._dynamo.reset()
    f = torch.compile(lambda x: lmkern.sample(x, top_k=5, seed=1, return_logprobs=True, backend=backend), fullgraph=True)
    ids, lp = f(x)
    assert ids.tolist()[1:3] == [-1, -1] and torch.isnan(lp[1:3]).all()
    assert ids[0] >= 0 and ids[3] >= 0 and torch.isfinite(lp[[0, 3]]).all()


# ----------------------------------------------------------------------------- custom ops

SAMPLE_OPS = {"cpu": "sample", "cuda": "sample", "triton": "sample_triton", "reference": "sample_reference"}
SOFTMAX_OPS = {"cpu": "softmax", "cuda": "softmax", "triton": "softmax_triton", "reference": "softmax_reference"}


def test_opcheck_sample(device_backend):
    device, backend = device_backend
    op = getattr(torch.ops.lmkern, SAMPLE_OPS[backend])
    B, V = 5, 37
    x = _logits(B, V, device)
    rows = dict(
        T=torch.tensor([0.0, 0.5, 1.0, 2.0, 1.0], device=device),
        k=torch.tensor([0, 3, 40, 1, 5], device=device),
        p=torch.tensor([1.0, 0.9, 0.5, 1.0, 0.7], device=device),
        m=torch.tensor([0.0, 0.1, 0.0, 0.5, 0.05], device=device),
        s=torch.arange(B, device=device),
    )
    torch.library.opcheck(op, (x, 0.8, 5, 0.9, 0.05, None, None, None, None, -7, None, True))
    torch.library.opcheck(op, (x, 1.0, 0, 1.0, 0.0, None, None, None, None, 3, None, False))
    torch.library.opcheck(op, (x, 1.0, 0, 1.0, 0.0, rows["T"], rows["k"], rows["p"], rows["m"], 0, rows["s"], True))
    torch.library.opcheck(op, (x.half(), 0.8, 5, 0.9, 0.05, None, None, None, None, 1, None, True))
    torch.library.opcheck(op, (_logits(B, V + 5, device)[:, :V], 0.8, 5, 0.9, 0.05, None, None, None, None, 1, None, True))


def test_opcheck_softmax(device_backend):
    device, backend = device_backend
    op = getattr(torch.ops.lmkern, SOFTMAX_OPS[backend])
    x = _logits(6, 41, device).requires_grad_()
    T = torch.tensor([0.5, 1.0, 0.0, 2.0, 1.0, 3.0], device=device, requires_grad=True)
    torch.library.opcheck(op, (x, 0.7, None))
    torch.library.opcheck(op, (x, 0.0, None))
    torch.library.opcheck(op, (x, 1.0, T))
    torch.library.opcheck(op, (x.detach().half().requires_grad_(), 1.3, None))


def test_torch_compile_fullgraph(device_backend):
    device, backend = device_backend
    B, V = 16, 300

    def step(logits, T, seeds):
        probs = lmkern.softmax(logits, T, backend=backend)
        ids, lp = lmkern.sample(logits, T, top_k=40, top_p=0.9, min_p=0.01, seed=seeds, return_logprobs=True, backend=backend)
        greedy = lmkern.sample(logits, 0.0, backend=backend)
        return probs, ids, lp, greedy, lmkern.sample(logits, 0.7, seed=1234, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):
        x = _logits(B, V, device)
        T = torch.rand(B, device=device) + 0.5
        seeds = torch.randint(0, 2**62, (B,), device=device)
        got, want = compiled(x, T, seeds), step(x, T, seeds)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for g, w in zip(got[1:], want[1:]):
            assert torch.equal(g, w)


def test_torch_compile_with_changing_seed_and_batch(device_backend):
    device, backend = device_backend
    torch._dynamo.reset()
    f = torch.compile(lambda x, s, T: lmkern.sample(x, T, top_k=20, seed=s, backend=backend), fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(recompile_limit=1):  # new seeds and batch sizes do not recompile
        for B, s in ((3, 1), (5, 2), (7, -5), (9, 2**63 - 1), (6, 12345)):
            x = _logits(B, 64, device)
            T = torch.rand(B, device=device) + 0.5
            assert torch.equal(f(x, s, T), lmkern.sample(x, T, top_k=20, seed=s, backend=backend)), (B, s)
    # a seed outside the int64 range is reduced mod 2**64 first (a separate graph)
    x = _logits(4, 64, device)
    assert torch.equal(f(x, U64 - 2, 0.9), lmkern.sample(x, 0.9, top_k=20, seed=-2, backend=backend))


# ----------------------------------------------------------------------------- softmax


@pytest.mark.parametrize("shape", [(5, 97), (2, 3, 1025), (4, 1), (1, 50257), (7,)])
def test_softmax_matches_torch(device_backend, shape):
    device, backend = device_backend
    x = torch.randn(shape, device=device) * 4
    for T in (1.0, 0.3, 2.5):
        got = lmkern.softmax(x, T, backend=backend)
        assert got.dtype == torch.float32 and got.shape == x.shape
        # float32 rounds z - max(z), so a probability's relative error grows with the spread of z
        spread = (x / T).amax(-1) - (x / T).amin(-1)
        rtol = 1e-5 + 2 * torch.finfo(torch.float32).eps * spread.max().item()
        torch.testing.assert_close(got, torch.softmax(x.double() / T, -1).float(), rtol=rtol, atol=1e-7)
    lead = shape[:-1]
    T = torch.rand(lead, device=device) + 0.2
    if T.numel():
        T.view(-1)[0] = 0.0
    got = lmkern.softmax(x, T, backend=backend)
    want = torch.softmax(x.double() / T[..., None].clamp(min=1e-30), -1)
    onehot = torch.nn.functional.one_hot(x.argmax(-1), shape[-1]).double()
    want = torch.where(T[..., None] == 0, onehot, want).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_softmax_edge_rows(device_backend):
    device, backend = device_backend
    x = torch.tensor([[0.0, float("-inf"), 1.0], [2.0, 2.0, 2.0], [-1e30, 0.0, 5.0]], device=device)
    got = lmkern.softmax(x, 1.0, backend=backend)
    torch.testing.assert_close(got, torch.softmax(x, -1))
    greedy = lmkern.softmax(x, 0.0, backend=backend)
    assert greedy.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert lmkern.softmax(torch.randn(0, 5, device=device), backend=backend).shape == (0, 5)
    strided = torch.randn(4, 40, device=device)[:, 5:30]
    torch.testing.assert_close(lmkern.softmax(strided, 0.5, backend=backend), torch.softmax(strided / 0.5, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_softmax_gradient(device_backend, dtype):
    device, backend = device_backend
    if _bf16_on_interpreter(device, backend, dtype):
        with pytest.raises(dispatch.BackendError, match="bfloat16"):
            lmkern.softmax(torch.randn(2, 8, dtype=dtype), backend=backend)
        return
    B, V = 6, 203
    x = (torch.randn(B, V) * 3).to(device=device, dtype=dtype)
    x[1, 5] = float("-inf")
    T = torch.tensor([0.5, 1.0, 0.0, 2.0, 1.0, 0.8], device=device)
    w = torch.randn(B, V, device=device)
    for temp in (T, 0.7, 0.0):
        xg = x.clone().requires_grad_()
        tg = temp.clone().requires_grad_() if isinstance(temp, torch.Tensor) else temp
        out = lmkern.softmax(xg, tg, backend=backend)
        (out * w).sum().backward()
        assert xg.grad.dtype == dtype
        # float64 truth, and torch's own computation from the same low-precision logits
        x64 = x.double().nan_to_num(neginf=-1e4).requires_grad_()  # p = 0 there, without 0 * inf in dL/dT
        t64 = temp.double().requires_grad_() if isinstance(temp, torch.Tensor) else temp
        tt = t64[:, None] if isinstance(temp, torch.Tensor) else torch.tensor(temp, dtype=torch.float64, device=device)
        p64 = torch.where(tt == 0, torch.nn.functional.one_hot(x64.argmax(-1), V).double(), torch.softmax(x64 / torch.where(tt == 0, 1.0, tt), -1))
        (p64 * w.double()).sum().backward()
        xl = x.clone().requires_grad_()
        tl = temp[:, None] if isinstance(temp, torch.Tensor) else torch.tensor(temp, device=device)
        pl = torch.where(tl == 0, torch.nn.functional.one_hot(xl.argmax(-1), V).float(), torch.softmax(xl / torch.where(tl == 0, 1.0, tl), -1, dtype=torch.float32))
        (pl * w).sum().backward()
        assert_close_2x(xg.grad, x64.grad, xl.grad, f"{backend} {dtype} softmax grad, T={temp}")
        zero_rows = (tt == 0).flatten() if isinstance(temp, torch.Tensor) else torch.full((B,), temp == 0, device=device)
        assert (xg.grad[zero_rows] == 0).all()
        if isinstance(temp, torch.Tensor):
            torch.testing.assert_close(tg.grad.double(), t64.grad, rtol=1e-3, atol=1e-4 if dtype == torch.float32 else 1e-2)


def test_softmax_backward_formula_gradcheck():
    """The autograd formula every softmax op uses, in float64 around the reference forward."""

    class Softmax(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, t, T):
            # float64 throughout (the op computes p in float32)
            z = x / (T[:, None] if T is not None else t)
            out = torch.softmax(z, -1)
            if T is not None:
                out = torch.where(T[:, None] == 0, torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).double(), out)
            sampling_ops._softmax_setup_context(ctx, (x, t, T), out)
            return out

        @staticmethod
        def backward(ctx, g):
            return sampling_ops._softmax_backward(ctx, g)

    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    T = torch.tensor([0.5, 1.5, 0.7, 3.0], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, T: Softmax.apply(x, 1.0, T), (x, T))  # (T = 0 is a jump)
    T = torch.tensor([0.5, 1.5, 0.0, 3.0], dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: Softmax.apply(x, 0.6, None), (x,))
    xm = x.detach().clone()
    xm[0, 3] = float("-inf")
    xm.requires_grad_()
    out = Softmax.apply(xm, 1.0, T)
    gx, gT = torch.autograd.grad((out * torch.randn_like(out)).sum(), (xm, T))
    assert torch.isfinite(gx).all() and torch.isfinite(gT).all() and gT[2] == 0 and gx[0, 3] == 0


# ----------------------------------------------------------------------------- module, dispatch, info


def test_sampler_module(device_backend):
    device, backend = device_backend
    s = lmkern.nn.Sampler(0.7, top_k=20, top_p=0.9)
    s.backend = backend
    assert repr(s) == "Sampler(temperature=0.7, top_k=20, top_p=0.9, min_p=None)"
    assert len(s.state_dict()) == 0 and len(list(s.parameters())) == 0
    x = _logits(10, 64, device)
    ids, lp = s(x, seed=3, return_logprobs=True)
    want, want_lp = lmkern.sample(x, 0.7, 20, 0.9, seed=3, return_logprobs=True, backend=backend)
    assert torch.equal(ids, want) and torch.equal(lp, want_lp)
    g = torch.Generator().manual_seed(2)
    assert torch.equal(s(x, generator=g), lmkern.sample(x, 0.7, 20, 0.9, generator=torch.Generator().manual_seed(2), backend=backend))
    s.temperature = torch.zeros(10)
    assert torch.equal(s(x), x.argmax(-1))
    assert "temperature=tensor(shape=(10,))" in repr(s)
    with pytest.raises(ValueError, match="top_p"):
        lmkern.nn.Sampler(top_p=1.5)
    with pytest.raises(TypeError, match="top_k"):
        lmkern.nn.Sampler(top_k=2.5)


# ----------------------------------------------------------------------------- split rows (C++ CPU)

# With fewer rows than threads the C++ CPU kernels cut each long row into token ranges run on
# several threads; LMKERN_CPU_SAMPLE_SPLITS=n forces n ranges per row (1: never split), so these
# tests run the split on any machine and batch. Split and unsplit must agree bit for bit.
SPLIT_ENV = "LMKERN_CPU_SAMPLE_SPLITS"

SPLIT_CONFIGS = {
    **CONFIGS,
    "greedy": dict(temperature=0.0),
    "top_k_over_a_range": dict(top_k=1500, top_p=0.95),  # k beyond a range's length
    "cold_top_p_min_p": dict(temperature=0.3, top_p=0.7, min_p=0.2),
}


def _split_logits(V, dtype):
    """Rows that stress the combination of ranges: plain, -inf tokens, many ties (the max and the
    k-th value repeated across ranges), the top-k all in the last range, one finite island."""
    x = torch.randn(5, V) * 3
    x[1, ::3] = float("-inf")
    x[2] = torch.round(torch.randn(V) * 1.5)
    x[2, [V - 1, V // 2, 0]] = x[2].max() + 1  # the max in the first, a middle and the last range
    x[3] = torch.linspace(-5.0, 5.0, V)
    x[4] = float("-inf")
    x[4, V // 2 : V // 2 + 40] = torch.randn(40)
    return x.to(dtype)


def _sample_with_splits(monkeypatch, splits, x, **kwargs):
    monkeypatch.setenv(SPLIT_ENV, str(splits))
    return lmkern.sample(x, return_logprobs=True, backend="cpu", **kwargs)


@pytest.mark.skipif(not _ext.HAS_CPP, reason="lmkern._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("V", [2500, 9217, 40000])
def test_split_rows_match_unsplit(monkeypatch, dtype, V):
    """Every filter path, per-row parameters and seeds, cut into 2, 3 and 7 ranges (fewer when the
    row has fewer 1024-token chunks): the same ids and the same logprob bits as whole rows."""
    x = _split_logits(V, dtype)
    B = x.shape[0]
    per_row = dict(temperature=torch.tensor([0.0, 0.7, 1.0, 2.0, 0.5]), top_k=torch.tensor([0, 1, 50, V, 3]),
                   top_p=torch.tensor([0.9, 1.0, 0.5, 0.8, 1.0]), min_p=torch.tensor([0.0, 0.1, 0.0, 0.05, 0.0]))
    cases = [(dict(cfg), random.getrandbits(64)) for cfg in SPLIT_CONFIGS.values()]
    cases += [(per_row, torch.randint(-(2**63), 2**63 - 1, (B,)))]
    for cfg, seed in cases:
        ids, logprobs = _sample_with_splits(monkeypatch, 1, x, **cfg, seed=seed)
        _check(ids, logprobs, x, f"whole rows {dtype} V={V} {cfg}", **cfg,
               **(dict(seeds=seed) if isinstance(seed, torch.Tensor) else dict(seed=seed)))
        for splits in (2, 3, 7):
            got = _sample_with_splits(monkeypatch, splits, x, **cfg, seed=seed)
            assert torch.equal(got[0], ids), (splits, cfg)
            assert torch.equal(got[1], logprobs), (splits, cfg)


@pytest.mark.skipif(not _ext.HAS_CPP, reason="lmkern._C not built")
def test_split_is_automatic_for_one_long_row(monkeypatch):
    """B = 1 with a long row is split by default when torch has more than one thread (the case
    this path is for); either way the draw is the whole row's."""
    x = torch.randn(1, 40000) * 3
    for cfg in (dict(), dict(top_k=50, top_p=0.9), dict(top_p=0.9), dict(temperature=0.0)):
        monkeypatch.delenv(SPLIT_ENV, raising=False)
        auto = lmkern.sample(x, **cfg, seed=7, return_logprobs=True, backend="cpu")
        whole = _sample_with_splits(monkeypatch, 1, x, **cfg, seed=7)
        assert torch.equal(auto[0], whole[0]) and torch.equal(auto[1], whole[1]), cfg


@pytest.mark.skipif(not _ext.HAS_CPP, reason="lmkern._C not built")
def test_split_invalid_rows_raise_naming_the_row(monkeypatch):
    x = _logits(4, 5000, "cpu")
    x[2, 4500] = float("nan")  # in the last range
    x[3, 10] = float("inf")
    monkeypatch.setenv(SPLIT_ENV, "3")
    for kwargs in (dict(), dict(temperature=0.0), dict(top_k=5), dict(top_p=0.5)):
        with pytest.raises(ValueError, match="logits row 2 contains NaN"):
            lmkern.sample(x, backend="cpu", **kwargs)
    ids = torch.ops.lmkern.sample(x, 1.0, 0, 1.0, 0.0, None, None, None, None, 3, None, True)
    assert ids[0][2:].tolist() == [-1, -1] and ids[1][2:].isnan().all()


@pytest.mark.skipif(not _ext.HAS_CPP, reason="lmkern._C not built")
def test_overflowing_temperature_on_split_rows(monkeypatch):
    x, T, degenerate = _overflow_rows(9217, "cpu")
    for cfg in (dict(), dict(top_k=5, top_p=0.9), dict(top_p=0.9)):
        whole = _sample_with_splits(monkeypatch, 1, x, temperature=T, **cfg, seed=3)
        assert torch.equal(whole[0][degenerate], x.argmax(-1)[degenerate])
        for splits in (2, 7):
            got = _sample_with_splits(monkeypatch, splits, x, temperature=T, **cfg, seed=3)
            assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1]), (splits, cfg)
    monkeypatch.setenv(SPLIT_ENV, "3")
    probs = lmkern.softmax(x, T, backend="cpu")
    assert torch.equal(probs[degenerate], torch.nn.functional.one_hot(x.argmax(-1), x.shape[-1]).float()[degenerate])


@pytest.mark.skipif(not _ext.HAS_CPP, reason="lmkern._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_softmax_matches_unsplit(monkeypatch, dtype):
    x = _split_logits(9217, dtype)
    x[0, 100] = float("nan")  # a NaN row stays NaN
    for T in (1.0, 0.4, 0.0, torch.tensor([0.0, 1.0, 0.0, 2.0, 0.7])):
        monkeypatch.setenv(SPLIT_ENV, "1")
        want = lmkern.softmax(x, T, backend="cpu")
        for splits in (2, 3, 7):
            monkeypatch.setenv(SPLIT_ENV, str(splits))
            torch.testing.assert_close(lmkern.softmax(x, T, backend="cpu"), want, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- instruction sets

PORTABLE_SCRIPT = """
import os, sys, torch
from lmkern import _C
assert _C.cpu_isa() == "portable", _C.cpu_isa()
cases = torch.load(sys.argv[1])
outs = {}
for splits in ("1", "3"):  # whole rows, and rows cut into 3 ranges
    os.environ["LMKERN_CPU_SAMPLE_SPLITS"] = splits
    outs[splits] = [(torch.ops.lmkern.sample(x, *args), torch.ops.lmkern.softmax(x, args[0], None)) for x, args in cases]
torch.save(outs, sys.argv[2])
"""


@pytest.mark.skipif(not _ext.HAS_CPP, reason="lmkern._C not built")
def test_portable_isa(tmp_path):
    """The portable (non-x86) CPU kernels, selected with LMKERN_CPU_ISA in a fresh process, against
    the oracle: every filter path, a vocabulary that is not a multiple of any register width, -inf
    logits, fp16 and bf16; and with rows split into ranges, the same bits."""
    cases, cfgs = [], []
    for dtype, config, V in [(torch.float32, "all", 1031), (torch.float32, "top_p", 1031), (torch.float16, "top_k", 1031),
                             (torch.bfloat16, "cold", 1031), (torch.float32, "min_p", 1031),
                             (torch.float32, "all", 5000), (torch.bfloat16, "top_p", 5000), (torch.float32, "plain", 5000)]:
        x = _logits(300 if V < 2000 else 20, V, "cpu", dtype)
        x[::7, ::3] = float("-inf")
        cfg = CONFIGS[config]
        seed = random.getrandbits(63)
        args = (cfg.get("temperature", 1.0), cfg.get("top_k", 0), cfg.get("top_p", 1.0), cfg.get("min_p", 0.0),
                None, None, None, None, seed, None, True)
        cases.append((x, args))
        cfgs.append((cfg, seed))
    torch.save(cases, tmp_path / "in.pt")
    env = dict(os.environ, LMKERN_CPU_ISA="portable")
    subprocess.run([sys.executable, "-c", PORTABLE_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True)
    outs = torch.load(tmp_path / "out.pt")
    for ((ids, logprobs), probs), split, (x, args), (cfg, seed) in zip(outs["1"], outs["3"], cases, cfgs):
        _check(ids, logprobs, x, f"portable {x.dtype} {cfg}", **cfg, seed=seed)
        want = torch.softmax(x.double() / args[0], -1).float()
        torch.testing.assert_close(probs, want, rtol=1e-5, atol=1e-7)
        assert torch.equal(split[0][0], ids) and torch.equal(split[0][1], logprobs), f"split {x.dtype} {cfg}"
        assert torch.equal(split[1], probs), f"split softmax {x.dtype} {cfg}"


def test_backends_report_missing_kernels():
    for op in ("sample", "softmax"):
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            why = dispatch.reasons(op, dispatch.InputSpec(device, torch.float32))[device]
            has = _ext.HAS_CPP and torch._C._dispatch_has_kernel_for_dispatch_key(f"lmkern::{op}", key)
            if has:
                assert why is None
            else:
                assert why is not None
        auto, _ = dispatch.select(op, None, dispatch.InputSpec("cpu", torch.float32))
        assert auto == ("cpu" if dispatch.reasons(op, dispatch.InputSpec("cpu", torch.float32))["cpu"] is None else "reference")
        assert dispatch.select(op, None, dispatch.InputSpec("cpu", torch.float64))[0] == "reference"
        assert dispatch.reasons(op, dispatch.InputSpec("cpu", torch.bfloat16))["triton"] is not None


def test_info_lists_sampling():
    text = lmkern.info()
    assert "\nsample " in text and "\nsoftmax " in text
