"""Attention in Triton: FlashAttention-2 forward and backward (dense, varlen, GQA, causal, additive
bias, seqused_k) and split-KV decoding against a KV cache.

Contract: csrc/registration.cpp (attention_fwd / attention_decode schemas); the truth is
lmkern/reference/attention.py. Conventions shared by every kernel here:

* Scores live in the log2 domain: s2 = (q . k) * scale * log2(e) (+ bias * log2(e)), so the
  softmax uses exp2; lse is converted back to natural log when stored.
* Online softmax in fp32 with the running max guarded against -inf: a row that has seen no
  visible key keeps m = -inf and is shifted by 0, so exp2(-inf) = 0 and nothing becomes NaN.
  A row that ends with no visible key stores out 0 and lse -inf; the backward treats lse = -inf
  as "contributes nothing".
* Head dims are padded to a power of two >= 16 (BLOCK_D) with masked loads; every load past a
  sequence length is masked, so keys beyond seqused_k / cache_seqlens are never read.
* Causal: key j is visible to query i iff j <= i + offset, offset = 0 (top-left) or
  Sk_b - Sq_b (bottom-right). Loop bounds skip key (query) blocks that no row can see, and the
  forward runs the blocks every row fully sees without any masking arithmetic.

The launchers are plain functions over preallocated outputs; lmkern/ops/attention.py wraps them
in torch.library.triton_op (with autograd), hence every launch goes through wrap_triton.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

LOG2E = 1.4426950408889634

# Tile shapes under Triton's CPU interpreter (CPU tensors), read at call time: small, so that the
# interpreter stays fast and the tests cross several blocks with short sequences.
CPU_FWD_BLOCK = (16, 16)  # (BLOCK_M queries, BLOCK_N keys)
CPU_BWD_BLOCK = (16, 16)
CPU_DECODE_BLOCK_N = 16
CPU_DECODE_SPLITS = 4  # stands in for the SM count in the num_splits heuristic on CPU tensors
MAX_DECODE_SPLITS = 128


# ----------------------------------------------------------------------------- shared pieces


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    """fp32-accumulating tl.dot; DOT_PREC "ieee" keeps fp32 inputs fp32-accurate (not tf32)."""
    if DOT_PREC == "ieee":
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _seq_bounds(CU, SEQUSED, b, dense_len, VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr):
    """(start row, length) of sequence b: packed rows cu[b]:cu[b+1], or dense [0, dense_len)
    (cut to seqused[b] when given)."""
    if VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    else:
        start = tl.full([], 0, tl.int32)
        length = dense_len
        if HAS_SEQUSED:
            length = tl.load(SEQUSED + b)
    return start, length


@triton.jit
def _causal_offset(seqlen_q, seqlen_k, TOP_LEFT: tl.constexpr):
    if TOP_LEFT:
        return 0
    else:
        return seqlen_k - seqlen_q


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_block(
    acc, l_i, m_i, q, K, V, BIAS, start_n, offs_m, offs_n, offs_d, stride_kn, stride_vn,
    stride_bm, stride_bn, seqlen_q, seqlen_k, causal_offset, qk_scale,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One key block of the online softmax. MASKED = False: the caller guarantees every key of
    the block exists and is visible to every row (no masking arithmetic at all)."""
    cols = start_n + offs_n
    d_ok = offs_d < HEAD_DIM
    if MASKED:
        kv_mask = (cols < seqlen_k)[None, :] & d_ok[:, None]
        kT = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=tl.trans(kv_mask), other=0.0)
    else:
        kT = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    s = _dot(q, kT, DOT_PREC) * qk_scale
    if HAS_BIAS:
        b_mask = (offs_m < seqlen_q)[:, None] & (cols < seqlen_k)[None, :]
        bias = tl.load(BIAS + offs_m[:, None] * stride_bm + cols[None, :] * stride_bn, mask=b_mask, other=0.0)
        s += bias.to(tl.float32) * 1.4426950408889634
    if MASKED:
        visible = (cols < seqlen_k)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows that have seen no visible key yet are shifted by 0: exp2(-inf - 0) = 0, never NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["seqlen_q_dense", "seqlen_k_dense"])
def _attn_fwd_kernel(
    Q, K, V, BIAS, O, LSE, CU_Q, CU_K, SEQUSED_K,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
    seqlen_q_dense, seqlen_k_dense, Hq, GROUP, qk_scale,
    VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    TOP_LEFT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One program per (query block, batch * query head).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    q_start, seqlen_q = _seq_bounds(CU_Q, CU_Q, b, seqlen_q_dense, VARLEN, False)
    k_start, seqlen_k = _seq_bounds(CU_K, SEQUSED_K, b, seqlen_k_dense, VARLEN, HAS_SEQUSED)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:  # the grid covers the longest sequence; shorter ones end early
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seqlen_q

    Q += b64 * stride_qb + q_start.to(tl.int64) * stride_qm + h64 * stride_qh
    K += b64 * stride_kb + k_start.to(tl.int64) * stride_kn + hk64 * stride_kh
    V += b64 * stride_vb + k_start.to(tl.int64) * stride_vn + hk64 * stride_vh
    if HAS_BIAS:
        BIAS += b64 * stride_bb + h64 * stride_bh
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Key range: [0, full_hi) every row sees in full, [full_hi, hi) needs masks, beyond: skipped.
    causal_offset = _causal_offset(seqlen_q, seqlen_k, TOP_LEFT)
    if CAUSAL:
        hi = tl.minimum(seqlen_k, tl.maximum(m0 + BLOCK_M + causal_offset, 0))
        full_hi = tl.maximum(m0 + causal_offset + 1, 0) // BLOCK_N * BLOCK_N
        full_hi = tl.minimum(full_hi, seqlen_k // BLOCK_N * BLOCK_N)
    else:
        hi = seqlen_k
        full_hi = seqlen_k // BLOCK_N * BLOCK_N

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(0, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, K, V, BIAS, start_n, offs_m, offs_n, offs_d, stride_kn, stride_vn,
            stride_bm, stride_bn, seqlen_q, seqlen_k, causal_offset, qk_scale,
            HEAD_DIM, HAS_BIAS, CAUSAL, False, DOT_PREC,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(
            acc, l_i, m_i, q, K, V, BIAS, start_n, offs_m, offs_n, offs_d, stride_kn, stride_vn,
            stride_bm, stride_bn, seqlen_q, seqlen_k, causal_offset, qk_scale,
            HEAD_DIM, HAS_BIAS, CAUSAL, True, DOT_PREC,
        )

    live = l_i > 0.0
    l_safe = tl.where(live, l_i, 1.0)
    out = acc / l_safe[:, None]  # dead rows: acc is 0, so out is 0
    lse = tl.where(live, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    O += b64 * stride_ob + q_start.to(tl.int64) * stride_om + h64 * stride_oh
    tl.store(O + offs_m[:, None] * stride_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["seqlen_q_dense"])
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh, stride_lb, stride_lh,
    seqlen_q_dense, Hq,
    VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = rowsum(dO_i * O_i) in fp32, laid out as lse."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    q_start, seqlen_q = _seq_bounds(CU_Q, CU_Q, b, seqlen_q_dense, VARLEN, False)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = q_start.to(tl.int64) + offs_m
    o = tl.load(O + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + b64 * stride_lb + h64 * stride_lh + rows, delta, mask=offs_m < seqlen_q)


@triton.jit(do_not_specialize=["seqlen_q_dense", "seqlen_k_dense"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, SEQUSED_K,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, stride_lb, stride_lh,
    seqlen_q_dense, seqlen_k_dense, Hkv, GROUP, qk_scale, scale,
    VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    TOP_LEFT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One program per (key block, batch * kv head); it loops over the GROUP query heads that read
    # this kv head and over their query blocks, so dK/dV are summed in registers (no atomics).
    # Everything is computed transposed (keys along rows): sT = k q^T, pT, dpT = v dO^T.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    q_start, seqlen_q = _seq_bounds(CU_Q, CU_Q, b, seqlen_q_dense, VARLEN, False)
    k_start, seqlen_k = _seq_bounds(CU_K, SEQUSED_K, b, seqlen_k_dense, VARLEN, HAS_SEQUSED)
    # Rows this program writes: dense, every key slot (those past seqused_k get zeros); packed,
    # the sequence's own rows.
    if VARLEN:
        store_len = seqlen_k
    else:
        store_len = seqlen_k_dense
    n0 = pid_n * BLOCK_N
    if n0 >= store_len:
        return
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    key_ok = offs_n < seqlen_k
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k_rows = k_start.to(tl.int64) + offs_n
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + k_rows[:, None] * stride_kn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + k_rows[:, None] * stride_vn + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    causal_offset = _causal_offset(seqlen_q, seqlen_k, TOP_LEFT)
    # Query i sees key j iff i >= j - offset: query blocks before the first such row are skipped.
    lo = 0
    if CAUSAL:
        lo = tl.maximum(n0 - causal_offset, 0) // BLOCK_M * BLOCK_M
    hi = seqlen_q
    if n0 >= seqlen_k:
        hi = 0  # keys past seqused_k: zero gradient, nothing to read
    q_row0 = q_start.to(tl.int64)
    for g in range(0, GROUP):
        h64 = (hk * GROUP + g).to(tl.int64)
        Qh = Q + b64 * stride_qb + h64 * stride_qh + q_row0 * stride_qm
        DOh = DO + b64 * stride_dob + h64 * stride_doh + q_row0 * stride_dom
        Lh = LSE + b64 * stride_lb + h64 * stride_lh + q_row0
        Dh = DELTA + b64 * stride_lb + h64 * stride_lh + q_row0
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < seqlen_q
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
            do = tl.load(DOh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(Lh + offs_m, mask=row_ok, other=float("-inf"))
            delta = tl.load(Dh + offs_m, mask=row_ok, other=0.0)
            # lse = -inf (a row that saw no key, or padding): shift by +inf so that P is 0.
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            sT = _dot(k, tl.trans(q), DOT_PREC) * qk_scale
            if HAS_BIAS:
                bT = tl.load(BIAS + b64 * stride_bb + h64 * stride_bh + offs_n[:, None] * stride_bn
                             + offs_m[None, :] * stride_bm, mask=key_ok[:, None] & row_ok[None, :], other=0.0)
                sT += bT.to(tl.float32) * 1.4426950408889634
            # Masked before exp2: a hidden score may exceed the row's lse (exp2 would overflow).
            visible = key_ok[:, None] & row_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + causal_offset)
            pT = tl.math.exp2(tl.where(visible, sT, float("-inf")) - lse2[None, :])
            dv += _dot(pT.to(do.dtype), do, DOT_PREC)
            dpT = _dot(v, tl.trans(do), DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += _dot(dsT.to(q.dtype), q, DOT_PREC)

    dk = dk * scale
    st_mask = (offs_n < store_len)[:, None] & d_ok[None, :]
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + k_rows[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + k_rows[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit(do_not_specialize=["seqlen_q_dense", "seqlen_k_dense"])
def _attn_bwd_dq_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DQ, CU_Q, CU_K, SEQUSED_K,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh,
    seqlen_q_dense, seqlen_k_dense, Hq, GROUP, qk_scale, scale,
    VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    TOP_LEFT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One program per (query block, batch * query head): dQ = scale * dS K summed over key blocks
    # in registers (deterministic; no atomics).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP
    q_start, seqlen_q = _seq_bounds(CU_Q, CU_Q, b, seqlen_q_dense, VARLEN, False)
    k_start, seqlen_k = _seq_bounds(CU_K, SEQUSED_K, b, seqlen_k_dense, VARLEN, HAS_SEQUSED)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seqlen_q
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_rows = q_start.to(tl.int64) + offs_m
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + q_rows[:, None] * stride_qm + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + q_rows[:, None] * stride_dom + offs_d[None, :],
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + b64 * stride_lb + h64 * stride_lh + q_rows, mask=row_ok, other=float("-inf"))
    delta = tl.load(DELTA + b64 * stride_lb + h64 * stride_lh + q_rows, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    K += b64 * stride_kb + hk64 * stride_kh + k_start.to(tl.int64) * stride_kn
    V += b64 * stride_vb + hk64 * stride_vh + k_start.to(tl.int64) * stride_vn
    if HAS_BIAS:
        BIAS += b64 * stride_bb + h64 * stride_bh

    causal_offset = _causal_offset(seqlen_q, seqlen_k, TOP_LEFT)
    if CAUSAL:
        hi = tl.minimum(seqlen_k, tl.maximum(m0 + BLOCK_M + causal_offset, 0))
    else:
        hi = seqlen_k
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        key_ok = offs_n < seqlen_k
        kT = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None], mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        vT = tl.load(V + offs_n[None, :] * stride_vn + offs_d[:, None], mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, kT, DOT_PREC) * qk_scale
        if HAS_BIAS:
            bias = tl.load(BIAS + offs_m[:, None] * stride_bm + offs_n[None, :] * stride_bn,
                           mask=row_ok[:, None] & key_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        visible = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        p = tl.math.exp2(tl.where(visible, s, float("-inf")) - lse2[:, None])
        dp = _dot(do, vT, DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), DOT_PREC)
    dq = dq * scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + q_rows[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------- decode


@triton.jit(do_not_specialize=["num_splits"])
def _attn_decode_split_kernel(
    Q, K, V, SEQLENS, OP, LP,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    Sq, Hq, Hkv, GROUP, num_splits, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One program per (split, batch * kv head). Its M dimension holds the GROUP query heads of
    # this kv head times the Sq queries (row r: head hk * GROUP + r // Sq, query r % Sq), so the
    # whole group shares one read of each K/V tile. Output: the split's normalized partial out
    # and its lse, fp32, in OP (B, Hq, Sq, num_splits, HEAD_DIM) and LP (B, Hq, Sq, num_splits).
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    b64 = b.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_r < GROUP * Sq
    qi = offs_r % Sq
    h = hk * GROUP + offs_r // Sq
    h64 = h.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + qi[:, None] * stride_qm + h64[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    L = tl.load(SEQLENS + b)
    # Splits of whole key blocks; trailing splits of a short row are empty.
    split_len = tl.cdiv(tl.cdiv(L, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * split_len
    end = tl.minimum(start + split_len, L)
    K += b64 * stride_kb + hk.to(tl.int64) * stride_kh
    V += b64 * stride_vb + hk.to(tl.int64) * stride_vh
    causal_offset = L - Sq
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        key_ok = offs_n < end
        kT = tl.load(K + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                     mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                    mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        s = _dot(q, kT, DOT_PREC) * qk_scale
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= qi[:, None] + causal_offset)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC)
        m_i = m_new
    live = l_i > 0.0
    l_safe = tl.where(live, l_i, 1.0)
    lse2 = tl.where(live, m_i + tl.math.log2(l_safe), float("-inf"))  # log2 domain, combined below
    part = ((b64 * Hq + h64) * Sq + qi) * num_splits + pid_s
    tl.store(LP + part, lse2, mask=row_ok)
    tl.store(OP + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _attn_decode_combine_kernel(
    OP, LP, O, LSE, stride_ob, stride_om, stride_oh, Sq, Hq, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (batch, query head, query): the lse-weighted mean of the splits' partials.
    row = tl.program_id(0).to(tl.int64)
    b = row // (Hq * Sq)
    h = (row // Sq) % Hq
    i = row % Sq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse2 = tl.load(LP + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse2 - m_safe)  # empty splits weigh 0
    total = tl.sum(w, axis=0)
    o = tl.load(OP + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    live = total > 0.0
    total_safe = tl.where(live, total, 1.0)
    out = tl.sum(o * w[:, None], axis=0) / total_safe
    lse = tl.where(live, (m_safe + tl.math.log2(total_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * stride_ob + i * stride_om + h * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    tl.store(LSE + row, lse)


# ----------------------------------------------------------------------------- configs


def _on_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu"


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _dot_prec(dtype: torch.dtype) -> Optional[str]:
    return "ieee" if dtype == torch.float32 else None


def _fwd_config(D: int, dtype: torch.dtype, cpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Hopper (and Ampere) shapes per head dim: a
    128-query tile amortizes K/V reads over more rows; 8 warps keep 16 rows per warp for the
    m16 MMA; D = 256 halves the query tile (the fp32 acc and q grow with D). Chosen so that ptxas
    reports no spills for sm_90 (python tests/triton_gpu_compile.py 90 --regs); the same shapes
    spill up to ~150 bytes on sm_80 (kept: one config for both, no CUDA query)."""
    if cpu:
        return CPU_FWD_BLOCK[0], CPU_FWD_BLOCK[1], 4, 1
    bd = _block_d(D)
    if dtype == torch.float32:
        return 16, 16, 4, 1  # ieee dots run on FMA units: larger tiles spill (ptxas, sm_90)
    if bd <= 64:
        return 128, 64, 4, 3
    if bd <= 128:
        return 128, 64, 8, 3
    return 64, 64, 8, 2  # sm_90: 229 registers, no spills (64 x 32 with 4 or 8 warps spilled)


def _bwd_config(D: int, dtype: torch.dtype, cpu: bool) -> tuple[int, int, int, int, int, int]:
    """(dK/dV: BLOCK_M, BLOCK_N; dQ: BLOCK_M, BLOCK_N; num_warps, num_stages). The dK/dV program
    keeps k, v, dk, dv of a key block resident (wide BLOCK_N) and streams narrow query blocks; the
    dQ program the reverse."""
    if cpu:
        bm, bn = CPU_BWD_BLOCK
        return bm, bn, bm, bn, 4, 1
    bd = _block_d(D)
    if dtype == torch.float32:
        return (16, 32, 32, 16, 4, 1) if bd <= 128 else (16, 16, 16, 16, 4, 1)
    if bd <= 64:
        return 32, 64, 64, 32, 4, 2
    if bd <= 128:
        return 32, 64, 64, 32, 8, 2
    return 16, 32, 32, 16, 8, 1


def _decode_config(D: int, cpu: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the split kernel: the M side is small, so the program
    is a K/V stream; deeper pipelining hides its latency."""
    if cpu:
        return CPU_DECODE_BLOCK_N, 4, 1
    if _block_d(D) <= 64:
        return 64, 4, 3
    if _block_d(D) <= 128:
        return 64, 4, 2
    return 32, 8, 2


def _heads(q: Tensor, k: Tensor) -> tuple[int, int, int]:
    Hq, Hkv = q.shape[-2], k.shape[-2]
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"lmkern.kernels.attention: {Hq} query heads is not a multiple of {Hkv} kv heads")
    return Hq, Hkv, Hq // Hkv


def _check_last_stride(*tensors: Optional[Tensor]) -> None:
    for t in tensors:
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"lmkern.kernels.attention: the head dim must have stride 1, got strides {t.stride()}")


def _strides3(t: Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) strides: dense (B, S, H, D), or packed (total, H, D) with batch stride 0."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _layout(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, bias):
    """(varlen, B, Sq_dense, Sk_dense, grid Sq, grid Sk, lse strides) of an attention call."""
    varlen = cu_seqlens_q is not None
    if varlen != (cu_seqlens_k is not None):
        raise ValueError("lmkern.kernels.attention: give both cu_seqlens_q and cu_seqlens_k, or neither")
    if varlen:
        if bias is not None or seqused_k is not None:
            raise ValueError("lmkern.kernels.attention: bias and seqused_k are dense-only")
        B = cu_seqlens_q.shape[0] - 1
        total_q = q.shape[0]
        return True, B, 0, 0, int(max_seqlen_q), int(max_seqlen_k), (0, total_q)
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    Hq = q.shape[2]
    return False, B, Sq, Sk, Sq, Sk, (Hq * Sq, Sq)


def _bias_strides(bias: Optional[Tensor]) -> tuple[int, int, int, int]:
    return tuple(bias.stride()) if bias is not None else (0, 0, 0, 0)


# ----------------------------------------------------------------------------- launchers


def attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    seqused_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    causal_top_left: bool,
    scale: float,
    out: Tensor,
    lse: Tensor,
) -> None:
    """FlashAttention-2 forward into out (q's shape and dtype, contiguous) and lse (fp32; (B, Hq,
    Sq) dense, (Hq, total_q) packed). Layouts and conventions: the module docstring and
    csrc/registration.cpp. Packed rows past cu_seqlens_q[-1] are not written."""
    _check_last_stride(q, k, v)
    Hq, Hkv, group = _heads(q, k)
    D = q.shape[-1]
    varlen, B, Sq, Sk, grid_q, _, (slb, slh) = _layout(
        q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, bias)
    if B == 0 or grid_q == 0 or Hq == 0 or q.numel() == 0:
        return
    block_m, block_n, num_warps, num_stages = _fwd_config(D, q.dtype, _on_cpu(q))
    grid = (triton.cdiv(grid_q, block_m), B * Hq)
    wrap_triton(_attn_fwd_kernel)[grid](
        q, k, v, bias, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_bias_strides(bias),
        *_strides3(out, varlen), slb, slh,
        Sq, Sk, Hq, group, float(scale) * LOG2E,
        VARLEN=varlen, HAS_SEQUSED=seqused_k is not None, HAS_BIAS=bias is not None, CAUSAL=bool(causal),
        TOP_LEFT=bool(causal_top_left), HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        DOT_PREC=_dot_prec(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )


def attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    seqused_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    causal_top_left: bool,
    scale: float,
    dq: Tensor,
    dk: Tensor,
    dv: Tensor,
) -> None:
    """FlashAttention-2 backward into dq, dk, dv (contiguous, shaped and typed as q, k, v). P is
    recomputed from lse; the bias gets no gradient. Keys past seqused_k get zero dk/dv. Packed
    rows past cu_seqlens_*[-1] are not written."""
    _check_last_stride(grad_out, q, k, v, out)
    Hq, Hkv, group = _heads(q, k)
    D = q.shape[-1]
    varlen, B, Sq, Sk, grid_q, grid_k, (slb, slh) = _layout(
        q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, bias)
    if B == 0 or Hq == 0 or D == 0:
        return
    cpu = _on_cpu(q)
    bm_kv, bn_kv, bm_q, bn_q, num_warps, num_stages = _bwd_config(D, q.dtype, cpu)
    block_d = _block_d(D)
    prec = _dot_prec(q.dtype)
    common = dict(VARLEN=varlen, HAS_SEQUSED=seqused_k is not None, HAS_BIAS=bias is not None,
                  CAUSAL=bool(causal), TOP_LEFT=bool(causal_top_left), HEAD_DIM=D, BLOCK_D=block_d,
                  DOT_PREC=prec, num_warps=num_warps, num_stages=num_stages)
    qs, ks, vs = _strides3(q, varlen), _strides3(k, varlen), _strides3(v, varlen)
    dos = _strides3(grad_out, varlen)
    bs = _bias_strides(bias)
    if grid_k > 0:
        # Every key slot is written (zeros where no query reads it), also when there are no queries.
        grid = (triton.cdiv(grid_k, bn_kv), B * Hkv)
        delta = torch.empty_like(lse)
        if grid_q > 0:
            pre_m = 16 if cpu else max(16, 4096 // block_d)  # ~32 elements of each input per thread
            wrap_triton(_attn_bwd_preprocess_kernel)[(triton.cdiv(grid_q, pre_m), B * Hq)](
                out, grad_out, delta, cu_seqlens_q, *_strides3(out, varlen), *dos, slb, slh, Sq, Hq,
                VARLEN=varlen, HEAD_DIM=D, BLOCK_M=pre_m, BLOCK_D=block_d, num_warps=4,
            )
        wrap_triton(_attn_bwd_dkdv_kernel)[grid](
            q, k, v, bias, grad_out, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_k,
            *qs, *ks, *vs, *bs, *dos, *_strides3(dk, varlen), *_strides3(dv, varlen), slb, slh,
            Sq, Sk, Hkv, group, float(scale) * LOG2E, float(scale),
            BLOCK_M=bm_kv, BLOCK_N=bn_kv, **common,
        )
    if grid_q > 0:
        if grid_k == 0:
            delta = torch.zeros_like(lse)  # no key, so P = 0: dS = 0 * (dP - delta) must not meet garbage
        wrap_triton(_attn_bwd_dq_kernel)[(triton.cdiv(grid_q, bm_q), B * Hq)](
            q, k, v, bias, grad_out, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, seqused_k,
            *qs, *ks, *vs, *bs, *dos, *_strides3(dq, varlen), slb, slh,
            Sq, Sk, Hq, group, float(scale) * LOG2E, float(scale),
            BLOCK_M=bm_q, BLOCK_N=bn_q, **common,
        )


def decode_num_splits(q: Tensor, k_cache: Tensor, block_n: int) -> int:
    """The num_splits = 0 heuristic: enough (batch, kv head, split) programs for two waves over
    the SMs, no split shorter than one key block, at most MAX_DECODE_SPLITS."""
    B, Smax, Hkv = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    if q.device.type == "cuda":
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    else:
        sms = CPU_DECODE_SPLITS
    programs = max(1, B * Hkv)
    want = triton.cdiv(2 * sms, programs)
    return max(1, min(want, triton.cdiv(max(Smax, 1), block_n), MAX_DECODE_SPLITS))


def attention_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    causal: bool,
    scale: float,
    num_splits: int,
    out: Tensor,
    lse: Tensor,
) -> None:
    """Flash-decoding: out (B, Sq, Hq, D) contiguous q-shaped and lse fp32 (B, Hq, Sq) of q over
    the first cache_seqlens[b] entries of each cache row (causal: bottom-right within them)."""
    _check_last_stride(q, k_cache, v_cache)
    Hq, Hkv, group = _heads(q, k_cache)
    B, Sq, _, D = q.shape
    if B == 0 or Sq == 0 or Hq == 0:
        return
    block_n, num_warps, num_stages = _decode_config(D, _on_cpu(q))
    if num_splits <= 0:
        num_splits = decode_num_splits(q, k_cache, block_n)
    num_splits = int(num_splits)
    block_m = max(16, triton.next_power_of_2(group * Sq))
    block_d = _block_d(D)
    o_part = torch.empty(B, Hq, Sq, num_splits, D, dtype=torch.float32, device=q.device)
    l_part = torch.empty(B, Hq, Sq, num_splits, dtype=torch.float32, device=q.device)
    wrap_triton(_attn_decode_split_kernel)[(num_splits, B * Hkv)](
        q, k_cache, v_cache, cache_seqlens, o_part, l_part,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Sq, Hq, Hkv, group, num_splits, float(scale) * LOG2E,
        CAUSAL=bool(causal), HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PREC=_dot_prec(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    block_s = max(2, triton.next_power_of_2(num_splits))  # every split's row held: ~16 values a thread
    wrap_triton(_attn_decode_combine_kernel)[(B * Hq * Sq,)](
        o_part, l_part, out, lse, out.stride(0), out.stride(1), out.stride(2), Sq, Hq, num_splits,
        HEAD_DIM=D, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=max(1, min(8, block_s * block_d // 512)),
    )
