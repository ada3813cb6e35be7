"""Attention in Triton: FlashAttention-2 forward and backward (dense, varlen, GQA, causal, additive
bias, seqused_k) and split-KV decoding against a KV cache.

Contract: csrc/registration.cpp (attention_fwd / attention_decode schemas); the truth is
lmkern/reference/attention.py. Conventions shared by every kernel here:

* Scores live in the log2 domain: s2 = (q . k) * scale * log2(e) (+ bias * log2(e)), so the
  softmax uses exp2; lse is converted back to natural log when stored.
* Online softmax in fp32 with the running max guarded against -inf: a row that has seen no
  visible key keeps m = -inf and is shifted by 0, so exp2(-inf) = 0 and nothing becomes NaN.
  A row that ends with no visible key stores out 0 and lse -inf; the backward treats a row max
  of -inf as "contributes nothing".
* The forward also stores each row's max and log2 of its sum (stats) for the backward, which
  recomputes P = exp2((s2 - max) - log_sum): at scores near float32's min lse has lost log_sum.
* Head dims are padded to a power of two >= 16 (BLOCK_D) with masked loads; every load past a
  sequence length is masked, so keys beyond seqused_k / cache_seqlens are never read.
* Causal: key j is visible to query i iff j <= i + offset, offset = 0 (top-left) or
  Sk_b - Sq_b (bottom-right). Loop bounds skip key (query) blocks that no row can see, and the
  forward runs the blocks every row fully sees without any masking arithmetic.
* Packed, the grids are sized by the max_seqlen hints, which torch.compile cannot check against
  cu_seqlens: the programs stride over a sequence's row (key) blocks, so a short hint costs time,
  not rows. Dense, each program takes one block, as the grid covers the sequence.
* Packed rows outside every sequence (before cu_seqlens[0], from cu_seqlens[-1] on; only
  torch.compile, which skips the host check, lets them through) are written as the reference
  has them, out 0, lse -inf, zero gradients, by one extra batch of programs per launch; the
  grid stays host-sync free and the programs of the sequences do not change.

The launchers are plain functions over preallocated outputs; lmkern/ops/attention.py wraps them
in torch.library.triton_op (with autograd), hence every launch goes through wrap_triton.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import autotune

LOG2E = 1.4426950408889634

# Tile shapes under Triton's CPU interpreter (CPU tensors), read at call time: small, so that the
# interpreter stays fast and the tests cross several blocks with short sequences.
CPU_FWD_BLOCK = (16, 16)  # (BLOCK_M queries, BLOCK_N keys)
CPU_BWD_BLOCK = (16, 16)
CPU_DECODE_BLOCK_N = 16
CPU_DECODE_SPLITS = 4  # stands in for the SM count in the num_splits heuristic on CPU tensors
MAX_DECODE_SPLITS = 128


# ----------------------------------------------------------------------------- shared pieces
#
# Every kernel addresses a tile as base + rows * row_stride + columns: the base (batch, head, first
# row of the sequence) in 64 bits, so packed and batched tensors may exceed 2^31 elements; offsets
# within one sequence in 32 bits, as in every key/query loop. The helpers inline.


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    """fp32-accumulating tl.dot; DOT_PREC "ieee" keeps fp32 inputs fp32-accurate (not tf32)."""
    if DOT_PREC == "ieee":
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _program_ids(HEADS):
    """(row block, batch b, head h) of a program on the grid (row blocks, batch * HEADS)."""
    pid_bh = tl.program_id(1)
    return tl.program_id(0), pid_bh // HEADS, pid_bh % HEADS


@triton.jit
def _seq_bounds(CU, SEQUSED, b, dense_len, VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr):
    """(start row, length) of sequence b: packed rows cu[b]:cu[b+1] (dense_len: the packed row
    count), or dense [0, dense_len) (cut to seqused[b] when given). Clamped into the tensor: under
    torch.compile no host check has looked at cu_seqlens / seqused, and a kernel never reads or
    writes outside its tensors whatever they hold."""
    if VARLEN:
        start = tl.minimum(tl.maximum(tl.load(CU + b), 0), dense_len)
        length = tl.minimum(tl.maximum(tl.load(CU + b + 1), start), dense_len) - start
    else:
        start = tl.full([], 0, tl.int32)
        length = dense_len
        if HAS_SEQUSED:
            length = tl.minimum(tl.maximum(tl.load(SEQUSED + b), 0), dense_len)
    return start, length


@triton.jit
def _qk_bounds(CU_Q, CU_K, SEQUSED_K, b, seqlen_q_dense, seqlen_k_dense, VARLEN: tl.constexpr,
               HAS_SEQUSED: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of sequence b (see _seq_bounds)."""
    q_start, seqlen_q = _seq_bounds(CU_Q, CU_Q, b, seqlen_q_dense, VARLEN, False)
    k_start, seqlen_k = _seq_bounds(CU_K, SEQUSED_K, b, seqlen_k_dense, VARLEN, HAS_SEQUSED)
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _head_base(P, b, h, stride_b, stride_h):
    return P + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _seq_base(P, b, h, start, stride_b, stride_h, stride_row):
    """P at the first row (start) of batch b's sequence in head h."""
    return _head_base(P, b, h, stride_b, stride_h) + start.to(tl.int64) * stride_row


@triton.jit
def _tile_offsets(start, length, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(rows, rows < length, head-dim columns, columns < HEAD_DIM) of the row block at start."""
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    return offs, offs < length, offs_d, offs_d < HEAD_DIM


@triton.jit
def _load_rows(P, rows, stride_row, row_ok, offs_d, d_ok):
    """A (rows x head dim) tile, zeros where masked."""
    return tl.load(P + rows[:, None] * stride_row + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _store_rows(P, rows, stride_row, row_ok, offs_d, d_ok, x):
    tl.store(P + rows[:, None] * stride_row + offs_d[None, :], x.to(P.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _fill_rows(P, lo, hi, stride_row, VALUE: tl.constexpr, WIDTH: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_W: tl.constexpr):
    """P[r, :WIDTH] = VALUE for the rows r in [lo, hi), row blocks strided over the grid's first
    dimension (sized by max_seqlen, which does not bound these rows)."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_w = tl.arange(0, BLOCK_W)
    fill = tl.full([BLOCK_R, BLOCK_W], VALUE, P.dtype.element_ty)
    for r0 in range(lo + tl.program_id(0) * BLOCK_R, hi, tl.num_programs(0) * BLOCK_R):
        rows = r0 + offs_r
        tl.store(P + rows.to(tl.int64)[:, None] * stride_row + offs_w[None, :], fill,
                 mask=(rows < hi)[:, None] & (offs_w < WIDTH)[None, :])


@triton.jit
def _fill_unowned_rows(P, CU, num_seqs, total_rows, stride_row, VALUE: tl.constexpr, WIDTH: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """Packed rows that belong to no sequence, [0, CU[0]) and [CU[num_seqs], total_rows), get what
    the reference gives them (out 0, lse -inf, zero gradients). torch.compile skips the host check
    that cu_seqlens spans the packed tensor, so such rows reach the kernels."""
    first = tl.minimum(tl.maximum(tl.load(CU), 0), total_rows)  # clamped as in _seq_bounds
    last = tl.minimum(tl.maximum(tl.load(CU + num_seqs), first), total_rows)
    _fill_rows(P, 0, first, stride_row, VALUE, WIDTH, BLOCK_R, BLOCK_W)
    _fill_rows(P, last, total_rows, stride_row, VALUE, WIDTH, BLOCK_R, BLOCK_W)


@triton.jit
def _causal_offset(seqlen_q, seqlen_k, TOP_LEFT: tl.constexpr):
    if TOP_LEFT:
        return 0
    else:
        return seqlen_k - seqlen_q


@triton.jit
def _bias_log2(BIAS, rows, cols, stride_row, stride_col, mask):
    """A tile of the additive bias, fp32, in the log2 domain of the scores. A finite bias below
    -2.3e38 (Hugging Face masks with float32's min) would overflow to -inf once times log2(e) and
    read as "no key": it is raised to -2.3e38, which still weighs nothing beside any ordinary
    score, so a row of only such values attends its keys uniformly, as torch does. -inf stays."""
    bias = tl.load(BIAS + rows[:, None] * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)
    bias = bias.to(tl.float32)
    bias = tl.where((bias < -2.3e38) & (bias != float("-inf")), -2.3e38, bias)
    return bias * 1.4426950408889634


@triton.jit
def _online_softmax(acc, l_i, m_i, s, v, DOT_PREC: tl.constexpr):
    """Folds a block of log2-domain scores s (-inf where hidden) and its values v into the running
    (acc, row sum l_i, row max m_i)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # Rows that have seen no visible key yet are shifted by 0: exp2(-inf - 0) = 0, never NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _softmax_result(acc, l_i, m_i):
    """(out, lse, row max, log2 of the row sum) of the running softmax, lse and max in the log2
    domain; a row that saw no key: 0, -inf, -inf and 0. l_i == 0 only for such a row (otherwise
    its max scores exp2(0) = 1); a NaN l_i (NaN among the scores) keeps its NaN, in the output,
    the lse and the max (which the NaN scores may have left at -inf, the mark of a row without
    keys), as the reference does."""
    live = l_i != 0.0
    l_safe = tl.where(live, l_i, 1.0)
    log_sum = tl.math.log2(l_safe)
    m = tl.where(l_i == l_i, m_i, l_i)
    return acc / l_safe[:, None], tl.where(live, m_i + log_sum, float("-inf")), m, log_sum


@triton.jit
def _load_row_stats(STATS, rows, row_ok, stride_stat):
    """The forward's (row max, log2 row sum), log2 domain, of the given rows, for the backward's
    P = exp2((s - max) - log_sum). Not exp2(s - lse): where scores are near float32's min (Hugging
    Face's masks) lse = max + log_sum rounds to max. The max is +inf where it was -inf (a row that
    saw no key, or padding), so that its P is 0."""
    m = tl.load(STATS + rows, mask=row_ok, other=float("-inf"))
    log_sum = tl.load(STATS + stride_stat + rows, mask=row_ok, other=0.0)
    return tl.where(m == float("-inf"), float("inf"), m), log_sum


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_block(
    acc, l_i, m_i, q, K, V, BIAS, start_n, offs_m, offs_n, offs_d, stride_kn, stride_vn,
    stride_bm, stride_bn, seqlen_q, seqlen_k, causal_offset, qk_scale,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    DOT_PREC: tl.constexpr, TMA: tl.constexpr,
):
    """One key block of the online softmax. MASKED = False: the caller guarantees every key of
    the block exists and is visible to every row (no masking arithmetic at all). TMA: K and V
    are tensor descriptors over the sequence's (keys, HEAD_DIM), which fill rows past the
    sequence and columns past HEAD_DIM with zeros (the scores of such keys are masked below)."""
    cols = start_n + offs_n
    d_ok = offs_d < HEAD_DIM
    if TMA:
        kT = tl.trans(K.load([start_n, 0]))
        v = V.load([start_n, 0])
    elif MASKED:
        kv_mask = (cols < seqlen_k)[None, :] & d_ok[:, None]
        kT = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None], mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=tl.trans(kv_mask), other=0.0)
    else:
        kT = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    s = _dot(q, kT, DOT_PREC) * qk_scale
    if HAS_BIAS:
        b_mask = (offs_m < seqlen_q)[:, None] & (cols < seqlen_k)[None, :]
        s += _bias_log2(BIAS, offs_m, cols, stride_bm, stride_bn, b_mask)
    if MASKED:
        visible = (cols < seqlen_k)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + causal_offset)
        s = tl.where(visible, s, float("-inf"))
    return _online_softmax(acc, l_i, m_i, s, v, DOT_PREC)


@triton.jit(do_not_specialize=["seqlen_q_dense", "seqlen_k_dense", "num_seqs", "total_q"])
def _attn_fwd_kernel(
    Q, K, V, BIAS, O, LSE, STATS, CU_Q, CU_K, SEQUSED_K,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_ob, stride_om, stride_oh, stride_lb, stride_lh, stride_stat,
    seqlen_q_dense, seqlen_k_dense, num_seqs, total_q, Hq, GROUP, qk_scale,
    VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    TOP_LEFT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    # One program per (query block, batch * query head); packed, one more batch of programs fills
    # the rows outside every sequence.
    pid_m, b, h = _program_ids(Hq)
    if VARLEN:
        if b == num_seqs:
            _fill_unowned_rows(O + h.to(tl.int64) * stride_oh, CU_Q, num_seqs, total_q, stride_om, 0.0,
                               HEAD_DIM, BLOCK_M, BLOCK_D)
            _fill_unowned_rows(LSE + h.to(tl.int64) * stride_lh, CU_Q, num_seqs, total_q, 1, float("-inf"),
                               1, BLOCK_M, 1)
            _fill_unowned_rows(STATS + h.to(tl.int64) * stride_lh, CU_Q, num_seqs, total_q, 1, float("-inf"),
                               1, BLOCK_M, 1)
            _fill_unowned_rows(STATS + stride_stat + h.to(tl.int64) * stride_lh, CU_Q, num_seqs, total_q, 1, 0.0,
                               1, BLOCK_M, 1)
            return
    q_start, seqlen_q, k_start, seqlen_k = _qk_bounds(
        CU_Q, CU_K, SEQUSED_K, b, seqlen_q_dense, seqlen_k_dense, VARLEN, HAS_SEQUSED)
    args = (Q, K, V, BIAS, O, LSE, STATS, b, h, h // GROUP, q_start, k_start, seqlen_q, seqlen_k,
            stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
            stride_bb, stride_bh, stride_bm, stride_bn, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
            stride_stat, qk_scale)
    if VARLEN:
        # The grid is sized by the max_seqlen_q hint, which torch.compile cannot check against
        # cu_seqlens_q: the programs stride over the row blocks, so a short hint costs time only.
        for m0 in range(pid_m * BLOCK_M, seqlen_q, tl.num_programs(0) * BLOCK_M):
            _fwd_row_block(*args, m0, HAS_BIAS, CAUSAL, TOP_LEFT, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC, TMA,
                           WARP_SPECIALIZE)
    elif pid_m * BLOCK_M < seqlen_q:  # always (the grid covers seqlen_q); ptxas allocates better with it
        _fwd_row_block(*args, pid_m * BLOCK_M, HAS_BIAS, CAUSAL, TOP_LEFT, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D,
                       DOT_PREC, TMA, WARP_SPECIALIZE)


@triton.jit
def _fwd_row_block(
    Q, K, V, BIAS, O, LSE, STATS, b, h, hk, q_start, k_start, seqlen_q, seqlen_k,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
    stride_stat, qk_scale, m0,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, TOP_LEFT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """Query rows [m0, m0 + BLOCK_M) of sequence b in head h (kv head hk); m0 < seqlen_q.
    TMA: Q, K and V are read through tensor descriptors (Hopper's TMA engine does the address
    arithmetic and bounds: far fewer registers than pointer tiles), one per sequence and head.
    WARP_SPECIALIZE: one masked key loop that Triton splits into producer and consumer warps."""
    offs_m, row_ok, offs_d, d_ok = _tile_offsets(m0, seqlen_q, BLOCK_M, BLOCK_D, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    Q = _seq_base(Q, b, h, q_start, stride_qb, stride_qh, stride_qm)
    K = _seq_base(K, b, hk, k_start, stride_kb, stride_kh, stride_kn)
    V = _seq_base(V, b, hk, k_start, stride_vb, stride_vh, stride_vn)
    if TMA:
        q = tl.make_tensor_descriptor(Q, shape=[seqlen_q, HEAD_DIM], strides=[stride_qm, 1],
                                      block_shape=[BLOCK_M, BLOCK_D]).load([m0, 0])
        K = tl.make_tensor_descriptor(K, shape=[seqlen_k, HEAD_DIM], strides=[stride_kn, 1],
                                      block_shape=[BLOCK_N, BLOCK_D])
        V = tl.make_tensor_descriptor(V, shape=[seqlen_k, HEAD_DIM], strides=[stride_vn, 1],
                                      block_shape=[BLOCK_N, BLOCK_D])
    else:
        q = _load_rows(Q, offs_m, stride_qm, row_ok, offs_d, d_ok)
    if HAS_BIAS:
        BIAS = _head_base(BIAS, b, h, stride_bb, stride_bh)
    causal_offset = _causal_offset(seqlen_q, seqlen_k, TOP_LEFT)

    # Key range: [0, full_hi) every row sees in full, [full_hi, hi) needs masks, beyond: skipped.
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
    if WARP_SPECIALIZE:
        # Triton's Hopper warp specialization takes a single loop: every key block masked.
        for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, K, V, BIAS, start_n, offs_m, offs_n, offs_d, stride_kn, stride_vn,
                stride_bm, stride_bn, seqlen_q, seqlen_k, causal_offset, qk_scale,
                HEAD_DIM, HAS_BIAS, CAUSAL, True, DOT_PREC, TMA,
            )
    else:
        for start_n in range(0, full_hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, K, V, BIAS, start_n, offs_m, offs_n, offs_d, stride_kn, stride_vn,
                stride_bm, stride_bn, seqlen_q, seqlen_k, causal_offset, qk_scale,
                HEAD_DIM, HAS_BIAS, CAUSAL, False, DOT_PREC, TMA,
            )
        for start_n in range(full_hi, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_block(
                acc, l_i, m_i, q, K, V, BIAS, start_n, offs_m, offs_n, offs_d, stride_kn, stride_vn,
                stride_bm, stride_bn, seqlen_q, seqlen_k, causal_offset, qk_scale,
                HEAD_DIM, HAS_BIAS, CAUSAL, True, DOT_PREC, TMA,
            )

    out, lse2, m, log_sum = _softmax_result(acc, l_i, m_i)  # dead rows: acc is 0, so out is 0
    O = _seq_base(O, b, h, q_start, stride_ob, stride_oh, stride_om)
    _store_rows(O, offs_m, stride_om, row_ok, offs_d, d_ok, out)
    tl.store(_seq_base(LSE, b, h, q_start, stride_lb, stride_lh, 1) + offs_m, lse2 * 0.6931471805599453, mask=row_ok)
    STATS = _seq_base(STATS, b, h, q_start, stride_lb, stride_lh, 1)
    tl.store(STATS + offs_m, m, mask=row_ok)
    tl.store(STATS + stride_stat + offs_m, log_sum, mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["seqlen_q_dense"])
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q,
    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh, stride_lb, stride_lh,
    seqlen_q_dense, Hq,
    VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = rowsum(dO_i * O_i) in fp32, laid out as lse."""
    pid_m, b, h = _program_ids(Hq)
    q_start, seqlen_q = _seq_bounds(CU_Q, CU_Q, b, seqlen_q_dense, VARLEN, False)
    O = _head_base(O, b, h, stride_ob, stride_oh)
    DO = _head_base(DO, b, h, stride_dob, stride_doh)
    DELTA = _head_base(DELTA, b, h, stride_lb, stride_lh)
    # The programs stride over the row blocks: packed, the grid follows the max_seqlen_q hint,
    # which may fall short of the longest sequence (dense, each program takes one block).
    for m0 in range(pid_m * BLOCK_M, seqlen_q, tl.num_programs(0) * BLOCK_M):
        offs_m, row_ok, offs_d, d_ok = _tile_offsets(m0, seqlen_q, BLOCK_M, BLOCK_D, HEAD_DIM)
        rows = q_start.to(tl.int64) + offs_m  # 64-bit rows: 32-bit ones cost 24 more registers on sm_80 (ptxas)
        o = _load_rows(O, rows, stride_om, row_ok, offs_d, d_ok)
        do = _load_rows(DO, rows, stride_dom, row_ok, offs_d, d_ok)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + rows, delta, mask=row_ok)


@triton.jit(do_not_specialize=["seqlen_q_dense", "seqlen_k_dense", "num_seqs", "total_k"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, BIAS, DO, STATS, DELTA, DK, DV, CU_Q, CU_K, SEQUSED_K,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, stride_lb, stride_lh, stride_stat,
    seqlen_q_dense, seqlen_k_dense, num_seqs, total_k, Hkv, GROUP, qk_scale, scale,
    VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    TOP_LEFT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One program per (key block, batch * kv head); it loops over the GROUP query heads that read
    # this kv head and over their query blocks, so dK/dV are summed in registers (no atomics).
    # Everything is computed transposed (keys along rows): sT = k q^T, pT, dpT = v dO^T.
    pid_n, b, hk = _program_ids(Hkv)
    if VARLEN:
        if b == num_seqs:  # the packed key rows outside every sequence
            _fill_unowned_rows(DK + hk.to(tl.int64) * stride_dkh, CU_K, num_seqs, total_k, stride_dkn, 0.0,
                               HEAD_DIM, BLOCK_N, BLOCK_D)
            _fill_unowned_rows(DV + hk.to(tl.int64) * stride_dvh, CU_K, num_seqs, total_k, stride_dvn, 0.0,
                               HEAD_DIM, BLOCK_N, BLOCK_D)
            return
    q_start, seqlen_q, k_start, seqlen_k = _qk_bounds(
        CU_Q, CU_K, SEQUSED_K, b, seqlen_q_dense, seqlen_k_dense, VARLEN, HAS_SEQUSED)
    if VARLEN:
        # The programs stride over the sequence's key blocks: the grid follows the max_seqlen_k
        # hint, which torch.compile cannot check against cu_seqlens_k.
        for n0 in range(pid_n * BLOCK_N, seqlen_k, tl.num_programs(0) * BLOCK_N):
            _dkdv_key_block(
                Q, K, V, BIAS, DO, STATS, DELTA, DK, DV, b, hk, n0, q_start, k_start, seqlen_q, seqlen_k, seqlen_k,
                stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn,
                stride_dkh, stride_dvb, stride_dvn, stride_dvh, stride_lb, stride_lh, stride_stat, GROUP, qk_scale, scale,
                HAS_BIAS, CAUSAL, TOP_LEFT, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
    elif pid_n * BLOCK_N < seqlen_k_dense:  # always; as in the forward, ptxas allocates better with it
        # Dense, every key slot is written: those past seqused_k get zeros.
        _dkdv_key_block(
            Q, K, V, BIAS, DO, STATS, DELTA, DK, DV, b, hk, pid_n * BLOCK_N, q_start, k_start, seqlen_q, seqlen_k,
            seqlen_k_dense, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
            stride_vh, stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_dom, stride_doh, stride_dkb,
            stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh, stride_lb, stride_lh, stride_stat, GROUP,
            qk_scale, scale,
            HAS_BIAS, CAUSAL, TOP_LEFT, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)


@triton.jit
def _dkdv_key_block(
    Q, K, V, BIAS, DO, STATS, DELTA, DK, DV, b, hk, n0, q_start, k_start, seqlen_q, seqlen_k, store_len,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_dom, stride_doh, stride_dkb, stride_dkn,
    stride_dkh, stride_dvb, stride_dvn, stride_dvh, stride_lb, stride_lh, stride_stat, GROUP, qk_scale, scale,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, TOP_LEFT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dK, dV of key rows [n0, n0 + BLOCK_N) of (sequence b, kv head hk), written where < store_len
    keys at or past seqlen_k read nothing and get zeros."""
    offs_n, key_ok, offs_d, d_ok = _tile_offsets(n0, seqlen_k, BLOCK_N, BLOCK_D, HEAD_DIM)
    offs_m0 = tl.arange(0, BLOCK_M)
    # 64-bit key rows here (ptxas spills this kernel on sm_90 when they are 32-bit offsets from a shifted base)
    k_rows = k_start.to(tl.int64) + offs_n
    k = _load_rows(_head_base(K, b, hk, stride_kb, stride_kh), k_rows, stride_kn, key_ok, offs_d, d_ok)
    v = _load_rows(_head_base(V, b, hk, stride_vb, stride_vh), k_rows, stride_vn, key_ok, offs_d, d_ok)
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
    for g in range(0, GROUP):
        h = hk * GROUP + g
        Qh = _seq_base(Q, b, h, q_start, stride_qb, stride_qh, stride_qm)
        DOh = _seq_base(DO, b, h, q_start, stride_dob, stride_doh, stride_dom)
        Sh = _seq_base(STATS, b, h, q_start, stride_lb, stride_lh, 1)
        Dh = _seq_base(DELTA, b, h, q_start, stride_lb, stride_lh, 1)
        Bh = _head_base(BIAS, b, h, stride_bb, stride_bh) if HAS_BIAS else BIAS
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < seqlen_q
            q = _load_rows(Qh, offs_m, stride_qm, row_ok, offs_d, d_ok)
            do = _load_rows(DOh, offs_m, stride_dom, row_ok, offs_d, d_ok)
            m, log_sum = _load_row_stats(Sh, offs_m, row_ok, stride_stat)
            delta = tl.load(Dh + offs_m, mask=row_ok, other=0.0)
            sT = _dot(k, tl.trans(q), DOT_PREC) * qk_scale
            if HAS_BIAS:
                sT += _bias_log2(Bh, offs_n, offs_m, stride_bn, stride_bm, key_ok[:, None] & row_ok[None, :])
            # Masked before exp2: a hidden score may exceed the row's max (exp2 would overflow).
            visible = key_ok[:, None] & row_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + causal_offset)
            pT = tl.math.exp2((tl.where(visible, sT, float("-inf")) - m[None, :]) - log_sum[None, :])
            dv += _dot(pT.to(do.dtype), do, DOT_PREC)
            dpT = _dot(v, tl.trans(do), DOT_PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += _dot(dsT.to(q.dtype), q, DOT_PREC)

    store_ok = offs_n < store_len
    _store_rows(_head_base(DK, b, hk, stride_dkb, stride_dkh), k_rows, stride_dkn, store_ok, offs_d, d_ok, dk * scale)
    _store_rows(_head_base(DV, b, hk, stride_dvb, stride_dvh), k_rows, stride_dvn, store_ok, offs_d, d_ok, dv)


@triton.jit(do_not_specialize=["seqlen_q_dense", "seqlen_k_dense", "num_seqs", "total_q"])
def _attn_bwd_dq_kernel(
    Q, K, V, BIAS, DO, STATS, DELTA, DQ, CU_Q, CU_K, SEQUSED_K,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh, stride_stat,
    seqlen_q_dense, seqlen_k_dense, num_seqs, total_q, Hq, GROUP, qk_scale, scale,
    VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    TOP_LEFT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One program per (query block, batch * query head): dQ = scale * dS K summed over key blocks
    # in registers (deterministic; no atomics).
    pid_m, b, h = _program_ids(Hq)
    if VARLEN:
        if b == num_seqs:  # the packed query rows outside every sequence
            _fill_unowned_rows(DQ + h.to(tl.int64) * stride_dqh, CU_Q, num_seqs, total_q, stride_dqm, 0.0,
                               HEAD_DIM, BLOCK_M, BLOCK_D)
            return
    q_start, seqlen_q, k_start, seqlen_k = _qk_bounds(
        CU_Q, CU_K, SEQUSED_K, b, seqlen_q_dense, seqlen_k_dense, VARLEN, HAS_SEQUSED)
    args = (Q, K, V, BIAS, DO, STATS, DELTA, DQ, b, h, h // GROUP, q_start, k_start, seqlen_q, seqlen_k,
            stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
            stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_dom, stride_doh,
            stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh, stride_stat, qk_scale, scale)
    if VARLEN:
        # The programs stride over the row blocks (the grid follows the max_seqlen_q hint).
        for m0 in range(pid_m * BLOCK_M, seqlen_q, tl.num_programs(0) * BLOCK_M):
            _dq_row_block(*args, m0, HAS_BIAS, CAUSAL, TOP_LEFT, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
    elif pid_m * BLOCK_M < seqlen_q:  # always (the grid covers seqlen_q); ptxas allocates better with it
        _dq_row_block(*args, pid_m * BLOCK_M, HAS_BIAS, CAUSAL, TOP_LEFT, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D,
                      DOT_PREC)


@triton.jit
def _dq_row_block(
    Q, K, V, BIAS, DO, STATS, DELTA, DQ, b, h, hk, q_start, k_start, seqlen_q, seqlen_k,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_bb, stride_bh, stride_bm, stride_bn, stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh, stride_stat, qk_scale, scale, m0,
    HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, TOP_LEFT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dQ of query rows [m0, m0 + BLOCK_M) of sequence b in head h (kv head hk); m0 < seqlen_q."""
    offs_m, row_ok, offs_d, d_ok = _tile_offsets(m0, seqlen_q, BLOCK_M, BLOCK_D, HEAD_DIM)
    offs_n0 = tl.arange(0, BLOCK_N)
    Q = _seq_base(Q, b, h, q_start, stride_qb, stride_qh, stride_qm)
    DO = _seq_base(DO, b, h, q_start, stride_dob, stride_doh, stride_dom)
    q = _load_rows(Q, offs_m, stride_qm, row_ok, offs_d, d_ok)
    do = _load_rows(DO, offs_m, stride_dom, row_ok, offs_d, d_ok)
    m, log_sum = _load_row_stats(_seq_base(STATS, b, h, q_start, stride_lb, stride_lh, 1), offs_m, row_ok, stride_stat)
    delta = tl.load(_seq_base(DELTA, b, h, q_start, stride_lb, stride_lh, 1) + offs_m, mask=row_ok, other=0.0)
    K = _seq_base(K, b, hk, k_start, stride_kb, stride_kh, stride_kn)
    V = _seq_base(V, b, hk, k_start, stride_vb, stride_vh, stride_vn)
    if HAS_BIAS:
        BIAS = _head_base(BIAS, b, h, stride_bb, stride_bh)

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
            s += _bias_log2(BIAS, offs_m, offs_n, stride_bm, stride_bn, row_ok[:, None] & key_ok[None, :])
        visible = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
        p = tl.math.exp2((tl.where(visible, s, float("-inf")) - m[:, None]) - log_sum[:, None])
        dp = _dot(do, vT, DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kT.dtype), tl.trans(kT), DOT_PREC)
    _store_rows(_seq_base(DQ, b, h, q_start, stride_dqb, stride_dqh, stride_dqm), offs_m, stride_dqm, row_ok, offs_d,
                d_ok, dq * scale)


# ----------------------------------------------------------------------------- decode


@triton.jit(do_not_specialize=["num_splits"])
def _attn_decode_split_kernel(
    Q, K, V, SEQLENS, OP, LP,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    Sq, Hq, Hkv, GROUP, num_splits, Smax, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # One program per (split, batch * kv head). Its M dimension holds the GROUP query heads of
    # this kv head times the Sq queries (row r: head hk * GROUP + r // Sq, query r % Sq), so the
    # whole group shares one read of each K/V tile. Output: the split's normalized partial out
    # and its lse, fp32, in OP (B, Hq, Sq, num_splits, HEAD_DIM) and LP (B, Hq, Sq, num_splits).
    pid_s, b, hk = _program_ids(Hkv)
    b64 = b.to(tl.int64)
    offs_r, row_ok, offs_d, d_ok = _tile_offsets(0, GROUP * Sq, BLOCK_M, BLOCK_D, HEAD_DIM)
    offs_n0 = tl.arange(0, BLOCK_N)
    qi = offs_r % Sq
    h = hk * GROUP + offs_r // Sq
    h64 = h.to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + qi[:, None] * stride_qm + h64[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    L = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), Smax)  # clamped as in _seq_bounds
    # Splits of whole key blocks; trailing splits of a short row are empty.
    split_len = tl.cdiv(tl.cdiv(L, num_splits), BLOCK_N) * BLOCK_N
    start = pid_s * split_len
    end = tl.minimum(start + split_len, L)
    K = _head_base(K, b, hk, stride_kb, stride_kh)
    V = _head_base(V, b, hk, stride_vb, stride_vh)
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
        acc, l_i, m_i = _online_softmax(acc, l_i, m_i, tl.where(visible, s, float("-inf")), v, DOT_PREC)
    out, lse2, _, _ = _softmax_result(acc, l_i, m_i)  # lse2 stays in the log2 domain, combined below
    part = ((b64 * Hq + h64) * Sq + qi) * num_splits + pid_s
    tl.store(LP + part, lse2, mask=row_ok)
    tl.store(OP + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])


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
    live = total != 0.0  # 0: no split saw a key; NaN stays NaN (as in _softmax_result)
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


class Tile(NamedTuple):
    """One launch config of a forward or backward kernel."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int
    tma: bool = False  # forward only: Q/K/V through TMA tensor descriptors (sm_90+)
    warp_specialize: bool = False  # forward only: producer/consumer warps (one masked key loop)


class DecodeTile(NamedTuple):
    """One launch config of the split-KV decode kernel (its query side is the GQA group)."""

    block_n: int
    num_warps: int
    num_stages: int


# GPU candidates per head-dim class (BLOCK_D <= 64, <= 128, 256), fp16/bf16; the first of each
# list is the default, used without measuring (LMKERN_AUTOTUNE=0, torch.compile tracing, CUDA
# graph capture). The defaults: a 128-query tile amortizes K/V reads over more rows, 8 warps keep
# 16 rows per warp for the m16 MMA, D = 256 halves the query tile (the fp32 acc and q grow with
# D); none spills on sm_90 (python tests/triton_gpu_compile.py 90 --regs; ~150 bytes on sm_80).
# The other candidates are the shapes worth measuring against them on Hopper: the wider key tile
# and deeper pipeline (more bytes in flight), the smaller query tile (more programs when
# batch * heads is small). Each compiles for sm_80 and sm_90 (tests/triton_gpu_compile.py) and
# runs correctly in the interpreter (tests/test_attention_triton.py).
_FWD_TILES = {
    64: (Tile(128, 64, 4, 3), Tile(128, 128, 8, 3), Tile(64, 64, 4, 4), Tile(128, 64, 8, 4)),
    128: (Tile(128, 64, 8, 3), Tile(128, 128, 8, 2), Tile(64, 64, 4, 3), Tile(128, 64, 8, 4)),
    256: (Tile(64, 64, 8, 2), Tile(64, 64, 8, 3)),
}
# On sm_90+, the same kernel with Q/K/V read through TMA descriptors: far fewer registers (158
# instead of 255 at D = 128, 128 x 64, 8 warps) for twice the shared memory (the smaller D = 256
# tile: the larger ones exceed sm_90's shared memory or spill).
_FWD_TILES_TMA = {
    64: (Tile(128, 64, 8, 3, True), Tile(128, 128, 8, 2, True)),
    128: (Tile(128, 64, 8, 3, True), Tile(128, 128, 8, 2, True)),
    256: (Tile(64, 64, 8, 2, True),),
}
# And warp-specialized (dense, no bias): Triton's Hopper pass splits the key loop into a TMA
# producer warp group and two consumer groups (4 warps asked, 12 launched, registers moved to
# the consumers by setmaxnreg). It takes a single loop, so every key block is masked.
_FWD_TILES_TMA_WS = {
    64: (Tile(128, 64, 4, 2, True, True), Tile(128, 128, 4, 2, True, True)),
    128: (Tile(128, 64, 4, 2, True, True), Tile(128, 128, 4, 2, True, True)),
    256: (Tile(64, 64, 4, 2, True, True), Tile(128, 64, 4, 2, True, True)),
}
# fp32 runs its ieee dots on FMA units, where larger tiles spill (ptxas, sm_90): one config.
_FWD_TILES_FP32 = (Tile(16, 16, 4, 1),)
# The dK/dV program keeps k, v, dk, dv of a key block resident (a wide BLOCK_N) and streams
# narrow query blocks; the dQ program the reverse.
_DKDV_TILES = {
    64: (Tile(32, 64, 4, 2), Tile(64, 64, 4, 2), Tile(32, 128, 8, 2)),
    128: (Tile(32, 64, 8, 2), Tile(16, 64, 4, 2), Tile(32, 64, 8, 3)),
    256: (Tile(16, 32, 8, 1), Tile(32, 32, 8, 1)),
}
_DQ_TILES = {
    64: (Tile(64, 32, 4, 2), Tile(64, 64, 4, 2), Tile(128, 32, 8, 2), Tile(128, 64, 8, 2)),
    128: (Tile(64, 32, 8, 2), Tile(128, 32, 8, 2), Tile(64, 16, 4, 2)),
    256: (Tile(32, 16, 8, 1), Tile(32, 32, 8, 1)),
}
_DKDV_TILES_FP32 = {128: (Tile(16, 32, 4, 1),), 256: (Tile(16, 16, 4, 1),)}
_DQ_TILES_FP32 = {128: (Tile(32, 16, 4, 1),), 256: (Tile(16, 16, 4, 1),)}
# The decode split kernel is a K/V stream (its M side is small): deeper pipelining hides latency.
_DECODE_TILES = {
    64: (DecodeTile(64, 4, 3), DecodeTile(128, 4, 3), DecodeTile(32, 4, 4), DecodeTile(64, 8, 3)),
    128: (DecodeTile(64, 4, 2), DecodeTile(64, 4, 3), DecodeTile(32, 4, 3), DecodeTile(128, 8, 2)),
    256: (DecodeTile(32, 8, 2), DecodeTile(16, 4, 3), DecodeTile(32, 8, 3)),
}
_DECODE_TILES_FP32 = {64: (DecodeTile(64, 4, 3), DecodeTile(64, 8, 3)), 128: (DecodeTile(64, 4, 2),),
                      256: (DecodeTile(32, 8, 2),)}


def _d_class(D: int) -> int:
    bd = _block_d(D)
    return 64 if bd <= 64 else 128 if bd <= 128 else 256


def fwd_tiles(D: int, dtype: torch.dtype, cpu: bool, tma: bool = False, varlen: bool = False,
              bias: bool = False) -> tuple[Tile, ...]:
    """The forward's candidate configs, default first (CPU: the interpreter's one tile). tma:
    also the TMA candidates (sm_90+, inputs TMA can address: see _tma_addressable), and the
    warp-specialized ones for dense calls without a bias (Triton 3.6's pass aborts on the
    packed kernel's row loop and on the bias loads)."""
    if cpu:
        return (Tile(CPU_FWD_BLOCK[0], CPU_FWD_BLOCK[1], 4, 1),)
    if dtype == torch.float32:
        return _FWD_TILES_FP32
    d = _d_class(D)
    if not (tma and _HAS_TENSOR_DESCRIPTORS):
        return _FWD_TILES[d]
    ws = _HAS_WARP_SPECIALIZE and not varlen and not bias
    return _FWD_TILES[d] + _FWD_TILES_TMA[d] + (_FWD_TILES_TMA_WS[d] if ws else ())


def _tma_addressable(*tensors: Tensor) -> bool:
    """Whether TMA descriptors can read these (B, S, H, D) / (total, H, D) tensors on this GPU:
    sm_90+, a Triton with tensor descriptors, 16-byte aligned base addresses and strides (every
    sequence and head start is then aligned too), rows of at least 16 bytes. Fake tensors
    (torch.compile tracing): no."""
    t0 = tensors[0]
    if t0.device.type != "cuda" or not _HAS_TENSOR_DESCRIPTORS:
        return False
    from torch._subclasses.fake_tensor import is_fake

    if any(is_fake(t) for t in tensors) or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    return all(t.data_ptr() % 16 == 0 and t.shape[-1] * t.element_size() >= 16
               and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]) for t in tensors)


# Triton 3.2 (torch 2.6) has neither; the kernels reference them only under these constexprs.
_HAS_TENSOR_DESCRIPTORS = hasattr(tl, "make_tensor_descriptor")
_HAS_WARP_SPECIALIZE = "warp_specialize" in inspect.signature(tl.range.__init__).parameters


def _tma_scratch(size: int, alignment: int, stream) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a little global scratch per launch, which Triton asks
    an allocator for; none is set by default (then the launch raises). Ours is set only where
    none is (a ContextVar in Triton 3.3+)."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


def bwd_tiles(D: int, dtype: torch.dtype, cpu: bool) -> tuple[tuple[Tile, ...], tuple[Tile, ...]]:
    """(dK/dV candidates, dQ candidates), defaults first."""
    if cpu:
        tile = Tile(CPU_BWD_BLOCK[0], CPU_BWD_BLOCK[1], 4, 1)
        return (tile,), (tile,)
    if dtype == torch.float32:
        wide = 128 if _d_class(D) <= 128 else 256
        return _DKDV_TILES_FP32[wide], _DQ_TILES_FP32[wide]
    return _DKDV_TILES[_d_class(D)], _DQ_TILES[_d_class(D)]


def decode_tiles(D: int, dtype: torch.dtype, cpu: bool) -> tuple[DecodeTile, ...]:
    """The split kernel's candidate configs, default first."""
    if cpu:
        return (DecodeTile(CPU_DECODE_BLOCK_N, 4, 1),)
    return (_DECODE_TILES_FP32 if dtype == torch.float32 else _DECODE_TILES)[_d_class(D)]


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
        # the "dense" lengths of a packed call are the packed row counts (_seq_bounds clamps to them)
        return True, B, total_q, k.shape[0], int(max_seqlen_q), int(max_seqlen_k), (0, total_q)
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    Hq = q.shape[2]
    return False, B, Sq, Sk, Sq, Sk, (Hq * Sq, Sq)


def _grid(longest: int, block: int, B: int, heads: int, varlen: bool) -> tuple[int, int]:
    """(row blocks, batch * heads) of a kernel over B sequences of at most ``longest`` rows. Packed,
    one more batch of programs fills the rows outside every sequence; they may be more than
    ``longest`` (the programs stride over them) and exist also when ``longest`` is 0."""
    if varlen:
        return max(1, triton.cdiv(longest, block)), (B + 1) * heads
    return triton.cdiv(longest, block), B * heads


def _bias_strides(bias: Optional[Tensor]) -> tuple[int, int, int, int]:
    return tuple(bias.stride()) if bias is not None else (0, 0, 0, 0)


def _size_key(rows_q: int, rows_k: int, programs: int) -> tuple[int, int, int]:
    """What a tile's speed depends on besides the kernel's features: the query and key lengths
    and the batch * heads count, each bucketed to a power of two (a new length reuses its
    bucket's measurement instead of measuring again)."""
    return autotune.bucket(rows_q), autotune.bucket(rows_k), autotune.bucket(programs, 1 << 10)


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
    stats: Tensor,
    tile: Optional[Tile] = None,
) -> None:
    """FlashAttention-2 forward into out (q's shape and dtype, contiguous), lse (fp32; (B, Hq,
    Sq) dense, (Hq, total_q) packed) and stats (fp32, (2,) + lse's shape: each row's max score
    and log2 of its sum of exp2(score - max), log2 domain, for the backward). All contiguous.
    Layouts and conventions: the module docstring and csrc/registration.cpp. Packed rows outside
    every sequence (before cu_seqlens_q[0], from cu_seqlens_q[-1] on) get out 0, lse -inf and
    stats (-inf, 0), as in the reference. ``tile``: a config to launch with (tests); by default
    the measured best of fwd_tiles (kernels/autotune.py)."""
    _check_last_stride(q, k, v)
    Hq, Hkv, group = _heads(q, k)
    D = q.shape[-1]
    varlen, B, Sq, Sk, grid_q, grid_k, (slb, slh) = _layout(
        q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, bias)
    if q.numel() == 0:
        return

    def launch(t: Tile) -> None:
        if t.tma:
            _ensure_tma_allocator()
        wrap_triton(_attn_fwd_kernel)[_grid(grid_q, t.block_m, B, Hq, varlen)](
            q, k, v, bias, out, lse, stats, cu_seqlens_q, cu_seqlens_k, seqused_k,
            *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_bias_strides(bias),
            *_strides3(out, varlen), slb, slh, stats.stride(0),
            Sq, Sk, B, q.shape[0], Hq, group, float(scale) * LOG2E,
            VARLEN=varlen, HAS_SEQUSED=seqused_k is not None, HAS_BIAS=bias is not None, CAUSAL=bool(causal),
            TOP_LEFT=bool(causal_top_left), HEAD_DIM=D, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
            BLOCK_D=_block_d(D), DOT_PREC=_dot_prec(q.dtype), TMA=t.tma, WARP_SPECIALIZE=t.warp_specialize,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )

    if tile is None:
        tma = _tma_addressable(q, k, v)  # (out is written through pointers)
        key = ("attention_fwd", q.dtype, D, bool(causal), varlen, bias is not None, seqused_k is not None, tma,
               *_size_key(grid_q, grid_k, B * Hq))
        candidates = fwd_tiles(D, q.dtype, _on_cpu(q), tma, varlen, bias is not None)
        # A TMA tile is launched only where it was measured (never baked into a traced graph).
        tile = autotune.choose(key, candidates, launch, q, untimed_ok=lambda t: not t.tma)
    launch(tile)


def attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    stats: Tensor,
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
    dkdv_tile: Optional[Tile] = None,
    dq_tile: Optional[Tile] = None,
) -> None:
    """FlashAttention-2 backward into dq, dk, dv (contiguous, shaped and typed as q, k, v). P is
    recomputed from the forward's stats; the bias gets no gradient. Keys past seqused_k get zero dk/dv, and so do
    packed rows outside every sequence (dq, dk, dv), as in the reference. The dK/dV and dQ
    kernels' configs: given (tests), or each the measured best of bwd_tiles."""
    _check_last_stride(grad_out, q, k, v, out)
    Hq, Hkv, group = _heads(q, k)
    D = q.shape[-1]
    varlen, B, Sq, Sk, grid_q, grid_k, (slb, slh) = _layout(
        q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, bias)
    cpu = _on_cpu(q)
    block_d = _block_d(D)
    common = dict(VARLEN=varlen, HAS_SEQUSED=seqused_k is not None, HAS_BIAS=bias is not None,
                  CAUSAL=bool(causal), TOP_LEFT=bool(causal_top_left), HEAD_DIM=D, BLOCK_D=block_d,
                  DOT_PREC=_dot_prec(q.dtype))
    qs, ks, vs = _strides3(q, varlen), _strides3(k, varlen), _strides3(v, varlen)
    dos = _strides3(grad_out, varlen)
    bs = _bias_strides(bias)
    scales = (float(scale) * LOG2E, float(scale))
    delta = torch.empty_like(stats[0])  # read only at the query rows of sequences, which it covers
    if grid_q > 0 and q.numel() > 0:
        pre_m = 16 if cpu else max(16, 4096 // block_d)  # ~32 elements of each input per thread
        wrap_triton(_attn_bwd_preprocess_kernel)[(triton.cdiv(grid_q, pre_m), B * Hq)](
            out, grad_out, delta, cu_seqlens_q, *_strides3(out, varlen), *dos, slb, slh, Sq, Hq,
            VARLEN=varlen, HEAD_DIM=D, BLOCK_M=pre_m, BLOCK_D=block_d, num_warps=4,
        )

    def launch_dkdv(t: Tile) -> None:
        wrap_triton(_attn_bwd_dkdv_kernel)[_grid(grid_k, t.block_n, B, Hkv, varlen)](
            q, k, v, bias, grad_out, stats, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, seqused_k,
            *qs, *ks, *vs, *bs, *dos, *_strides3(dk, varlen), *_strides3(dv, varlen), slb, slh, stats.stride(0),
            Sq, Sk, B, k.shape[0], Hkv, group, *scales,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages, **common,
        )

    def launch_dq(t: Tile) -> None:
        wrap_triton(_attn_bwd_dq_kernel)[_grid(grid_q, t.block_m, B, Hq, varlen)](
            q, k, v, bias, grad_out, stats, delta, dq, cu_seqlens_q, cu_seqlens_k, seqused_k,
            *qs, *ks, *vs, *bs, *dos, *_strides3(dq, varlen), slb, slh, stats.stride(0),
            Sq, Sk, B, q.shape[0], Hq, group, *scales,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, num_warps=t.num_warps, num_stages=t.num_stages, **common,
        )

    dkdv_candidates, dq_candidates = bwd_tiles(D, q.dtype, cpu)
    key = (q.dtype, D, bool(causal), varlen, bias is not None, seqused_k is not None)
    if k.numel() > 0:
        # Every key row is written (zeros where no query reads it), also when there are no queries.
        if dkdv_tile is None:
            dkdv_tile = autotune.choose(("attention_bwd_dkdv", *key, *_size_key(grid_q, grid_k, B * Hkv)),
                                        dkdv_candidates, launch_dkdv, k)
        launch_dkdv(dkdv_tile)
    if q.numel() > 0:
        if dq_tile is None:
            dq_tile = autotune.choose(("attention_bwd_dq", *key, *_size_key(grid_q, grid_k, B * Hq)),
                                      dq_candidates, launch_dq, q)
        launch_dq(dq_tile)


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
    tile: Optional[DecodeTile] = None,
) -> None:
    """Flash-decoding: out (B, Sq, Hq, D) contiguous q-shaped and lse fp32 (B, Hq, Sq) of q over
    the first cache_seqlens[b] entries of each cache row (causal: bottom-right within them).
    ``tile``: the split kernel's config (tests); by default the measured best of decode_tiles."""
    _check_last_stride(q, k_cache, v_cache)
    Hq, Hkv, group = _heads(q, k_cache)
    B, Sq, _, D = q.shape
    if B == 0 or Sq == 0 or Hq == 0:
        return
    block_m = max(16, triton.next_power_of_2(group * Sq))
    block_d = _block_d(D)

    def launch(t: DecodeTile) -> None:
        splits = int(num_splits) if num_splits > 0 else decode_num_splits(q, k_cache, t.block_n)
        o_part = torch.empty(B, Hq, Sq, splits, D, dtype=torch.float32, device=q.device)
        l_part = torch.empty(B, Hq, Sq, splits, dtype=torch.float32, device=q.device)
        wrap_triton(_attn_decode_split_kernel)[(splits, B * Hkv)](
            q, k_cache, v_cache, cache_seqlens, o_part, l_part,
            q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            Sq, Hq, Hkv, group, splits, k_cache.shape[1], float(scale) * LOG2E,
            CAUSAL=bool(causal), HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=t.block_n, BLOCK_D=block_d,
            DOT_PREC=_dot_prec(q.dtype), num_warps=t.num_warps, num_stages=t.num_stages,
        )
        block_s = max(2, triton.next_power_of_2(splits))  # every split's row held: ~16 values a thread
        wrap_triton(_attn_decode_combine_kernel)[(B * Hq * Sq,)](
            o_part, l_part, out, lse, out.stride(0), out.stride(1), out.stride(2), Sq, Hq, splits,
            HEAD_DIM=D, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=max(1, min(8, block_s * block_d // 512)),
        )

    if tile is None:
        key = ("attention_decode", q.dtype, D, bool(causal), int(max(num_splits, 0)),
               *_size_key(group * Sq, k_cache.shape[1], B * Hkv))
        tile = autotune.choose(key, decode_tiles(D, q.dtype, _on_cpu(q)), launch, q)
    launch(tile)
