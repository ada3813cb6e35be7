"""Independent float64 attention math shared by the attention tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def naive(q, k, v, scale=None, visible=lambda i, j: True):
    """float64 attention of one sequence, row by row: q (Sq, Hq, D), k/v (Sk, Hkv, D).
    ``visible(i, j)`` says whether query row i sees key j. Returns (out (Sq, Hq, D), lse (Hq, Sq));
    a row that sees no key gives zeros and lse -inf."""
    q, k, v = q.double(), k.double(), v.double()
    Sq, Hq, D = q.shape
    Sk, Hkv, _ = k.shape
    scale = 1 / math.sqrt(D) if scale is None else scale
    kh = torch.stack([k[:, h * Hkv // Hq] for h in range(Hq)], 1)  # head h reads h // (Hq / Hkv)
    vh = torch.stack([v[:, h * Hkv // Hq] for h in range(Hq)], 1)
    out = torch.zeros(Sq, Hq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((Hq, Sq), float("-inf"), dtype=torch.float64)
    for i in range(Sq):
        js = [j for j in range(Sk) if visible(i, j)]
        if not js:
            continue
        s = torch.einsum("hd,jhd->hj", q[i], kh[js]) * scale  # (Hq, n)
        lse[:, i] = torch.logsumexp(s, -1)
        out[i] = torch.einsum("hj,jhd->hd", torch.softmax(s, -1), vh[js])
    return out, lse


def bottom_right(Sq, Sk):
    return lambda i, j: j <= i + Sk - Sq


def _max_row_norm(t):
    """The largest norm of t's last-dim rows, leaving out NaN entries (cache slots never read)."""
    t = t.detach().double()
    return torch.where(t.isnan(), 0, t).norm(dim=-1).max().item() if t.numel() else 0.0


def grad_term_scale(grad_out, q, k, v, grad_lse=None):
    """The size of the terms float32 rounds and cancels in attention's input gradients (the
    term_scale of helpers.assert_close_2x): dq = scale * sum_j P_ij (dP_ij - delta_i) k_j cancels
    terms of about |dO| |v| |k| scale, dk likewise with q, plus |dlse| |k| scale with a gradient
    on the lse; scale = 1 / sqrt(head_dim)."""
    g = grad_out.abs().max().item() if grad_out.numel() else 0.0
    gl = grad_lse.abs().max().item() if grad_lse is not None and grad_lse.numel() else 0.0
    qk = max(_max_row_norm(q), _max_row_norm(k)) / q.shape[-1] ** 0.5
    return g * (_max_row_norm(v) * qk + 1) + gl * qk


def torch_sdpa64(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)


def packed(lens_q, lens_k, hq, hkv, D, dtype=torch.float32):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, D).to(dtype)
    k, v = torch.randn(int(cu_k[-1]), hkv, D).to(dtype), torch.randn(int(cu_k[-1]), hkv, D).to(dtype)
    return q, k, v, cu_q, cu_k


def tile_pairs(first: tuple, second: tuple) -> list[tuple]:
    """Every config of two candidate lists (the Triton backward's dK/dV and dQ tiles) at least
    once, paired in order; past the end of the shorter list, its default (its first) again."""
    return [(first[i] if i < len(first) else first[0], second[i] if i < len(second) else second[0])
            for i in range(max(len(first), len(second)))]


def check_row_stats(lse, stats, base=math.e, keys=None, what="stats"):
    """The forward's stats for the backward: (row max m, log-sum ls) in the kernel's log base (e on
    cpu, 2 on triton and cuda), with (m + ls) ln(base) = lse and ls in [0, log_base(keys)]; (-inf, 0)
    on the rows that see no key, and a NaN max exactly where lse is NaN."""
    assert stats.shape == (2,) + lse.shape and stats.dtype == torch.float32 and stats.is_contiguous(), what
    m, ls = stats
    dead = torch.isneginf(lse)
    assert torch.equal(torch.isneginf(m), dead) and (ls[dead] == 0).all(), f"{what}: stats of rows without keys"
    assert torch.equal(m.isnan(), lse.isnan()), f"{what}: NaN rows"
    ok = ~dead & ~lse.isnan()
    assert (ls[ok] >= 0).all(), f"{what}: negative log-sum"
    if keys is not None:
        assert (ls[ok] <= math.log(max(keys, 1), base) + 1e-5).all(), f"{what}: log-sum above log(keys)"
    torch.testing.assert_close((m[ok] + ls[ok]) * math.log(base), lse[ok], rtol=1e-6, atol=1e-6,
                               msg=f"{what}: (m + ls) ln(base) != lse")
