// Fused sampling and softmax CUDA kernels, framework-free: raw pointers, sizes and strides in
// (SampleParams / SoftmaxParams, see sampling.h), no torch include. The math is specified in
// lmkern/reference/sampling.py; the host side (plans, workspace, launches) is
// csrc/cuda/sampling_kernels.cu.
//
// sample_kernel: a row is handled by `splits` blocks of kThreads threads (one block per row, or,
// for few long rows, several blocks that each stream a chunk of it and meet at per-row barriers
// in a workspace; see SampleWork). No sort: every step streams the row (re-reads come from L2).
//   pass A     max, first argmax, sum of exp(x - max) (for the logprob) and validity flags of the
//              raw logits; with top-k, also the first radix histogram of z = x / T.
//   top-k      radix select of the k-th largest z (counting repeats) on the order-preserving
//              uint32 image of z: up to three passes of 2048-bin count histograms (11, 11, 10
//              bits), narrowing the bucket that holds the k-th key; it stops early once the whole
//              bucket is kept.
//   top-p      the same walk over the top-k survivors with mass histograms (exp(z - zmax) in
//              fixed point, so sums are exact and order-independent), narrowing to the key at which
//              the cumulative mass in descending order first reaches p * total.
//   race       over survivors (key >= thresholds, exp(z - zmax) >= min_p): argmax of
//              z - log(-log(u_i)), u_i from Philox (philox.h), first index on ties. A token whose z
//              is too low to beat the best key seen is skipped before its random word is made.
// Greedy rows (T == 0) stop after pass A (first argmax of the raw logits). Invalid rows (NaN,
// +inf, no finite logit; or a negative / non-finite T) get id -1 and logprob NaN.
//
// softmax_kernel: one block per row, two passes (online max and sum of exp, then the writes).
//
// Loads: 16-byte vectors from the first 16-byte-aligned element of each row range, scalar loads
// for the (fewer than 16 / sizeof(T)) elements before and after, so any row start, row stride and
// length is read exactly, never out of bounds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lmkern/sampling.h"
#include "lmkern/sampling_math.h"

namespace lmkern {
namespace sampling_kernels {

using namespace sampling_math;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 512;  // sample_kernel block size; softmax_kernel's largest
constexpr int kMaxWarps = kThreads / 32;
constexpr int kBinsPerThread = kBins / kThreads;
static_assert(kBinsPerThread * kThreads == kBins, "each thread owns whole histogram slots");
constexpr int kUnroll = 4;  // 16-byte vectors in flight per thread in the streaming loops
// Workspace histogram regions per row (split path): top-k levels 0..2, then top-p levels 0..2.
constexpr int kTopkRegion = 0;
constexpr int kToppRegion = kRadixLevels;
constexpr int kRegions = 2 * kRadixLevels;
// One region: uint64 mass[kBins], then uint32 count[kBins].
constexpr size_t kRegionBytes = size_t(kBins) * (sizeof(uint64_t) + sizeof(uint32_t));

// Where the blocks of one row meet when a row is split over several blocks (splits > 1). All
// arrays are per launch row r; the launcher zeroes `counters` before the launch and the kernel
// zeroes the histogram regions it uses before its first barrier.
struct SampleWork {
  int splits = 1;             // blocks per row
  int chunk = 0;              // elements per block, a multiple of 16 (splits * chunk >= V)
  int frac_bits = 0;          // fixed-point bits of the probability mass (mass_frac_bits(V))
  uint32_t* counters = nullptr;     // [B] barrier arrivals
  RowStats* stats = nullptr;        // [B][splits] pass A partials
  RaceBest* race = nullptr;         // [B][splits] race partials
  unsigned char* hist = nullptr;    // [B][kRegions] regions of kRegionBytes
};

// ------------------------------------------------------------------------------------------------
// Elements. Explicit intrinsics: torch builds define __CUDA_NO_HALF_CONVERSIONS__.

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __device__ __forceinline__ float load(const float* p) { return __ldg(p); }
  // Element k of a 16-byte vector.
  static __device__ __forceinline__ float get(const uint4& v, int k) {
    const uint32_t w = k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
    return __uint_as_float(w);
  }
};
template <>
struct Elem<__half> {
  static __device__ __forceinline__ float load(const __half* p) {
    return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
  }
  static __device__ __forceinline__ float get(const uint4& v, int k) {
    const uint32_t w = (k >> 1) == 0 ? v.x : (k >> 1) == 1 ? v.y : (k >> 1) == 2 ? v.z : v.w;
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> ((k & 1) * 16))));
  }
};
template <>
struct Elem<__nv_bfloat16> {
  // bfloat16 is the high half of a float32: widening is a shift.
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) {
    return __uint_as_float(uint32_t(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
  }
  static __device__ __forceinline__ float get(const uint4& v, int k) {
    const uint32_t w = (k >> 1) == 0 ? v.x : (k >> 1) == 1 ? v.y : (k >> 1) == 2 ? v.z : v.w;
    return __uint_as_float((k & 1) ? (w & 0xFFFF0000u) : (w << 16));
  }
};

// Calls f(i, x[i] as float) for every i in [begin, end) of row x, each element by exactly one
// thread of the block and, per thread, in increasing i (the strict-max argmax relies on it).
template <typename T, typename F>
__device__ __forceinline__ void for_each_element(const T* x, int begin, int end, F&& f) {
  constexpr int VEC = 16 / sizeof(T);
  const int n = end - begin;
  if (n <= 0) return;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const T* base = x + begin;
  // Elements before the first 16-byte boundary (row starts need not be aligned).
  const int mis = int((reinterpret_cast<uintptr_t>(base) & 15) / sizeof(T));
  const int head = min(n, mis == 0 ? 0 : VEC - mis);
  if (tid < head) f(begin + tid, Elem<T>::load(base + tid));
  const int nvec = (n - head) / VEC;
  const uint4* vbase = reinterpret_cast<const uint4*>(base + head);
  const int body = begin + head;
  for (int v0 = tid; v0 < nvec; v0 += nthreads * kUnroll) {
    uint4 buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * nthreads;
      buf[u] = v < nvec ? __ldg(vbase + v) : make_uint4(0u, 0u, 0u, 0u);
    }
    // The element work is emitted VEC times, not kUnroll * VEC times (code size): the vectors
    // rotate through buf[0] so that every index stays a compile-time constant (registers).
#pragma unroll 1
    for (int u = 0; u < kUnroll; ++u) {
      const uint4 cur = buf[0];
#pragma unroll
      for (int q = 0; q + 1 < kUnroll; ++q) buf[q] = buf[q + 1];
      const int v = v0 + u * nthreads;
      if (v >= nvec) break;
#pragma unroll
      for (int k = 0; k < VEC; ++k) f(body + v * VEC + k, Elem<T>::get(cur, k));
    }
  }
  // Fewer than VEC elements after the last whole vector.
  const int tail = head + nvec * VEC;
  if (tid < n - tail) f(begin + tail + tid, Elem<T>::load(base + tail + tid));
}

// ------------------------------------------------------------------------------------------------
// Block reductions. The butterfly leaves every lane of a warp the same bits for a commutative op;
// the warps' values are then combined in one fixed order by every thread, so all threads of a
// block (and, for the cross-block combine, all blocks of a row) get identical results.

__device__ __forceinline__ RowStats shfl_xor(const RowStats& s, int off) {
  RowStats r;
  r.xmax = __shfl_xor_sync(kFullMask, s.xmax, off);
  r.sumexp = __shfl_xor_sync(kFullMask, s.sumexp, off);
  r.imax = __shfl_xor_sync(kFullMask, s.imax, off);
  r.flags = __shfl_xor_sync(kFullMask, s.flags, off);
  return r;
}
__device__ __forceinline__ RaceBest shfl_xor(const RaceBest& b, int off) {
  return RaceBest{__shfl_xor_sync(kFullMask, b.key, off), __shfl_xor_sync(kFullMask, b.idx, off)};
}

// scratch: kMaxWarps values in shared memory. Contains __syncthreads(): call from every thread.
template <typename V, typename Op>
__device__ __forceinline__ V block_allreduce(V v, Op op, V* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, shfl_xor(v, off));
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) scratch[warp] = v;
  __syncthreads();
  V r = scratch[0];
  for (int w = 1; w < nwarps; ++w) r = op(r, scratch[w]);
  __syncthreads();  // scratch is reused by the next call
  return r;
}

// Exclusive prefix sum over the block's threads in thread order; *total gets the block's sum.
__device__ __forceinline__ uint64_t block_exclusive_sum(uint64_t v, uint64_t* total,
                                                        uint64_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  uint64_t incl = v;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint64_t n = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += n;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  uint64_t before = 0, sum = 0;
  for (int w = 0; w < nwarps; ++w) {
    const uint64_t s = scratch[w];
    if (w < warp) before += s;
    sum += s;
  }
  __syncthreads();
  *total = sum;
  return before + incl - v;
}

// ------------------------------------------------------------------------------------------------
// Per-row barrier of the split path: the row's `splits` blocks are co-resident (cooperative
// launch), each block counts the barriers it has passed, and the counter only grows, so barrier g
// is passed once it reaches g * splits. Writes before the barrier (any thread of any block of the
// row) are visible after it to loads that bypass L1 (__ldcg): __syncthreads orders the block's
// writes before thread 0's fence and arrival, the acquire load and fence order the reads after.
__device__ __forceinline__ uint32_t ld_acquire(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void row_barrier(uint32_t* counter, uint32_t* passed, int splits) {
  __syncthreads();
  if (threadIdx.x == 0) {
    const uint32_t target = (++*passed) * uint32_t(splits);
    __threadfence();
    atomicAdd(counter, 1u);
    while (ld_acquire(counter) < target) __nanosleep(32);
    __threadfence();
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------------------------
// Shared memory of sample_kernel: the block's histogram of one radix level, indexed by slot
// (descending key order). Mass is kept as two 32-bit words because 32-bit shared atomics are
// native while 64-bit ones are compare-and-swap loops: the low word's wrap-around is detected by
// the adding thread (atomicAdd returns the old value) and carried into the high word, so
// mass_hi * 2^32 + mass_lo is the exact 64-bit sum.
struct SampleSmem {
  uint32_t count[kBins];
  uint32_t mass_lo[kBins];
  uint32_t mass_hi[kBins];
  RowStats red_stats[kMaxWarps];
  RaceBest red_race[kMaxWarps];
  uint64_t red_scan[kMaxWarps];
  int pick_slot;
  uint32_t pick_count;
  uint64_t pick_excl;
};

__device__ __forceinline__ void smem_add_mass(SampleSmem& sm, int slot, uint64_t m) {
  const uint32_t lo = uint32_t(m);
  uint32_t hi = uint32_t(m >> 32);
  if (lo != 0u) {
    const uint32_t old = atomicAdd(&sm.mass_lo[slot], lo);
    if (old + lo < old) ++hi;  // the low word wrapped
  }
  if (hi != 0u) atomicAdd(&sm.mass_hi[slot], hi);
}

__device__ __forceinline__ uint64_t smem_mass(const SampleSmem& sm, int slot) {
  return (uint64_t(sm.mass_hi[slot]) << 32) + sm.mass_lo[slot];
}

__device__ __forceinline__ void zero_histogram(SampleSmem& sm, bool with_mass) {
  for (int s = threadIdx.x; s < kBins; s += blockDim.x) {
    sm.count[s] = 0u;
    if (with_mass) {
      sm.mass_lo[s] = 0u;
      sm.mass_hi[s] = 0u;
    }
  }
}

// A histogram region of the workspace (split path).
struct Region {
  uint64_t* mass;
  uint32_t* count;
  __device__ __forceinline__ explicit Region(unsigned char* p)
      : mass(reinterpret_cast<uint64_t*>(p)),
        count(reinterpret_cast<uint32_t*>(p + kBins * sizeof(uint64_t))) {}
};

// The slots a thread holds while picking a bucket: [kBinsPerThread * tid, + kBinsPerThread).
struct ThreadBins {
  uint32_t count[kBinsPerThread];
  uint64_t q[kBinsPerThread];  // the counted quantity: the count (top-k) or the mass (top-p)
};

__device__ __forceinline__ void bins_from_smem(ThreadBins& b, const SampleSmem& sm, bool by_count) {
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    const int s = kBinsPerThread * threadIdx.x + j;
    b.count[j] = sm.count[s];
    b.q[j] = by_count ? uint64_t(b.count[j]) : smem_mass(sm, s);
  }
}

// Adds the block's histogram to the row's region (exact integer atomics, any order).
__device__ __forceinline__ void merge_histogram(const SampleSmem& sm, Region g, bool by_count) {
  for (int s = threadIdx.x; s < kBins; s += blockDim.x) {
    const uint32_t c = sm.count[s];
    if (c == 0u) continue;
    atomicAdd(&g.count[s], c);
    if (!by_count) {
      const uint64_t m = smem_mass(sm, s);
      if (m != 0u) atomicAdd(reinterpret_cast<unsigned long long*>(&g.mass[s]), m);
    }
  }
}

__device__ __forceinline__ void bins_from_region(ThreadBins& b, Region g, bool by_count) {
  const int s0 = kBinsPerThread * threadIdx.x;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    b.count[j] = __ldcg(g.count + s0 + j);
    b.q[j] = by_count ? uint64_t(b.count[j])
                      : uint64_t(__ldcg(reinterpret_cast<const unsigned long long*>(g.mass) + s0 + j));
  }
}

// The bucket of one radix level that holds the boundary: the first slot with a non-zero count at
// which above + (inclusive prefix of q) >= need, need = need_of(total of q). slot -1 if none.
struct Pick {
  int slot;
  uint32_t count;
  uint64_t excl;  // q of the slots before it
  uint64_t need;
};

template <typename NeedOf>
__device__ __forceinline__ Pick pick_bucket(const ThreadBins& b, uint64_t above, NeedOf need_of,
                                            SampleSmem& sm) {
  uint64_t incl[kBinsPerThread];
  uint64_t run = 0;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    run += b.q[j];
    incl[j] = run;
  }
  uint64_t total = 0;
  const uint64_t before = block_exclusive_sum(run, &total, sm.red_scan);
  const uint64_t need = need_of(total);
  if (threadIdx.x == 0) sm.pick_slot = 0x7FFFFFFF;
  __syncthreads();
  // This thread's first qualifying slot, with its count and exclusive prefix (captured here:
  // indexing the arrays with the slot later would move them to local memory).
  int mine = 0x7FFFFFFF;
  uint32_t mine_count = 0u;
  uint64_t mine_excl = 0u;
#pragma unroll
  for (int j = kBinsPerThread - 1; j >= 0; --j) {
    if (b.count[j] != 0u && above + before + incl[j] >= need) {
      mine = kBinsPerThread * int(threadIdx.x) + j;
      mine_count = b.count[j];
      mine_excl = before + incl[j] - b.q[j];
    }
  }
  if (mine != 0x7FFFFFFF) atomicMin(&sm.pick_slot, mine);
  __syncthreads();
  const int slot = sm.pick_slot;
  if (mine != 0x7FFFFFFF && mine == slot) {
    sm.pick_count = mine_count;
    sm.pick_excl = mine_excl;
  }
  __syncthreads();
  Pick p;
  p.slot = slot == 0x7FFFFFFF ? -1 : slot;
  p.count = p.slot < 0 ? 0u : sm.pick_count;
  p.excl = p.slot < 0 ? 0u : sm.pick_excl;
  p.need = need;
  __syncthreads();  // pick_* is rewritten by the next call
  return p;
}

// ------------------------------------------------------------------------------------------------
// One row as sample_kernel sees it.

struct RowParams {
  float temp, top_p, min_p;
  int64_t top_k;
  uint64_t seed;
  uint32_t stream;
};

__device__ __forceinline__ RowParams row_params(const SampleParams& p, int64_t row) {
  RowParams r;
  r.temp = p.temperatures != nullptr ? p.temperatures[row] : p.temperature;
  r.top_k = p.top_ks != nullptr ? p.top_ks[row] : p.top_k;
  r.top_p = p.top_ps != nullptr ? p.top_ps[row] : p.top_p;
  r.min_p = p.min_ps != nullptr ? p.min_ps[row] : p.min_p;
  // Scalar seed: one key, the row index as the stream. Per-row seeds: the row's key, stream 0.
  r.seed = p.seeds != nullptr ? static_cast<uint64_t>(p.seeds[row]) : p.seed;
  r.stream = p.seeds != nullptr ? 0u : static_cast<uint32_t>(row);
  return r;
}

template <typename T>
struct RowContext {
  const T* x;  // the row
  int begin, end;  // this block's elements
  int V;
  float temp, zmax;
  int frac_bits;
  int split, splits;
  uint32_t* counter;  // split path only
  uint32_t passed;    // barriers passed
  unsigned char* regions;  // this row's histogram regions (split path)

  __device__ __forceinline__ bool split_row() const { return splits > 1; }
  __device__ __forceinline__ void barrier() { row_barrier(counter, &passed, splits); }
};

// The bins of one level: the block's own histogram, or, split over blocks, the row's sum of them.
template <typename T>
__device__ __forceinline__ void level_bins(ThreadBins& b, RowContext<T>& rc, SampleSmem& sm,
                                           int region, bool by_count) {
  if (!rc.split_row()) {
    bins_from_smem(b, sm, by_count);
    return;
  }
  const Region g(rc.regions + size_t(region) * kRegionBytes);
  merge_histogram(sm, g, by_count);
  rc.barrier();
  bins_from_region(b, g, by_count);
}

// Histogram of the keys in the walk's current bucket; with mass (top-p), of keys >= min_key only.
template <typename T, bool MASS>
__device__ __forceinline__ void level_histogram(const RowContext<T>& rc, const RadixWalk& w,
                                                uint32_t min_key, SampleSmem& sm) {
  __syncthreads();  // the previous level's bins have been read
  zero_histogram(sm, MASS);
  __syncthreads();
  const float temp = rc.temp, zmax = rc.zmax;
  const int frac_bits = rc.frac_bits;
  for_each_element(rc.x, rc.begin, rc.end, [&](int, float v) {
    const float z = v / temp;
    const uint32_t key = ordered_key(z);
    if (key >= min_key && w.matches(key)) {
      const int s = level_slot(key, w.level);
      atomicAdd(&sm.count[s], 1u);
      if (MASS) smem_add_mass(sm, s, mass_fixed(expf(z - zmax), frac_bits));
    }
  });
  __syncthreads();
}

// Lowest key of the top-k survivors: the k-th largest z, counting repeats. The level-0 histogram
// is already in shared memory (pass A).
template <typename T>
__device__ uint32_t topk_threshold(RowContext<T>& rc, int64_t k, SampleSmem& sm) {
  RadixWalk w;
  for (;;) {
    if (w.level > 0) level_histogram<T, false>(rc, w, 0u, sm);
    ThreadBins b;
    level_bins(b, rc, sm, kTopkRegion + w.level, true);
    const Pick pk = pick_bucket(b, w.above, [&](uint64_t) { return uint64_t(k); }, sm);
    if (pk.slot < 0) return 0u;  // unreachable (the counts add up to V > k): keep everything
    w.advance(pk.slot, pk.count, pk.excl, uint64_t(k), true);
    if (w.done) return w.threshold();
  }
}

// Lowest key kept by top-p among the keys >= min_key (the top-k survivors): the key of the first
// token, in descending order, at which the cumulative mass reaches p times the survivors' total.
template <typename T>
__device__ uint32_t topp_threshold(RowContext<T>& rc, float top_p, uint32_t min_key,
                                   SampleSmem& sm) {
  RadixWalk w;
  uint64_t target = 0;
  for (;;) {
    level_histogram<T, true>(rc, w, min_key, sm);
    ThreadBins b;
    level_bins(b, rc, sm, kToppRegion + w.level, false);
    const int level = w.level;
    const Pick pk = pick_bucket(
        b, w.above, [&](uint64_t total) { return level == 0 ? topp_target(top_p, total) : target; },
        sm);
    if (level == 0) target = pk.need;
    // None at level 0: rounding left the whole mass under the target, and the reference then keeps
    // everything. None deeper cannot happen (exact sums): keep the current bucket.
    if (pk.slot < 0) return level == 0 ? min_key : w.prefix;
    w.advance(pk.slot, pk.count, pk.excl, target, false);
    if (w.done) return w.threshold();
  }
}

template <typename T>
__device__ void write_result(const SampleParams& p, int64_t row, const T* x, int id,
                             const RowStats& st) {
  p.ids[row] = id;
  if (p.logprobs != nullptr) {
    // log_softmax(x)[id] = (x[id] - max) - log(sum exp(x - max)), in the reference's order.
    p.logprobs[row] = id < 0 ? __int_as_float(0x7fffffff)
                             : (Elem<T>::load(x + id) - st.xmax) - logf(st.sumexp);
  }
}

template <typename T>
__device__ void sample_row(const SampleParams& p, const SampleWork& work, int64_t row, int split,
                           SampleSmem& sm) {
  const RowParams rp = row_params(p, row);
  RowContext<T> rc;
  rc.x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
  rc.V = int(p.V);
  rc.splits = work.splits;
  rc.split = split;
  // 64-bit bounds: begin + chunk may pass INT32_MAX for rows close to it.
  rc.begin = int(min(p.V, int64_t(split) * work.chunk));
  rc.end = rc.split_row() ? int(min(p.V, int64_t(rc.begin) + work.chunk)) : rc.V;
  rc.temp = rp.temp;
  rc.zmax = 0.f;
  rc.frac_bits = work.frac_bits;
  rc.passed = 0;
  rc.counter = rc.split_row() ? work.counters + row : nullptr;
  rc.regions = rc.split_row() ? work.hist + size_t(row) * kRegions * kRegionBytes : nullptr;

  const bool greedy = rp.temp == 0.f;
  const bool sampled = rp.temp > 0.f && rp.temp < INFINITY;
  const bool topk = sampled && rp.top_k > 0 && rp.top_k < p.V;
  const bool topp = sampled && rp.top_p < 1.f;
  const bool minp = sampled && rp.min_p > 0.f;

  __syncthreads();  // shared memory of the previous row is free
  if (rc.split_row() && (topk || topp)) {
    // Zero this block's share of the regions the row uses; the first barrier orders it before
    // any block adds to them.
    const int first = topk ? kTopkRegion : kToppRegion;
    const int last = topp ? kToppRegion + kRadixLevels : kTopkRegion + kRadixLevels;
    uint4* z = reinterpret_cast<uint4*>(rc.regions + size_t(first) * kRegionBytes);
    const int n = int((last - first) * kRegionBytes / sizeof(uint4));
    for (int j = split * blockDim.x + threadIdx.x; j < n; j += rc.splits * blockDim.x) {
      z[j] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
  if (topk) zero_histogram(sm, false);
  __syncthreads();

  // Pass A: statistics of the raw logits; with top-k, the level-0 histogram of z.
  RowStats st = row_stats_init();
  {
    const float temp = rp.temp;
    for_each_element(rc.x, rc.begin, rc.end, [&](int i, float v) {
      row_stats_add(st, v, i);
      if (topk) atomicAdd(&sm.count[level_slot(ordered_key(v / temp), 0)], 1u);
    });
  }
  st = block_allreduce(st, [](const RowStats& a, const RowStats& b) { return row_stats_combine(a, b); },
                       sm.red_stats);
  if (rc.split_row()) {
    RowStats* partials = work.stats + row * rc.splits;
    if (threadIdx.x == 0) partials[split] = st;
    rc.barrier();
    // Every block combines the partials in the same order: identical statistics everywhere.
    st = row_stats_init();
    for (int s = 0; s < rc.splits; ++s) {
      RowStats q;
      q.xmax = __ldcg(&partials[s].xmax);
      q.sumexp = __ldcg(&partials[s].sumexp);
      q.imax = __ldcg(&partials[s].imax);
      q.flags = __ldcg(&partials[s].flags);
      st = row_stats_combine(st, q);
    }
  }

  if (!row_valid(st.flags) || !(greedy || sampled)) {
    if (split == 0 && threadIdx.x == 0) write_result(p, row, rc.x, -1, st);
    return;
  }
  if (greedy_row(rp.temp, st.xmax)) {  // T == 0, or x_max / T overflows: the first argmax
    if (split == 0 && threadIdx.x == 0) write_result(p, row, rc.x, st.imax, st);
    return;
  }
  // Division by T > 0 is monotonic, also after rounding: the largest z is xmax / T.
  rc.zmax = st.xmax / rp.temp;

  // Thresholds on the ordered key: keep key >= thr.
  uint32_t thr = 0u;
  if (topk) thr = topk_threshold(rc, rp.top_k, sm);
  if (topp) thr = max(thr, topp_threshold(rc, rp.top_p, thr, sm));

  // The race. The row's max survives every filter (unless min_p > 1): its key seeds the best, so
  // that tokens far below it skip their random word from the start.
  RaceBest best{-INFINITY, 0};
  const float min_p = rp.min_p, temp = rp.temp, zmax = rc.zmax;
  if (!minp || 1.f >= min_p) {
    best = RaceBest{race_key(zmax, rp.seed, uint32_t(st.imax), rp.stream), st.imax};
  }
  for_each_element(rc.x, rc.begin, rc.end, [&](int i, float v) {
    const float z = v / temp;
    if (z + kRaceGumbelMax < best.key) return;  // its key is < best.key whatever u is
    if (ordered_key(z) < thr) return;
    if (minp && !(expf(z - zmax) >= min_p)) return;
    const float key = race_key(z, rp.seed, uint32_t(i), rp.stream);
    if (race_better(key, i, best)) best = RaceBest{key, i};
  });
  best = block_allreduce(best, [](const RaceBest& a, const RaceBest& b) { return race_combine(a, b); },
                         sm.red_race);
  if (rc.split_row()) {
    RaceBest* partials = work.race + row * rc.splits;
    if (threadIdx.x == 0) partials[split] = best;
    rc.barrier();
    if (split != 0) return;
    best = RaceBest{-INFINITY, 0};
    for (int s = 0; s < rc.splits; ++s) {
      best = race_combine(best, RaceBest{__ldcg(&partials[s].key), __ldcg(&partials[s].idx)});
    }
  }
  if (threadIdx.x == 0) write_result(p, row, rc.x, best.idx, st);
}

// One block per row (work.splits == 1: any grid, rows strided over it), or work.splits blocks per
// row (grid == B * splits exactly, all co-resident: cooperative launch).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) sample_kernel(SampleParams p, SampleWork work) {
  __shared__ SampleSmem sm;
  const int64_t tasks = p.B * work.splits;
  for (int64_t t = blockIdx.x; t < tasks; t += gridDim.x) {
    sample_row<T>(p, work, t / work.splits, int(t % work.splits), sm);
  }
}

// ------------------------------------------------------------------------------------------------
// Softmax

// Writes out[i] = value(i) for i in [0, n): 16-byte stores from the first aligned element, scalar
// stores before and after. Values come from values.at(i) and, for 4 consecutive elements starting
// at an aligned output position, values.at4(i).
template <typename Values>
__device__ __forceinline__ void write_row(float* out, int n, const Values& values) {
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int mis = int((reinterpret_cast<uintptr_t>(out) & 15) / sizeof(float));
  const int head = min(n, mis == 0 ? 0 : 4 - mis);
  if (tid < head) out[tid] = values.at(tid);
  const int nvec = (n - head) / 4;
  float4* vout = reinterpret_cast<float4*>(out + head);
  for (int v = tid; v < nvec; v += nthreads) vout[v] = values.at4(head + 4 * v);
  const int tail = head + 4 * nvec;
  if (tid < n - tail) out[tail + tid] = values.at(tail + tid);
}

// 4 consecutive elements as floats; ALIGNED: x + i is aligned to 4 elements (one 16- or 8-byte
// load), else four scalar loads.
template <typename T, bool ALIGNED>
__device__ __forceinline__ float4 load4(const T* x, int i) {
  if constexpr (ALIGNED && sizeof(T) == 4) {
    return __ldg(reinterpret_cast<const float4*>(x + i));
  } else if constexpr (ALIGNED) {
    const uint2 w = __ldg(reinterpret_cast<const uint2*>(x + i));
    const uint4 v = make_uint4(w.x, w.y, 0u, 0u);
    return make_float4(Elem<T>::get(v, 0), Elem<T>::get(v, 1), Elem<T>::get(v, 2),
                       Elem<T>::get(v, 3));
  } else {
    return make_float4(Elem<T>::load(x + i), Elem<T>::load(x + i + 1), Elem<T>::load(x + i + 2),
                       Elem<T>::load(x + i + 3));
  }
}

template <typename T, bool ALIGNED>
struct SoftmaxValues {
  const T* x;
  float temp, zmax, sum;
  // softmax(z) = exp(z - max) / sum, as torch computes it.
  __device__ __forceinline__ float of(float v) const { return expf(v / temp - zmax) / sum; }
  __device__ __forceinline__ float at(int i) const { return of(Elem<T>::load(x + i)); }
  __device__ __forceinline__ float4 at4(int i) const {
    const float4 v = load4<T, ALIGNED>(x, i);
    return make_float4(of(v.x), of(v.y), of(v.z), of(v.w));
  }
};

struct ConstantValues {  // NaN rows
  float value;
  __device__ __forceinline__ float at(int) const { return value; }
  __device__ __forceinline__ float4 at4(int) const { return make_float4(value, value, value, value); }
};

struct OneHotValues {
  int hot;
  __device__ __forceinline__ float at(int i) const { return i == hot ? 1.f : 0.f; }
  __device__ __forceinline__ float4 at4(int i) const {
    return make_float4(at(i), at(i + 1), at(i + 2), at(i + 3));
  }
};

struct SoftmaxSmem {
  RowStats red_stats[kMaxWarps];
  RaceBest red_argmax[kMaxWarps];
};

template <typename T>
__global__ void __launch_bounds__(kThreads) softmax_kernel(SoftmaxParams p) {
  __shared__ SoftmaxSmem sm;
  const int V = int(p.V);
  for (int64_t row = blockIdx.x; row < p.B; row += gridDim.x) {
    const float temp = p.temperatures != nullptr ? p.temperatures[row] : p.temperature;
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    float* out = p.probs + row * p.V;
    if (temp == 0.f) {
      // One-hot at torch.argmax of the raw logits (a NaN counts as the largest).
      RaceBest am{-INFINITY, 0x7FFFFFFF};
      for_each_element(x, 0, V, [&](int i, float v) {
        if (argmax_better(v, i, am.key, am.idx)) am = RaceBest{v, i};
      });
      am = block_allreduce(am, [](const RaceBest& a, const RaceBest& b) {
        return argmax_better(b.key, b.idx, a.key, a.idx) ? b : a;
      }, sm.red_argmax);
      write_row(out, V, OneHotValues{am.idx});
      continue;
    }
    // Pass 1: max and sum of exp of z = x / T, and the flags of z.
    RowStats st = row_stats_init();
    for_each_element(x, 0, V, [&](int i, float v) { row_stats_add(st, v / temp, i); });
    st = block_allreduce(st, [](const RowStats& a, const RowStats& b) { return row_stats_combine(a, b); },
                         sm.red_stats);
    if (!row_valid(st.flags)) {
      // A NaN or +inf z, or no finite z. From the logits themselves (NaN, +inf, nothing finite)
      // torch.softmax gives a NaN row; otherwise x / T overflowed, and the row takes the limit
      // T -> 0 (greedy_row): one-hot at the first argmax. Rare rows: a second pass tells them apart.
      RowStats raw = row_stats_init();
      for_each_element(x, 0, V, [&](int i, float v) { row_stats_add(raw, v, i); });
      raw = block_allreduce(raw, [](const RowStats& a, const RowStats& b) { return row_stats_combine(a, b); },
                            sm.red_stats);
      if (row_valid(raw.flags) && greedy_row(temp, raw.xmax)) {
        write_row(out, V, OneHotValues{raw.imax});
      } else {
        write_row(out, V, ConstantValues{__int_as_float(0x7fffffff)});
      }
      continue;
    }
    // Pass 2 (the row again, from L2): the probabilities, with vector loads when the input's
    // alignment matches the output's.
    const int head = int(((16 - (reinterpret_cast<uintptr_t>(out) & 15)) & 15) / sizeof(float));
    const bool aligned = reinterpret_cast<uintptr_t>(x + min(head, V)) % (4 * sizeof(T)) == 0;
    if (aligned) {
      write_row(out, V, SoftmaxValues<T, true>{x, temp, st.xmax, st.sumexp});
    } else {
      write_row(out, V, SoftmaxValues<T, false>{x, temp, st.xmax, st.sumexp});
    }
  }
}

}  // namespace sampling_kernels
}  // namespace lmkern
