"""LayerNorm and RMSNorm in Triton, forward and backward, over the rows of an (M, N) matrix.

Contract: csrc/registration.cpp (ops) and csrc/include/lmkern/norm.h (math); the truth is
lmkern/reference/norm.py. One kernel per direction serves both norms (IS_RMS) and every optional
input (HAS_* flags); all are tl.constexpr, so each combination compiles to straight-line code.

Each kernel has two shapes, chosen by the launcher from N (SINGLE):
* single-block (N <= FWD_MAX_FUSED_N / BWD_MAX_FUSED_N): a [BLOCK_M, BLOCK_N] tile of whole rows
  is held in registers, so every input element is read once and every output written once. Short
  rows are batched (BLOCK_M > 1) so that each program moves a few KB.
* looped (longer rows): the row is streamed in BLOCK_N-wide chunks, one pass per reduction and one
  for the output (LayerNorm forward: mean, then variance of the deviations, then y; backward: the
  two row dot products, then dx). Only a few such rows are in flight per SM, so the later
  passes mostly re-read them from L2.

The launchers are plain functions over preallocated outputs; lmkern/ops/norm.py wraps them in
torch.library.triton_op, hence every launch goes through torch.library.wrap_triton.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

# Tuning knobs, read at call time (tests lower the thresholds to reach the looped path cheaply).
# Register budget: the forward keeps one fp32 tile live (x, or x + residual), the backward about
# five (x, dy, weight, dweight and dbias accumulators), so the backward leaves registers sooner.
FWD_MAX_FUSED_N = 16384  # longest row the forward holds in registers (elements, any dtype)
BWD_MAX_FUSED_N = 8192  # same for the backward
FWD_TILE_ELEMS = 4096  # single-block tile that short rows are batched up to (rows x columns)
BWD_TILE_ELEMS = 2048  # same for the backward, smaller: it keeps ~5 tiles live, not ~2
MAX_BLOCK_M = 64  # cap on rows per tile (for tiny N)
LOOP_BLOCK_N = 4096  # chunk width of the looped path
LOOP_BLOCK_M = 1  # rows per tile in the looped path (rows are long: one already fills a program)
REGS_PER_SM = 65536  # sizes the backward's persistent grid to the programs that fit at once
BWD_NUM_STAGES = 2  # software-pipeline depth of the backward's row-tile loop (single-block only)
BWD_SMEM_BUDGET = 100 * 1024  # ...when its staged loads fit in this much shared memory, else 1
CPU_PROGRAMS = 4  # backward programs under the interpreter (CPU tensors)


# ----------------------------------------------------------------------------- shared pieces


@triton.jit
def _load_tile(ptr, rows, row_stride, cols, mask, EVICT: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] tile; rows are int64 [BLOCK_M, 1] (M*N may pass 2**31), cols [1, BLOCK_N].
    Masked lanes read 0 so that they add nothing to row sums."""
    return tl.load(ptr + rows * row_stride + cols, mask=mask, other=0.0, eviction_policy=EVICT)


@triton.jit
def _load_affine(W, B, cols, N, weight_offset, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """(weight + weight_offset, bias) as fp32 [1, BLOCK_N] (0.0 when absent). Every program reads
    them, so ask the cache to keep them."""
    w = 0.0
    b = 0.0
    if HAS_W:
        w = tl.load(W + cols, mask=cols < N, other=0.0, eviction_policy="evict_last").to(tl.float32)
        w = w + weight_offset
    if HAS_B:
        b = tl.load(B + cols, mask=cols < N, other=0.0, eviction_policy="evict_last").to(tl.float32)
    return w, b


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_input(X, R, RO, rows, cols, mask, stride_x, stride_r, N,
               HAS_RES: tl.constexpr, STORE_RES: tl.constexpr, EVICT: tl.constexpr):
    """h in fp32: x, or x + residual rounded to x's dtype (as unfused code computes it), written to
    residual_out when STORE_RES. Later passes of the looped path recompute it from x and residual
    instead of reading residual_out back, so no program reads memory it wrote."""
    x = _load_tile(X, rows, stride_x, cols, mask, EVICT)
    if HAS_RES:
        r = _load_tile(R, rows, stride_r, cols, mask, EVICT)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        if STORE_RES:
            tl.store(RO + rows * N + cols, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _fwd_output(Y, rows, cols, mask, xhat, w, b, N, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """y = xhat * (weight + weight_offset) + bias (w, b from _load_affine), stored in y's dtype."""
    y = xhat
    if HAS_W:
        y = y * w
    if HAS_B:
        y = y + b
    tl.store(Y + rows * N + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])  # one compiled kernel for every batch size
def _norm_fwd_kernel(
    X, W, B, R, Y, RO, MEAN, RSTD,
    M, N, stride_x, stride_r, eps, weight_offset,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
):
    # One program per tile of BLOCK_M rows.
    row_ids = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = row_ids < M
    rows = row_ids.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)[None, :]
    if SINGLE:
        mask = row_mask[:, None] & (cols < N)
        # Read once, not reused: let it leave L1 first (weight/bias stay).
        h = _fwd_input(X, R, RO, rows, cols, mask, stride_x, stride_r, N, HAS_RES, True, "evict_first")
        if IS_RMS:
            xc = h
        else:
            mean = tl.sum(h, axis=1) / N
            # Two-pass variance from registers; masked lanes would hold -mean, zero them.
            xc = tl.where(mask, h - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
        # weight/bias only now: loaded before the reductions they would stay live through them,
        # costing occupancy at large N (ptxas: 64 -> 116 registers at N=16384 with residual).
        w, b = _load_affine(W, B, cols, N, weight_offset, HAS_W, HAS_B)
        _fwd_output(Y, rows, cols, mask, xc * rstd[:, None], w, b, N, HAS_W, HAS_B)
    else:
        # Pass 1: sum (LayerNorm) or sum of squares (RMSNorm), element-wise partial sums reduced
        # once at the end. residual_out is written here.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            m = row_mask[:, None] & (c < N)
            h = _fwd_input(X, R, RO, rows, c, m, stride_x, stride_r, N, HAS_RES, True, "")
            if IS_RMS:
                acc += h * h
            else:
                acc += h
        if IS_RMS:
            var = tl.sum(acc, axis=1) / N
        else:
            mean = tl.sum(acc, axis=1) / N
            # Pass 2 (LayerNorm): variance of the deviations from the mean, not E[x^2] - mean^2,
            # which cancels catastrophically when |mean| >> std.
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = row_mask[:, None] & (c < N)
                h = _fwd_input(X, R, RO, rows, c, m, stride_x, stride_r, N, HAS_RES, False, "")
                d = tl.where(m, h - mean[:, None], 0.0)
                acc += d * d
            var = tl.sum(acc, axis=1) / N
        rstd = tl.rsqrt(var + eps)
        # Last pass: normalize and write; the row is not read again.
        for off in range(0, N, BLOCK_N):
            c = off + cols
            m = row_mask[:, None] & (c < N)
            h = _fwd_input(X, R, RO, rows, c, m, stride_x, stride_r, N, HAS_RES, False, "evict_first")
            if IS_RMS:
                xc = h
            else:
                xc = h - mean[:, None]
            w, b = _load_affine(W, B, c, N, weight_offset, HAS_W, HAS_B)
            _fwd_output(Y, rows, c, m, xc * rstd[:, None], w, b, N, HAS_W, HAS_B)
    if not IS_RMS:
        tl.store(MEAN + row_ids, mean, mask=row_mask)
    tl.store(RSTD + row_ids, rstd, mask=row_mask)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_load(DY, X, rows, cols, mask, stride_dy, stride_x, mean, rstd, w,
              IS_RMS: tl.constexpr, HAS_W: tl.constexpr, EVICT: tl.constexpr):
    """(dy, xhat, g = dy * (weight + weight_offset)) of one tile, in fp32 (w from _load_affine)."""
    dy = _load_tile(DY, rows, stride_dy, cols, mask, EVICT).to(tl.float32)
    x = _load_tile(X, rows, stride_x, cols, mask, EVICT).to(tl.float32)
    if IS_RMS:
        xhat = x * rstd[:, None]
    else:
        xhat = (x - mean[:, None]) * rstd[:, None]
    # Masked lanes would hold -mean * rstd; keep them out of the sums and of dweight.
    xhat = tl.where(mask, xhat, 0.0)
    if HAS_W:
        g = dy * w
    else:
        g = dy
    return dy, xhat, g


@triton.jit
def _bwd_dx(DX, DRES, rows, cols, mask, stride_dres, N, g, xhat, c1, c2, rstd,
            IS_RMS: tl.constexpr, HAS_DRES: tl.constexpr):
    """dx = rstd * (g - xhat * mean(g * xhat) [- mean(g)]) + dresidual, stored in dx's dtype."""
    dx = g - xhat * c1[:, None]
    if not IS_RMS:
        dx = dx - c2[:, None]
    dx = dx * rstd[:, None]
    if HAS_DRES:
        dx = dx + _load_tile(DRES, rows, stride_dres, cols, mask, "evict_first").to(tl.float32)
    tl.store(DX + rows * N + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])
def _norm_bwd_kernel(
    DY, DRES, X, W, MEAN, RSTD, DX, DW_PART, DB_PART,
    M, N, stride_dy, stride_dres, stride_x, weight_offset,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    HAS_DRES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Persistent grid: program pid takes row tiles pid, pid + P, ... and sums its share of
    # dweight/dbias in fp32 into row pid of the [P, N] partial buffers (reduced by the launcher).
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)[None, :]
    part = pid.to(tl.int64) * N
    if SINGLE:
        # Whole rows: weight is loaded once per program, and the partial sums stay in registers
        # across tiles, written once at the end.
        w, _ = _load_affine(W, W, cols, N, weight_offset, HAS_W, False)
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # With few programs per SM (the backward is register-heavy), NUM_STAGES > 1 lets the compiler
    # prefetch the next tile (cp.async into shared memory) while this one is reduced.
    for tile in tl.range(pid, num_tiles, tl.num_programs(0), num_stages=NUM_STAGES):
        row_ids = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = row_ids < M
        rows = row_ids.to(tl.int64)[:, None]
        rstd = tl.load(RSTD + row_ids, mask=row_mask, other=0.0)
        if IS_RMS:
            mean = rstd  # unused
        else:
            mean = tl.load(MEAN + row_ids, mask=row_mask, other=0.0)
        if SINGLE:
            mask = row_mask[:, None] & (cols < N)
            dy, xhat, g = _bwd_load(DY, X, rows, cols, mask, stride_dy, stride_x, mean, rstd, w,
                                    IS_RMS, HAS_W, "evict_first")
            c1 = tl.sum(g * xhat, axis=1) / N
            c2 = tl.sum(g, axis=1) / N
            _bwd_dx(DX, DRES, rows, cols, mask, stride_dres, N, g, xhat, c1, c2, rstd, IS_RMS, HAS_DRES)
            if HAS_DW:
                dw_acc += dy * xhat
            if HAS_DB:
                db_acc += dy
        else:
            # Pass 1: the row dot products mean(g * xhat) and mean(g).
            acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = row_mask[:, None] & (c < N)
                w, _ = _load_affine(W, W, c, N, weight_offset, HAS_W, False)
                dy, xhat, g = _bwd_load(DY, X, rows, c, m, stride_dy, stride_x, mean, rstd, w,
                                        IS_RMS, HAS_W, "")
                acc1 += g * xhat
                if not IS_RMS:
                    acc2 += g
            c1 = tl.sum(acc1, axis=1) / N
            c2 = tl.sum(acc2, axis=1) / N
            # Pass 2: dx, and this tile's dweight/dbias added into the program's partial row
            # (zeroed by the launcher): the row is too long to keep the sums in registers.
            for off in range(0, N, BLOCK_N):
                c = off + cols
                m = row_mask[:, None] & (c < N)
                w, _ = _load_affine(W, W, c, N, weight_offset, HAS_W, False)
                dy, xhat, g = _bwd_load(DY, X, rows, c, m, stride_dy, stride_x, mean, rstd, w,
                                        IS_RMS, HAS_W, "evict_first")
                _bwd_dx(DX, DRES, rows, c, m, stride_dres, N, g, xhat, c1, c2, rstd, IS_RMS, HAS_DRES)
                if HAS_DW:
                    p = DW_PART + part + c
                    tl.store(p, tl.load(p, mask=c < N) + tl.sum(dy * xhat, axis=0)[None, :], mask=c < N)
                if HAS_DB:
                    p = DB_PART + part + c
                    tl.store(p, tl.load(p, mask=c < N) + tl.sum(dy, axis=0)[None, :], mask=c < N)
            # The next tile re-reads those partial rows; a reduced vector may be stored by one
            # thread and loaded by another, and a block barrier makes the stores visible.
            tl.debug_barrier()
    if SINGLE:
        if HAS_DW:
            tl.store(DW_PART + part + cols, tl.sum(dw_acc, axis=0)[None, :], mask=cols < N)
        if HAS_DB:
            tl.store(DB_PART + part + cols, tl.sum(db_acc, axis=0)[None, :], mask=cols < N)


# ----------------------------------------------------------------------------- launchers


def _config(N: int, max_fused_n: int, tile_elems: int) -> tuple[int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, SINGLE, num_warps) for rows of N elements."""
    if N <= max_fused_n:
        block_n = triton.next_power_of_2(N)
        block_m = max(1, min(MAX_BLOCK_M, tile_elems // block_n))
        single = True
    else:
        block_n, block_m, single = LOOP_BLOCK_N, LOOP_BLOCK_M, False
    # 8 elements per thread (one 16-byte access per fp16 tensor) up to 8 warps; larger tiles give
    # each thread 16 (8192 elements: 16 warps). Fewer, fatter threads would cost occupancy:
    # ptxas (sm_90) reports the backward at ~80 registers with 8 elements, ~128 with 16, ~250 with 32.
    tile = block_m * block_n
    num_warps = max(1, min(8, tile // 256)) if tile <= 2048 else max(1, min(16, tile // 512))
    return block_m, block_n, single, num_warps


def _bwd_programs_per_sm(block_m: int, block_n: int, num_warps: int) -> int:
    """How many backward programs fit on an SM at once, from the register counts above."""
    per_thread = block_m * block_n // (32 * num_warps)
    regs = 80 if per_thread <= 8 else 128 if per_thread <= 16 else 255
    return max(1, REGS_PER_SM // (regs * 32 * num_warps))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_programs(device: torch.device, programs_per_sm: int) -> int:
    """Persistent grid size: SM count (queried at call time, cached per device) times the
    programs that fit on one; a small fixed number under the interpreter."""
    if device.type != "cuda":
        return CPU_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * programs_per_sm


def _row_stride(t: Optional[Tensor], name: str) -> int:
    """Row stride of an (M, N) operand whose elements must be adjacent within a row."""
    if t is None:
        return 0
    if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"lmkern.kernels.norm: {name} must be 2-D with element stride 1, got shape "
                         f"{tuple(t.shape)} and strides {t.stride()}")
    return t.stride(0)


def norm_fwd(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    out: Tensor,
    residual_out: Optional[Tensor],
    mean: Optional[Tensor],
    rstd: Tensor,
    eps: float,
    weight_offset: float,
    is_rms: bool,
) -> None:
    """LayerNorm (is_rms=False) or RMSNorm forward into preallocated outputs.

    x, residual: (M, N), element stride 1, any row stride. weight, bias: (N,) contiguous, x's
    dtype or float32, or None. out, residual_out: (M, N) contiguous, x's dtype; residual_out is
    None iff residual is. mean (None for RMSNorm), rstd: (M,) float32.
    """
    M, N = x.shape
    stride_x, stride_r = _row_stride(x, "x"), _row_stride(residual, "residual")
    if (residual is None) != (residual_out is None) or (mean is None) != is_rms:
        raise ValueError("lmkern.kernels.norm.norm_fwd: residual_out must be given iff residual is, "
                         "and mean iff is_rms is False")
    if M == 0:
        return
    if N == 0:  # statistics of an empty row, as torch computes them (mean of nothing is NaN)
        rstd.fill_(float("nan"))
        if mean is not None:
            mean.fill_(float("nan"))
        return
    block_m, block_n, single, num_warps = _config(N, FWD_MAX_FUSED_N, FWD_TILE_ELEMS)
    wrap_triton(_norm_fwd_kernel)[(triton.cdiv(M, block_m),)](
        x, weight, bias, residual, out, residual_out, mean, rstd,
        M, N, stride_x, stride_r, float(eps), float(weight_offset),
        IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single, num_warps=num_warps,
    )


def norm_bwd(
    dy: Tensor,
    dresidual: Optional[Tensor],
    x: Tensor,
    weight: Optional[Tensor],
    mean: Optional[Tensor],
    rstd: Tensor,
    dx: Tensor,
    dweight: Optional[Tensor],
    dbias: Optional[Tensor],
    weight_offset: float,
    is_rms: bool,
) -> None:
    """Backward of norm_fwd into preallocated gradients.

    x is the normalized input (residual_out when a residual was fused); dresidual, the gradient
    arriving at residual_out, is added to dx. dy, dresidual, x: (M, N), element stride 1.
    weight: (N,) or None. mean (None for RMSNorm), rstd: (M,) float32 from the forward.
    dx: (M, N) contiguous; dweight, dbias: (N,) in weight's dtype, or None when not wanted.
    """
    M, N = x.shape
    stride_dy = _row_stride(dy, "dy")
    stride_dres = _row_stride(dresidual, "dresidual")
    stride_x = _row_stride(x, "x")
    if (mean is None) != is_rms:
        raise ValueError("lmkern.kernels.norm.norm_bwd: mean must be given iff is_rms is False")
    if M == 0 or N == 0:  # nothing to launch; a sum over no rows is zero
        for g in (dweight, dbias):
            if g is not None:
                g.zero_()
        return
    block_m, block_n, single, num_warps = _config(N, BWD_MAX_FUSED_N, BWD_TILE_ELEMS)
    per_sm = _bwd_programs_per_sm(block_m, block_n, num_warps)
    programs = min(_num_programs(x.device, per_sm), triton.cdiv(M, block_m))
    # Pipelining stages x and dy (and dresidual) through shared memory; an estimate that errs high.
    staged = BWD_NUM_STAGES * block_m * block_n * x.element_size() * (3 if dresidual is not None else 2)
    num_stages = BWD_NUM_STAGES if single and staged <= BWD_SMEM_BUDGET else 1
    wanted = [g for g in (dweight, dbias) if g is not None]
    part = None
    if wanted:
        # Single-block programs overwrite their whole partial row; looped ones accumulate into it.
        alloc = torch.empty if single else torch.zeros
        part = alloc((len(wanted), programs, N), device=x.device, dtype=torch.float32)
    wrap_triton(_norm_bwd_kernel)[(programs,)](
        dy, dresidual, x, weight, mean, rstd, dx,
        part[0] if dweight is not None else None, part[-1] if dbias is not None else None,
        M, N, stride_dy, stride_dres, stride_x, float(weight_offset),
        IS_RMS=is_rms, HAS_W=weight is not None, HAS_DW=dweight is not None, HAS_DB=dbias is not None,
        HAS_DRES=dresidual is not None, BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single,
        NUM_STAGES=num_stages, num_warps=num_warps,
    )
    if wanted:
        sums = part.sum(dim=1)  # fp32, over programs
        for i, g in enumerate(wanted):
            g.copy_(sums[i])
