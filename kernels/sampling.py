"""Fused sampling and temperature softmax in Triton over the rows of (B, V) logits.

Contract: ``lmkern::sample`` / ``lmkern::softmax`` (csrc/registration.cpp), math specified in
lmkern/reference/sampling.py, random words in csrc/include/lmkern/philox.h (``tl.philox`` computes
the same Philox4x32-10 words, bit for bit). No sort of the vocabulary: every step streams the row.

A program owns BLOCK_B rows and walks them in [BLOCK_B, BLOCK_V] tiles (many short rows per program
for small vocabularies, one row per program for large ones). Per row, ``_sample_kernel`` makes:
  pass A   validity flags (NaN / +inf / no finite logit), max, first argmax and sum of exp(x - max)
           of the raw logits (greedy rows end here: T == 0, or x_max / T overflows, see
           ``_greedy_limit``);
  top-k    the k-th largest z = x / T (counting repeats) as a threshold on the order-preserving
           uint32 image of z: a 2^RADIX_BITS-way search that fixes RADIX_BITS bits per pass,
           counting the keys at or above each pivot, and stops early once the bucket is exact;
  top-p    the same search over the top-k survivors with their probability mass (exp(z - z_max) in
           fixed point, so sums are exact and independent of the order of addition): the largest
           key at or above which the mass reaches ceil(p * total);
  race     over the survivors (key >= both thresholds, exp(z - z_max) >= min_p): the largest
           z - log(-log(u_i)), u_i from Philox at counter (i, stream), first index on ties. A tile
           none of whose tokens can beat the best key so far (the Gumbel noise is bounded) is
           skipped before its random words are made.
The logprob is log_softmax(x)[id] = x[id] - max - log(sum), from pass A.

Few long rows (small B, large V on a GPU with many SMs) take the split path instead: the same
passes over a (B, splits) grid of programs that each own a slice of a row, one launch per pass or
search level, meeting in a small workspace (see "sample, split rows" below). Same ids bit for bit.

``_softmax_kernel``: an online max / sum of exp pass, then the writes.

Launchers are plain functions over preallocated outputs; lmkern/ops/sampling.py wraps them in
torch.library.triton_op (every launch goes through torch.library.wrap_triton).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import INTERPRET

# Tile sizes (elements per [BLOCK_B, BLOCK_V] tile). The search passes hold a
# [BLOCK_B, 2^RADIX_BITS, BLOCK_V] comparison, so their tile is what bounds registers on a GPU:
# ptxas (sm_90) gives a one-row 1024 tile 145-165 registers at 4 warps, no spills; batched short
# rows cost more per element (255 registers and a 32-byte spill for 4 x 128 at 8 warps).
# The interpreter runs each tile op through numpy: larger tiles there mean fewer Python steps.
SAMPLE_TILE = 65536 if INTERPRET else 1024  # rows longer than a tile: one row per program
SAMPLE_BATCH_TILE = 65536 if INTERPRET else 512  # short rows, several per program
SOFTMAX_TILE = 65536 if INTERPRET else 4096
RADIX_BITS = 4  # 16-way search: 8 passes pin down a 32-bit key (fewer with the early exit)
MIN_BLOCK_V = 16

# -log(-log(u)) <= 16.6355 for every u uniform_open01 returns; the margin covers fp32 rounding of
# the key (the same bound as csrc/include/lmkern/sampling_math.h).
GUMBEL_MAX = 16.75


# ----------------------------------------------------------------------------- shared pieces


@triton.jit
def _load_z(X, rows64, stride_x, cols, mask, t_col):
    """fp32 z = x / T of a [BLOCK_B, BLOCK_V] tile (0 in masked lanes); t_col is T as [BLOCK_B, 1]."""
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return x / t_col


@triton.jit
def _ordered_key(z):
    """int64 in [0, 2^32): a < b as floats <=> key(a) < key(b) (non-NaN); -0 and +0 share a key,
    as the reference's float comparisons see them."""
    bits = z.to(tl.uint32, bitcast=True).to(tl.int64)
    bits = tl.where(bits == 0x80000000, 0, bits)
    return tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _fixed_mass(z, zmax, frac_scale):
    """exp(z - z_max) in [0, 1] times 2^frac_bits, rounded half up, as int64 (exact sums)."""
    # min(., 0): lanes outside the row (z = 0) must not overflow; survivors have z <= z_max anyway
    scaled = tl.exp(tl.minimum(z - zmax, 0.0)) * frac_scale  # a power-of-two scale: exact in fp32
    low = tl.floor(scaled)
    return low.to(tl.int64) + (scaled - low >= 0.5).to(tl.int64)


@triton.jit
def _row_param(Ptr, rows64, row_in, scalar, other, HAS: tl.constexpr, DTYPE: tl.constexpr, BLOCK_B: tl.constexpr):
    """A per-row parameter as [BLOCK_B]: the (B,) tensor's values when given, else the scalar."""
    if HAS:
        return tl.load(Ptr + rows64, mask=row_in, other=other)
    return tl.full([BLOCK_B], scalar, DTYPE)


@triton.jit
def _online_row_stats(x, cols, V, xmax, sumexp, imax, t):
    """Folds a [BLOCK_B, BLOCK_V] tile of logits x (NaN already replaced by -inf) into each row's
    running max, first argmax and sum of exp((x - max) / t); t is [BLOCK_B], 1 for raw logits.
    Tiles must come in increasing column order: the strict compare keeps an earlier tile's tie."""
    tile_max = tl.max(x, axis=1)
    tile_arg = tl.min(tl.where(x == tile_max[:, None], cols[None, :], V), axis=1).to(tl.int64)
    new_max = tl.maximum(xmax, tile_max)
    # +inf logits give inf - inf = NaN here, as torch.softmax does (sample rejects such rows)
    rescale = tl.where(xmax == new_max, 1.0, tl.exp((xmax - new_max) / t))
    terms = tl.where(x == float("-inf"), 0.0, tl.exp((x - new_max[:, None]) / t[:, None]))
    sumexp = sumexp * rescale + tl.sum(terms, axis=1)
    imax = tl.where(tile_max > xmax, tile_arg, imax)
    return new_max, sumexp, imax


@triton.jit
def _pivot_counts(
    X, rows64, stride_x, col_start, col_end, t_col, zmax, todo, lo, step, floor_key, frac_scale,
    BY_MASS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """One search level over columns [col_start, col_end): per row and pivot lo + j * step
    (j < 2^RADIX_BITS), the number of tokens (and, BY_MASS, their fixed-point mass) with
    key >= max(pivot, floor_key) ([BLOCK_B, 2^RADIX_BITS] int32 counts, int64 masses). Rows that
    are not `todo` count nothing. Integer sums: any split of the columns adds up to the same."""
    R: tl.constexpr = 1 << RADIX_BITS
    j = tl.arange(0, R).to(tl.int64)
    pivots = lo[:, None] + j[None, :] * step  # [BLOCK_B, R]; pivot 0 is lo, known to qualify
    counts = tl.zeros([BLOCK_B, R], dtype=tl.int32)
    masses = tl.zeros([BLOCK_B, R], dtype=tl.int64)
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = todo[:, None] & (cols < col_end)[None, :]
        z = _load_z(X, rows64, stride_x, cols, mask, t_col)
        key = _ordered_key(z)
        if BY_MASS:
            mask = mask & (key >= floor_key[:, None])
        ge = (key[:, None, :] >= pivots[:, :, None]) & mask[:, None, :]  # [BLOCK_B, R, BLOCK_V]
        counts += tl.sum(ge.to(tl.int32), axis=2)
        if BY_MASS:
            mass = _fixed_mass(z, zmax[:, None], frac_scale)
            masses += tl.sum(tl.where(ge, mass[:, None, :], 0), axis=2)
    return counts, masses


@triton.jit
def _pick_bucket(counts, quantity, need, lo, count_above, todo, step, BY_MASS: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Given a level's whole-row counts and quantity (counts, or masses BY_MASS) per pivot
    lo + j * step: the rows still `todo` move lo to the highest pivot whose quantity reaches
    `need`; returns (lo, count_above, todo) for the next level, where count_above counts the
    tokens at or above the end of lo's bucket and todo drops the rows whose answer is fixed."""
    R: tl.constexpr = 1 << RADIX_BITS
    j = tl.arange(0, R).to(tl.int64)
    best = tl.max(tl.where(quantity >= need[:, None], j[None, :], 0), axis=1)  # [BLOCK_B]
    at_best = tl.sum(tl.where(j[None, :] == best[:, None], counts, 0), axis=1)
    after = tl.sum(tl.where(j[None, :] == best[:, None] + 1, counts, 0), axis=1)
    after = tl.where(best == R - 1, count_above, after)
    quantity_at_best = tl.sum(tl.where(j[None, :] == best[:, None], quantity, 0), axis=1)
    # Done once {key >= new lo} is the answer: one token left in the bucket, or (top-k)
    # exactly `need` tokens at or above it.
    exact = at_best - after <= 1
    if not BY_MASS:
        exact = exact | (quantity_at_best == need)
    lo = tl.where(todo, lo + best * step, lo)
    count_above = tl.where(todo, after, count_above)
    return lo, count_above, todo & ~exact


@triton.jit
def _threshold_search(
    X, rows64, stride_x, V, t_col, zmax, active, need, floor_key, frac_scale,
    BY_MASS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """Per row, the largest key t with Q(t) >= need, where Q(t) counts (BY_MASS: sums the mass of)
    the tokens with key >= max(t, floor_key). Q only changes at keys present in the row, so t is one
    of them, and {key >= t} is the filter's survivor set. Requires Q(0) >= need (the caller
    guarantees it). Inactive rows return 0 (keep everything). The split path (_split_search_kernel)
    runs the same levels, one launch each."""
    lo = tl.zeros([BLOCK_B], dtype=tl.int64)
    count_above = tl.zeros([BLOCK_B], dtype=tl.int32)  # tokens with key >= lo + span
    todo = active
    step = tl.full([], 1 << (32 - RADIX_BITS), tl.int64)  # the span of one bucket at this level
    # A loop, not tl.static_range: unrolled, the levels multiplied the kernel's code (and its
    # compile time on a GPU) by 32 / RADIX_BITS.
    for level in range(32 // RADIX_BITS):
        if tl.max(todo.to(tl.int32), axis=0) > 0:
            counts, masses = _pivot_counts(
                X, rows64, stride_x, 0, V, t_col, zmax, todo, lo, step, floor_key, frac_scale,
                BY_MASS, BLOCK_B, BLOCK_V, RADIX_BITS,
            )
            quantity = masses if BY_MASS else counts
            lo, count_above, todo = _pick_bucket(counts, quantity, need, lo, count_above, todo, step, BY_MASS, RADIX_BITS)
        step = step >> RADIX_BITS
    return lo


@triton.jit
def _top_p_need(p, total):
    """ceil(p * total) in fixed point, at least 1 (the most likely token always survives)."""
    goal = p.to(tl.float64) * total.to(tl.float64)
    need = goal.to(tl.int64)
    need = need + (need.to(tl.float64) < goal).to(tl.int64)  # ceil
    return tl.maximum(need, 1)


@triton.jit
def _sample_params(
    rows, rows64, row_in, temperature, top_k, top_p, min_p, seed, Temps, TopKs, TopPs, MinPs, Seeds,
    HAS_TEMPS: tl.constexpr, HAS_TOPKS: tl.constexpr, HAS_TOPPS: tl.constexpr, HAS_MINPS: tl.constexpr,
    HAS_SEEDS: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Per row: temperature, top_k, top_p, min_p, Philox key and Philox stream."""
    T = _row_param(Temps, rows64, row_in, temperature, 1.0, HAS_TEMPS, tl.float32, BLOCK_B)
    k = _row_param(TopKs, rows64, row_in, top_k, 0, HAS_TOPKS, tl.int64, BLOCK_B)
    p = _row_param(TopPs, rows64, row_in, top_p, 1.0, HAS_TOPPS, tl.float32, BLOCK_B)
    m = _row_param(MinPs, rows64, row_in, min_p, 0.0, HAS_MINPS, tl.float32, BLOCK_B)
    row_seed = _row_param(Seeds, rows64, row_in, seed, 0, HAS_SEEDS, tl.int64, BLOCK_B)
    # per-row seeds: stream 0 (the draw depends on the row's own key only); else the row index
    stream = tl.zeros([BLOCK_B], dtype=tl.uint32) if HAS_SEEDS else rows.to(tl.uint32)
    return T, k, p, m, row_seed, stream


@triton.jit
def _pass_a(X, rows64, row_in, stride_x, col_start, col_end, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
    """Over columns [col_start, col_end) of the raw logits: max, sum of exp(x - max), first argmax
    and a flag for NaN / +inf."""
    ones = tl.full([BLOCK_B], 1.0, tl.float32)
    xmax = tl.full([BLOCK_B], float("-inf"), tl.float32)
    sumexp = tl.zeros([BLOCK_B], dtype=tl.float32)
    imax = tl.full([BLOCK_B], 0, tl.int64)
    bad = tl.zeros([BLOCK_B], dtype=tl.int1)
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = row_in[:, None] & (cols < col_end)[None, :]
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        bad = bad | (tl.max(((x != x) | (x == float("inf"))).to(tl.int32), axis=1) > 0)
        x = tl.where(x == x, x, float("-inf"))  # NaN rows are invalid; keep the max NaN-free
        xmax, sumexp, imax = _online_row_stats(x, cols, col_end, xmax, sumexp, imax, ones)
    return xmax, sumexp, imax, bad


@triton.jit
def _greedy_limit(xmax, T):
    """Rows that take the limit T -> 0, their first argmax: T == 0, or a finite x_max over T
    overflows float32 (csrc/include/lmkern/sampling_math.h, greedy_row)."""
    scaled = xmax / tl.where(T > 0, T, 1.0)
    overflows = (T > 0) & (tl.abs(xmax) < float("inf")) & ~(tl.abs(scaled) < float("inf"))
    return (T == 0) | overflows


@triton.jit
def _row_validity(row_in, bad, xmax, T):
    """(valid, greedy, drawing, T for the draw, z_max). Invalid: NaN / +inf logits, no finite
    logit, or a temperature that is not finite and >= 0."""
    valid = row_in & ~bad & (xmax > float("-inf")) & (T >= 0) & (T < float("inf"))
    greedy = _greedy_limit(xmax, T)
    drawing = valid & ~greedy
    t_draw = tl.where(drawing, T, 1.0)
    zmax = tl.where(drawing, xmax / t_draw, 0.0)  # division by T > 0 keeps the order
    return valid, greedy, drawing, t_draw, zmax


@triton.jit
def _race(
    X, rows64, stride_x, col_start, col_end, t_col, zmax, drawing, floor_key, m, row_seed, stream, best_id,
    ANY_MIN_P: tl.constexpr, GUMBEL_MAX: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The race over the survivors in columns [col_start, col_end): per row the largest key
    z - log(-log(u)) and its first index (key -inf and the given best_id: no survivor there)."""
    best_key = tl.full([BLOCK_B], float("-inf"), tl.float32)
    for start in range(col_start, col_end, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = drawing[:, None] & (cols < col_end)[None, :]
        z = _load_z(X, rows64, stride_x, cols, mask, t_col)
        # A token whose z plus the largest possible noise stays below the best key cannot win; the
        # margin scales with |z| so that fp32 rounding of the key cannot defeat the bound.
        contender = mask & (z + GUMBEL_MAX + tl.abs(z) * 1e-6 >= best_key[:, None])
        contender = contender & (z > float("-inf")) & (_ordered_key(z) >= floor_key[:, None])
        if ANY_MIN_P:
            contender = contender & ((m[:, None] <= 0) | (tl.exp(z - zmax[:, None]) >= m[:, None]))
        if tl.max(tl.max(contender.to(tl.int32), axis=1), axis=0) > 0:
            c0 = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.uint32) + cols[None, :].to(tl.uint32)
            c1 = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.uint32) + stream[:, None]
            zero = tl.zeros([BLOCK_B, BLOCK_V], dtype=tl.uint32)
            word, _, _, _ = tl.philox(row_seed[:, None], c0, c1, zero, zero)
            u = (((word >> 9) << 1) | 1).to(tl.float32) * 5.9604644775390625e-08  # (0, 1), as philox.h
            race = tl.where(contender, z - tl.log(-tl.log(u)), float("-inf"))
            tile_best = tl.max(race, axis=1)
            tile_id = tl.min(tl.where(contender & (race == tile_best[:, None]), cols[None, :], col_end), axis=1)
            better = tile_best > best_key  # strict: earlier tiles win ties (first index)
            best_id = tl.where(better, tile_id.to(tl.int64), best_id)
            best_key = tl.where(better, tile_best, best_key)
    return best_key, best_id


@triton.jit
def _store_result(X, rows64, stride_x, row_in, valid, ids, xmax, sumexp, Ids, Logprobs, NEED_LOGPROBS: tl.constexpr):
    """ids (-1 for invalid rows) and logprob = log_softmax(x)[id] = x[id] - max - log(sum)."""
    tl.store(Ids + rows64, tl.where(valid, ids, -1), mask=row_in)
    if NEED_LOGPROBS:
        x_id = tl.load(X + rows64 * stride_x + ids, mask=valid, other=0.0).to(tl.float32)
        logprob = x_id - xmax - tl.log(sumexp)
        tl.store(Logprobs + rows64, tl.where(valid, logprob, float("nan")), mask=row_in)


# ----------------------------------------------------------------------------- sample


@triton.jit
def _sample_kernel(
    X, stride_x, B, V,
    temperature, top_k, top_p, min_p, Temps, TopKs, TopPs, MinPs, seed, Seeds,
    Ids, Logprobs, frac_scale,
    HAS_TEMPS: tl.constexpr, HAS_TOPKS: tl.constexpr, HAS_TOPPS: tl.constexpr, HAS_MINPS: tl.constexpr,
    HAS_SEEDS: tl.constexpr, ANY_TOP_K: tl.constexpr, ANY_TOP_P: tl.constexpr, ANY_MIN_P: tl.constexpr,
    NEED_LOGPROBS: tl.constexpr, GUMBEL_MAX: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_in = rows < B
    rows64 = rows.to(tl.int64)
    T, k, p, m, row_seed, stream = _sample_params(
        rows, rows64, row_in, temperature, top_k, top_p, min_p, seed, Temps, TopKs, TopPs, MinPs, Seeds,
        HAS_TEMPS, HAS_TOPKS, HAS_TOPPS, HAS_MINPS, HAS_SEEDS, BLOCK_B,
    )

    # Pass A: validity, max, first argmax, sum of exp(x - max) of the raw logits.
    xmax, sumexp, imax, bad = _pass_a(X, rows64, row_in, stride_x, 0, V, BLOCK_B, BLOCK_V)
    valid, greedy, drawing, t_draw, zmax = _row_validity(row_in, bad, xmax, T)
    t_col = t_draw[:, None]

    # top-k: keep key >= the k-th largest key.
    top_k_key = tl.zeros([BLOCK_B], dtype=tl.int64)
    if ANY_TOP_K:
        k_active = drawing & (k > 0) & (k < V)
        top_k_key = _threshold_search(
            X, rows64, stride_x, V, t_col, zmax, k_active, k, top_k_key, frac_scale,
            False, BLOCK_B, BLOCK_V, RADIX_BITS,
        )
    # top-p over the top-k survivors: keep key >= the largest key at or above which the mass
    # reaches ceil(p * total) (at least 1: the most likely token always survives).
    top_p_key = tl.zeros([BLOCK_B], dtype=tl.int64)
    if ANY_TOP_P:
        p_active = drawing & (p < 1.0)
        total = tl.zeros([BLOCK_B], dtype=tl.int64)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = p_active[:, None] & (cols < V)[None, :]
            z = _load_z(X, rows64, stride_x, cols, mask, t_col)
            mask = mask & (_ordered_key(z) >= top_k_key[:, None])
            total += tl.sum(tl.where(mask, _fixed_mass(z, zmax[:, None], frac_scale), 0), axis=1)
        top_p_key = _threshold_search(
            X, rows64, stride_x, V, t_col, zmax, p_active, _top_p_need(p, total), top_k_key, frac_scale,
            True, BLOCK_B, BLOCK_V, RADIX_BITS,
        )

    _, best_id = _race(
        X, rows64, stride_x, 0, V, t_col, zmax, drawing, tl.maximum(top_k_key, top_p_key), m, row_seed, stream,
        imax, ANY_MIN_P, GUMBEL_MAX, BLOCK_B, BLOCK_V,
    )
    ids = tl.where(greedy, imax, best_id)
    _store_result(X, rows64, stride_x, row_in, valid, ids, xmax, sumexp, Ids, Logprobs, NEED_LOGPROBS)


# ----------------------------------------------------------------------------- sample, split rows
#
# Few long rows (small B, large V) give the one-program kernel only B programs. The split path runs
# each row on a (B, splits) grid, split s owning columns [s * CHUNK, (s + 1) * CHUNK), CHUNK a
# multiple of BLOCK_V. Programs of one launch never wait for each other (the interpreter runs them
# one after another); launches communicate through an int64 workspace (zeroed by the launcher) and
# fp32 pass-A partials. Only a later launch reads what a launch's atomics wrote, so they are relaxed:
#   Work[row]               max(_split_pack(key(x_max), first argmax)) of the row (atomic max)
#   Work[B + row]           NaN / +inf flag (atomic max)
#   Work[2B + row]          max(_split_pack(key(race key), id)) of the race (atomic max)
#   Work[3B + ...]          per filter (top-k, top-p), level and row: the search level's counts and
#                           masses per pivot, summed over the splits (atomic add)
#   Partials[row, split]    (max, sum of exp(x - max)) of the split's columns, for the logprob
# Launches: _split_stats_kernel (pass A, and level 0 of the top-k search, which needs no statistics),
# one _split_search_kernel per remaining search level, _split_race_kernel, _split_finish_kernel.
# Each search launch replays the earlier levels' bucket choices from the summed counts (a few
# hundred integer ops, no state to hand on), then counts its columns for its own level; a row whose
# search is already decided counts nothing. Integer sums and maxima do not depend on the order of
# the atomics, and the picks, keys and Philox words are the one-program kernel's, so the ids are
# the same bit for bit. The logprob's sum of exp combines per-split fp32 sums instead of one running
# sum: it agrees with the one-program kernel's to fp32 rounding, not bit for bit.

@triton.jit
def _split_pack(key, idx):
    """A nonnegative int64 whose maximum has the largest key and, among equal keys, the smallest idx."""
    return (key << 31) + ((1 << 31) - 1 - idx)


@triton.jit
def _split_unpack(pack):
    """(key, idx) of _split_pack."""
    return pack >> 31, (1 << 31) - 1 - (pack & ((1 << 31) - 1))


@triton.jit
def _key_to_float(key):
    """The fp32 whose _ordered_key is key (+0 for the shared key of -0 and +0)."""
    bits = tl.where(key >= 0x80000000, key ^ 0x80000000, key ^ 0xFFFFFFFF)
    return bits.to(tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _split_row(B, V, CHUNK):
    """The program's row (as a [1] vector, the kernels' BLOCK_B = 1) and its split's columns."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    col_start = tl.program_id(1) * CHUNK
    return rows, rows < B, rows.to(tl.int64), col_start, tl.minimum(col_start + CHUNK, V)


@triton.jit
def _split_row_state(Work, rows64, row_in, B, T):
    """The row's pass-A results from the workspace: (x_max, first argmax, valid, greedy, drawing,
    T for the draw, z_max)."""
    key, imax = _split_unpack(tl.load(Work + rows64, mask=row_in, other=0))
    xmax = _key_to_float(key)
    bad = tl.load(Work + B + rows64, mask=row_in, other=1) != 0
    valid, greedy, drawing, t_draw, zmax = _row_validity(row_in, bad, xmax, T)
    return xmax, imax, valid, greedy, drawing, t_draw, zmax


@triton.jit
def _split_program(
    B, V, CHUNK, temperature, top_k, top_p, min_p, seed, Temps, TopKs, TopPs, MinPs, Seeds, Work,
    HAS_TEMPS: tl.constexpr, HAS_TOPKS: tl.constexpr, HAS_TOPPS: tl.constexpr, HAS_MINPS: tl.constexpr,
    HAS_SEEDS: tl.constexpr,
):
    """What a program after pass A starts from: its row (int64), its columns, the row's top_k,
    top_p, min_p, Philox key and stream, and drawing, T for the draw and z_max."""
    rows, row_in, rows64, col_start, col_end = _split_row(B, V, CHUNK)
    T, k, p, m, row_seed, stream = _sample_params(
        rows, rows64, row_in, temperature, top_k, top_p, min_p, seed, Temps, TopKs, TopPs, MinPs, Seeds,
        HAS_TEMPS, HAS_TOPKS, HAS_TOPPS, HAS_MINPS, HAS_SEEDS, 1,
    )
    _, _, _, _, drawing, t_draw, zmax = _split_row_state(Work, rows64, row_in, B, T)
    return rows64, col_start, col_end, k, p, m, row_seed, stream, drawing, t_draw, zmax


@triton.jit
def _split_hist(Work, B, rows64, FILTER: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Pointer to the row's level-0 counts of FILTER (0: top-k, 1: top-p); level l is at
    + l * B * 2^(RADIX_BITS + 1), masses at + 2^RADIX_BITS."""
    R: tl.constexpr = 1 << RADIX_BITS
    LEVELS: tl.constexpr = 32 // RADIX_BITS
    return Work + 3 * B + (FILTER * LEVELS * B + rows64) * (2 * R)


@triton.jit
def _split_replay(Hist, B, levels_done, need, active, BY_MASS: tl.constexpr, RADIX_BITS: tl.constexpr):
    """The search state (lo, todo, step) after levels [0, levels_done), replayed from the summed
    counts (and masses) in Hist with the one-program search's _pick_bucket; step is the bucket
    span of level levels_done. Hist: _split_hist of a row ([1] pointer)."""
    R: tl.constexpr = 1 << RADIX_BITS
    j = tl.arange(0, R)[None, :]
    lo = tl.zeros([1], dtype=tl.int64)
    count_above = tl.zeros([1], dtype=tl.int64)
    todo = active
    step = tl.full([], 1 << (32 - RADIX_BITS), tl.int64)
    for level in range(levels_done):
        if tl.max(todo.to(tl.int32), axis=0) > 0:  # a decided search reads no more levels
            counts = tl.load(Hist + level * B * (2 * R) + j)
            quantity = tl.load(Hist + level * B * (2 * R) + R + j) if BY_MASS else counts
            lo, count_above, todo = _pick_bucket(counts, quantity, need, lo, count_above, todo, step, BY_MASS, RADIX_BITS)
        step = step >> RADIX_BITS
    return lo, todo, step


@triton.jit
def _split_thresholds(
    Work, B, V, rows64, k, p, drawing, top_k_levels, top_p_levels,
    ANY_TOP_K: tl.constexpr, ANY_TOP_P: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """(top-k key, top-p lo, top-p todo, top-p step): the top-k search replayed over top_k_levels
    levels and the top-p search over top_p_levels (a finished search gives its threshold)."""
    top_k_key = tl.zeros([1], dtype=tl.int64)
    if ANY_TOP_K:
        top_k_key, _, _ = _split_replay(
            _split_hist(Work, B, rows64, 0, RADIX_BITS), B, top_k_levels, k, drawing & (k > 0) & (k < V),
            False, RADIX_BITS,
        )
    top_p_lo = tl.zeros([1], dtype=tl.int64)
    top_p_todo = drawing & (p < 1.0)
    top_p_step = tl.full([], 1 << (32 - RADIX_BITS), tl.int64)
    if ANY_TOP_P:
        hist = _split_hist(Work, B, rows64, 1, RADIX_BITS)
        # level 0's pivot 0 is key >= 0: its mass is the total over the top-k survivors
        total = tl.load(hist + (1 << RADIX_BITS), mask=top_p_levels > 0, other=0)
        top_p_lo, top_p_todo, top_p_step = _split_replay(
            hist, B, top_p_levels, _top_p_need(p, total), top_p_todo, True, RADIX_BITS
        )
    return top_k_key, top_p_lo, top_p_todo, top_p_step


@triton.jit
def _split_count_level(
    X, rows64, stride_x, col_start, col_end, t_col, zmax, todo, lo, step, floor_key, frac_scale, Hist,
    BY_MASS: tl.constexpr, BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """Adds this split's counts (and masses) for one level into the row's level histogram Hist."""
    if tl.max(todo.to(tl.int32), axis=0) > 0:  # a decided row has nothing to count
        counts, masses = _pivot_counts(
            X, rows64, stride_x, col_start, col_end, t_col, zmax, todo, lo, step, floor_key, frac_scale,
            BY_MASS, 1, BLOCK_V, RADIX_BITS,
        )
        j = tl.arange(0, 1 << RADIX_BITS)[None, :]
        # computed, not broadcast: Triton 3.6's interpreter misreads a broadcast (stride 0) atomic mask
        mask = todo[:, None] & (j < (1 << RADIX_BITS))
        tl.atomic_add(Hist + j, counts.to(tl.int64), mask=mask, sem="relaxed")
        if BY_MASS:
            tl.atomic_add(Hist + (1 << RADIX_BITS) + j, masses, mask=mask, sem="relaxed")


@triton.jit
def _split_stats_kernel(
    X, stride_x, B, V, CHUNK,
    temperature, top_k, top_p, min_p, Temps, TopKs, TopPs, MinPs, seed, Seeds,
    Work, Partials, frac_scale,
    HAS_TEMPS: tl.constexpr, HAS_TOPKS: tl.constexpr, HAS_TOPPS: tl.constexpr, HAS_MINPS: tl.constexpr,
    HAS_SEEDS: tl.constexpr, ANY_TOP_K: tl.constexpr, BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    rows, row_in, rows64, col_start, col_end = _split_row(B, V, CHUNK)
    xmax, sumexp, imax, bad = _pass_a(X, rows64, row_in, stride_x, col_start, col_end, 1, BLOCK_V)
    tl.atomic_max(Work + rows64, _split_pack(_ordered_key(xmax), imax), mask=row_in, sem="relaxed")
    tl.atomic_max(Work + B + rows64, bad.to(tl.int64), mask=row_in, sem="relaxed")
    partial = (rows64 * tl.num_programs(1) + tl.program_id(1)) * 2
    tl.store(Partials + partial, xmax, mask=row_in)
    tl.store(Partials + partial + 1, sumexp, mask=row_in)
    if ANY_TOP_K:
        # Level 0 of the top-k search counts keys of z = x / T only, so it runs here for every row
        # that may draw with top-k; replays also require the row to be valid (known later).
        T, k, _, _, _, _ = _sample_params(
            rows, rows64, row_in, temperature, top_k, top_p, min_p, seed, Temps, TopKs, TopPs, MinPs, Seeds,
            HAS_TEMPS, HAS_TOPKS, HAS_TOPPS, HAS_MINPS, HAS_SEEDS, 1,
        )
        may_draw = row_in & (T > 0) & (T < float("inf")) & (k > 0) & (k < V)
        _split_count_level(
            X, rows64, stride_x, col_start, col_end, tl.where(may_draw, T, 1.0)[:, None], tl.zeros([1], tl.float32),
            may_draw, tl.zeros([1], tl.int64), tl.full([], 1 << (32 - RADIX_BITS), tl.int64), tl.zeros([1], tl.int64),
            frac_scale, _split_hist(Work, B, rows64, 0, RADIX_BITS), False, BLOCK_V, RADIX_BITS,
        )


@triton.jit(do_not_specialize=["level"])
def _split_search_kernel(
    X, stride_x, B, V, CHUNK, level,
    temperature, top_k, top_p, min_p, Temps, TopKs, TopPs, MinPs, seed, Seeds,
    Work, frac_scale,
    HAS_TEMPS: tl.constexpr, HAS_TOPKS: tl.constexpr, HAS_TOPPS: tl.constexpr, HAS_MINPS: tl.constexpr,
    HAS_SEEDS: tl.constexpr, ANY_TOP_K: tl.constexpr, BY_MASS: tl.constexpr,
    BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    """Counts level `level` of the top-k search (BY_MASS: of the top-p search, after every top-k
    level) over this split's columns."""
    LEVELS: tl.constexpr = 32 // RADIX_BITS
    rows64, col_start, col_end, k, p, _, _, _, drawing, t_draw, zmax = _split_program(
        B, V, CHUNK, temperature, top_k, top_p, min_p, seed, Temps, TopKs, TopPs, MinPs, Seeds, Work,
        HAS_TEMPS, HAS_TOPKS, HAS_TOPPS, HAS_MINPS, HAS_SEEDS,
    )
    if BY_MASS:
        floor_key, lo, todo, step = _split_thresholds(
            Work, B, V, rows64, k, p, drawing, LEVELS, level, ANY_TOP_K, True, RADIX_BITS
        )
    else:
        lo, todo, step = _split_replay(
            _split_hist(Work, B, rows64, 0, RADIX_BITS), B, level, k, drawing & (k > 0) & (k < V), False, RADIX_BITS
        )
        floor_key = tl.zeros([1], dtype=tl.int64)
    _split_count_level(
        X, rows64, stride_x, col_start, col_end, t_draw[:, None], zmax, todo, lo, step, floor_key, frac_scale,
        _split_hist(Work, B, rows64, 1 if BY_MASS else 0, RADIX_BITS) + level * B * (2 << RADIX_BITS),
        BY_MASS, BLOCK_V, RADIX_BITS,
    )


@triton.jit
def _split_race_kernel(
    X, stride_x, B, V, CHUNK,
    temperature, top_k, top_p, min_p, Temps, TopKs, TopPs, MinPs, seed, Seeds,
    Work,
    HAS_TEMPS: tl.constexpr, HAS_TOPKS: tl.constexpr, HAS_TOPPS: tl.constexpr, HAS_MINPS: tl.constexpr,
    HAS_SEEDS: tl.constexpr, ANY_TOP_K: tl.constexpr, ANY_TOP_P: tl.constexpr, ANY_MIN_P: tl.constexpr,
    GUMBEL_MAX: tl.constexpr, BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    LEVELS: tl.constexpr = 32 // RADIX_BITS
    rows64, col_start, col_end, k, p, m, row_seed, stream, drawing, t_draw, zmax = _split_program(
        B, V, CHUNK, temperature, top_k, top_p, min_p, seed, Temps, TopKs, TopPs, MinPs, Seeds, Work,
        HAS_TEMPS, HAS_TOPKS, HAS_TOPPS, HAS_MINPS, HAS_SEEDS,
    )
    top_k_key, top_p_key, _, _ = _split_thresholds(
        Work, B, V, rows64, k, p, drawing, LEVELS, LEVELS, ANY_TOP_K, ANY_TOP_P, RADIX_BITS
    )
    if tl.max(drawing.to(tl.int32), axis=0) > 0:
        best_key, best_id = _race(
            X, rows64, stride_x, col_start, col_end, t_draw[:, None], zmax, drawing,
            tl.maximum(top_k_key, top_p_key), m, row_seed, stream, tl.zeros([1], tl.int64), ANY_MIN_P, GUMBEL_MAX,
            1, BLOCK_V,
        )
        found = drawing & (best_key > float("-inf"))
        tl.atomic_max(Work + 2 * B + rows64, _split_pack(_ordered_key(best_key), best_id), mask=found, sem="relaxed")


@triton.jit
def _split_finish_kernel(
    X, stride_x, B, n_splits, temperature, Temps, Work, Partials, Ids, Logprobs,
    HAS_TEMPS: tl.constexpr, NEED_LOGPROBS: tl.constexpr, SPLITS: tl.constexpr,
):
    """One program per row: the race's winner (greedy: the first argmax) and the logprob from the
    splits' (max, sum of exp) partials."""
    rows = tl.program_id(0) + tl.arange(0, 1)
    row_in = rows < B
    rows64 = rows.to(tl.int64)
    T = _row_param(Temps, rows64, row_in, temperature, 1.0, HAS_TEMPS, tl.float32, 1)
    xmax, imax, valid, greedy, _, _, _ = _split_row_state(Work, rows64, row_in, B, T)
    race = tl.load(Work + 2 * B + rows64, mask=row_in, other=0)
    _, race_id = _split_unpack(race)
    ids = tl.where(greedy | (race == 0), imax, race_id)  # 0: no split had a survivor (not expected)
    sumexp = tl.zeros([1], dtype=tl.float32)
    if NEED_LOGPROBS:
        split = tl.arange(0, SPLITS)
        partial = (rows64[:, None] * n_splits + split[None, :]) * 2
        in_row = row_in[:, None] & (split < n_splits)[None, :]
        split_max = tl.load(Partials + partial, mask=in_row, other=float("-inf"))
        split_sum = tl.load(Partials + partial + 1, mask=in_row, other=0.0)
        scaled = tl.where(split_max == float("-inf"), 0.0, split_sum * tl.exp(split_max - xmax[:, None]))
        sumexp = tl.sum(scaled, axis=1)
    _store_result(X, rows64, stride_x, row_in, valid, ids, xmax, sumexp, Ids, Logprobs, NEED_LOGPROBS)


# ----------------------------------------------------------------------------- softmax


@triton.jit
def _softmax_kernel(
    X, stride_x, B, V, temperature, Temps, Probs,
    HAS_TEMPS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_in = rows < B
    rows64 = rows.to(tl.int64)
    cols0 = tl.arange(0, BLOCK_V)
    T = _row_param(Temps, rows64, row_in, temperature, 1.0, HAS_TEMPS, tl.float32, BLOCK_B)
    # Pass 1: NaN flag, max and first argmax of x, online sum of exp((x - max) / T).
    t_safe = tl.where(T == 0, 1.0, T)  # T == 0 rows are one-hot; their sum goes unused
    xmax = tl.full([BLOCK_B], float("-inf"), tl.float32)
    sumexp = tl.zeros([BLOCK_B], dtype=tl.float32)
    imax = tl.full([BLOCK_B], 0, tl.int64)
    nan = tl.zeros([BLOCK_B], dtype=tl.int1)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = row_in[:, None] & (cols < V)[None, :]
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        nan = nan | (tl.max((x != x).to(tl.int32), axis=1) > 0)
        x = tl.where(x == x, x, float("-inf"))
        xmax, sumexp, imax = _online_row_stats(x, cols, V, xmax, sumexp, imax, t_safe)
    one_hot = _greedy_limit(xmax, T) & ~nan  # the limit T -> 0: one-hot at the first argmax
    shift = tl.where(nan, float("nan"), xmax)  # a NaN logit makes the whole row NaN, as in torch
    inv_sum = 1.0 / sumexp
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = row_in[:, None] & (cols < V)[None, :]
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        probs = tl.exp((x - shift[:, None]) / t_safe[:, None]) * inv_sum[:, None]
        probs = tl.where(one_hot[:, None], (cols[None, :] == imax[:, None]).to(tl.float32), probs)
        tl.store(Probs + rows64[:, None] * V + cols[None, :], probs, mask=mask)


# ----------------------------------------------------------------------------- launchers


def _tile(B: int, V: int, tile_elems: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_V, num_warps): whole short rows batched up to tile_elems, long rows looped."""
    block_v = max(MIN_BLOCK_V, min(triton.next_power_of_2(V), tile_elems))
    block_b = max(1, min(tile_elems // block_v, triton.next_power_of_2(B)))
    num_warps = max(1, min(8, block_b * block_v // 256))
    return block_b, block_v, num_warps


def _check_rows(logits: Tensor, name: str) -> int:
    if logits.dim() != 2 or (logits.shape[1] > 1 and logits.stride(1) != 1):
        raise ValueError(f"lmkern.kernels.sampling: {name} must be 2-D with element stride 1, got shape "
                         f"{tuple(logits.shape)} and strides {logits.stride()}")
    return logits.stride(0)


def mass_frac_bits(V: int) -> int:
    """Fixed-point bits of the probability mass: V masses of at most 1 sum below 2^63
    (as csrc/include/lmkern/sampling_math.h)."""
    return min(62, 63 - V.bit_length())  # V < 2^bit_length


# Force the split path's split count (tests); None: _auto_splits decides.
SAMPLE_SPLITS: Optional[int] = None
_SM_COUNTS: dict[int, int] = {}


def _auto_splits(logits: Tensor, B: int, V: int) -> int:
    """Splits per row for the split path (1: the one-program kernel).

    UNMEASURED (written without a GPU): split only when B programs would leave most SMs idle
    (B <= SMs / 4) and rows span at least 8 tiles, into as many splits as fill the SMs once, each at
    least 4 tiles. The split path costs 3 launches (plus one per search level: up to 7 more with
    top-k, 8 with top-p) and a workspace fill, so its break-even point is for benchmarks to find.
    The interpreter and CPU tensors always take the one-program kernel."""
    if INTERPRET or not logits.is_cuda:
        return 1
    device = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
    if device not in _SM_COUNTS:
        _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    sms = _SM_COUNTS[device]
    n_tiles = triton.cdiv(V, _tile(1, V, SAMPLE_TILE)[1])
    if B * 4 > sms or n_tiles < 8:
        return 1
    return max(1, min(sms // B, n_tiles // 4))


def sample(
    logits: Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    temperatures: Optional[Tensor],
    top_ks: Optional[Tensor],
    top_ps: Optional[Tensor],
    min_ps: Optional[Tensor],
    seed: int,
    seeds: Optional[Tensor],
    ids: Tensor,
    logprobs: Optional[Tensor],
    splits: Optional[int] = None,
) -> None:
    """One token per row of (B, V) logits into ids (B,) int64 and, if given, logprobs (B,) fp32.

    logits: element stride 1, any row stride. Per-row tensors (B,) contiguous on the logits'
    device (temperatures / top_ps / min_ps float32, top_ks / seeds int64) replace their scalars;
    ``seed`` is the int64 bit pattern of the 64-bit Philox key. ``splits``: programs per row
    (> 1: the split path, with at most one split per tile; None: SAMPLE_SPLITS, else _auto_splits).
    """
    B, V = logits.shape
    stride_x = _check_rows(logits, "logits")
    if B == 0:
        return
    if splits is None:
        splits = SAMPLE_SPLITS if SAMPLE_SPLITS is not None else _auto_splits(logits, B, V)
    if splits < 1:
        raise ValueError(f"lmkern.kernels.sampling.sample: splits must be >= 1, got {splits}")
    params = (temperature, top_k, top_p, min_p, temperatures, top_ks, top_ps, min_ps, seed, seeds)
    flags = dict(HAS_TEMPS=temperatures is not None, HAS_TOPKS=top_ks is not None, HAS_TOPPS=top_ps is not None,
                 HAS_MINPS=min_ps is not None, HAS_SEEDS=seeds is not None)
    # Which filter passes may run at all (constexpr: a disabled filter costs nothing).
    any_filter = dict(ANY_TOP_K=top_ks is not None or 0 < top_k < V, ANY_TOP_P=top_ps is not None or top_p < 1.0,
                      ANY_MIN_P=min_ps is not None or min_p > 0.0)
    frac_scale = float(2.0 ** mass_frac_bits(V))
    if splits > 1:
        _sample_split(logits, stride_x, params, flags, any_filter, frac_scale, splits, ids, logprobs)
        return
    block_b, block_v, num_warps = _tile(B, V, SAMPLE_TILE)
    if block_b > 1:
        block_b, block_v, _ = _tile(B, V, SAMPLE_BATCH_TILE)
        num_warps = 8 if block_b * block_v >= 512 else num_warps
    wrap_triton(_sample_kernel)[(triton.cdiv(B, block_b),)](
        logits, stride_x, B, V, *params,
        ids, logprobs, frac_scale, **flags, **any_filter,
        NEED_LOGPROBS=logprobs is not None, GUMBEL_MAX=GUMBEL_MAX,
        BLOCK_B=block_b, BLOCK_V=block_v, RADIX_BITS=RADIX_BITS, num_warps=num_warps,
    )


def _sample_split(logits, stride_x, params, flags, any_filter, frac_scale, splits, ids, logprobs) -> None:
    """The split path (see the comment above _split_pack): one row per program, `splits` programs
    per row (fewer when the row has fewer tiles), 3 launches plus one per search level."""
    B, V = logits.shape
    _, block_v, num_warps = _tile(1, V, SAMPLE_TILE)
    n_tiles = triton.cdiv(V, block_v)
    chunk = triton.cdiv(n_tiles, min(splits, n_tiles)) * block_v  # whole tiles: ragged only at V
    n_splits = triton.cdiv(V, chunk)
    levels = 32 // RADIX_BITS
    # pass-A and race maxima, then per filter (top-k, top-p), level and row: counts and masses
    work = torch.zeros(3 * B + 2 * levels * B * (2 << RADIX_BITS), dtype=torch.int64, device=logits.device)
    partials = torch.empty(B * n_splits * 2, dtype=torch.float32, device=logits.device)
    grid = (B, n_splits)
    head = (logits, stride_x, B, V, chunk)
    tiles = dict(BLOCK_V=block_v, RADIX_BITS=RADIX_BITS, num_warps=num_warps)
    any_top_k = any_filter["ANY_TOP_K"]
    wrap_triton(_split_stats_kernel)[grid](*head, *params, work, partials, frac_scale, **flags, ANY_TOP_K=any_top_k, **tiles)
    for by_mass, first_level in ((False, 1), (True, 0)):  # top-k level 0 ran with the stats
        if any_filter["ANY_TOP_P" if by_mass else "ANY_TOP_K"]:
            for level in range(first_level, levels):
                wrap_triton(_split_search_kernel)[grid](
                    *head, level, *params, work, frac_scale, **flags, ANY_TOP_K=any_top_k, BY_MASS=by_mass, **tiles
                )
    wrap_triton(_split_race_kernel)[grid](*head, *params, work, **flags, **any_filter, GUMBEL_MAX=GUMBEL_MAX, **tiles)
    wrap_triton(_split_finish_kernel)[(B,)](
        logits, stride_x, B, n_splits, params[0], params[4], work, partials, ids, logprobs,
        HAS_TEMPS=flags["HAS_TEMPS"], NEED_LOGPROBS=logprobs is not None, SPLITS=triton.next_power_of_2(n_splits),
        num_warps=1,
    )


def softmax(logits: Tensor, temperature: float, temperatures: Optional[Tensor], probs: Tensor) -> None:
    """probs (B, V) contiguous fp32 = softmax(logits / T) per row; T == 0: one-hot at the first argmax."""
    B, V = logits.shape
    stride_x = _check_rows(logits, "logits")
    if B == 0 or V == 0:
        return
    block_b, block_v, num_warps = _tile(B, V, SOFTMAX_TILE)
    wrap_triton(_softmax_kernel)[(triton.cdiv(B, block_b),)](
        logits, stride_x, B, V, temperature, temperatures, probs,
        HAS_TEMPS=temperatures is not None, BLOCK_B=block_b, BLOCK_V=block_v, num_warps=num_warps,
    )
