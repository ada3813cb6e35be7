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


def torch_sdpa64(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)


def packed(lens_q, lens_k, hq, hkv, D, dtype=torch.float32):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, D).to(dtype)
    k, v = torch.randn(int(cu_k[-1]), hkv, D).to(dtype), torch.randn(int(cu_k[-1]), hkv, D).to(dtype)
    return q, k, v, cu_q, cu_k
