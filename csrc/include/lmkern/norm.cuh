// LayerNorm / RMSNorm CUDA kernels (forward and backward), framework-free: raw pointers, sizes and
// strides in (NormFwdParams / NormBwdParams, see norm.h), no torch include. The host side (dtype
// dispatch, choice of kernel and grid, launches) is csrc/cuda/norm_kernels.cu.
//
// Template parameters shared by every kernel:
//   T       element type of x / residual / dy / out / dx (float, __half, __nv_bfloat16)
//   W       element type of weight / bias / dweight / dbias (T or float)
//   IS_RMS  RMSNorm (no mean, no bias) instead of LayerNorm
//   VEC     elements per memory access: 16 / sizeof(T) (one 16-byte access) when every pointer and
//           row stride is 16-byte aligned, else 1 (scalar fallback); decided at launch
//   NV      vectors of VEC elements each thread keeps in registers (register-cached kernels)
//
// Kernels and the row lengths they serve (nvec = N / VEC vectors per row):
//   norm_fwd_rows_kernel / norm_bwd_rows_kernel: the row stays in registers, read once.
//     a block is blockDim.x / tpr groups of tpr threads (threads per row), one row per group at a
//     time, rows strided over the grid;
//     tpr <= 32 (small N): the group is part of a warp, row reductions by warp shuffles only;
//     tpr a multiple of 32 (up to 1024): warp shuffles, then the group's warp sums via shared
//       memory.
//   norm_fwd_looped_kernel: one row per block, any N, the row re-read (from L2) for each pass.
//   norm_bwd_looped_kernel: one row per block, rows too long for registers, read twice (the second
//     time from L2), dweight/dbias accumulated in shared memory.
//   norm_bwd_row_sums_kernel + norm_bwd_apply_kernel: backward for any N in two passes.
//   norm_bwd_finalize_kernel: deterministic column sums of the per-block dweight/dbias partials.
//
// Numerics: statistics and every reduction in fp32; each output rounded once to its dtype; with a
// fused residual the norm is taken of h = round(x + residual), the value stored in residual_out.
// No max/min tricks anywhere, so NaN/inf follow the IEEE result of the formula, row by row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lmkern/norm.h"

namespace lmkern {
namespace norm_kernels {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kFwdMaxThreads = 1024;  // block size limit of norm_fwd_rows_kernel
constexpr int kBwdMaxThreads = 512;   // block size limit of norm_bwd_rows_kernel (128 registers)
constexpr int kLoopThreads = 512;     // block size of the looped (any-N) row kernels
constexpr int kLoopUnroll = 4;        // vectors in flight per thread in the looped kernels
constexpr int kApplyThreads = 256;    // block size of norm_bwd_apply_kernel
constexpr int kApplyRows = 4;         // rows in flight per thread in norm_bwd_apply_kernel
constexpr int kFinalizeLanes = 8;     // row lanes per column in norm_bwd_finalize_kernel

// ------------------------------------------------------------------------------------------------
// Element conversions. Explicit intrinsics: torch builds define __CUDA_NO_HALF_CONVERSIONS__.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Raw bits of an element, for packing elements into 32-bit words.
__device__ __forceinline__ uint32_t to_bits(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t to_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// ------------------------------------------------------------------------------------------------
// VEC consecutive elements, moved with 16-byte accesses when VEC * sizeof(T) is a multiple of 16
// (then the address must be 16-byte aligned: the launcher checks it), element by element otherwise.
// Kept packed in registers; converted to float where used, so a 16-bit row costs half the
// registers of a float row.

template <typename T, int VEC>
struct alignas((VEC * sizeof(T)) % 16 == 0 ? 16 : alignof(T)) Vec {
  static constexpr int kChunks = (VEC * sizeof(T)) % 16 == 0 ? int(VEC * sizeof(T) / 16) : 0;
  T e[VEC];

  __device__ __forceinline__ float f(int k) const { return to_float(e[k]); }

  // 32-bit word i of the packed vector (element 2i in the low half for 16-bit types).
  __device__ __forceinline__ uint32_t word(int i) const {
    if constexpr (sizeof(T) == 4) {
      return to_bits(e[i]);
    } else {
      return to_bits(e[2 * i]) | (to_bits(e[2 * i + 1]) << 16);
    }
  }

  __device__ __forceinline__ void zero() {
    if constexpr (kChunks > 0) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) reinterpret_cast<uint4*>(e)[c] = make_uint4(0, 0, 0, 0);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) e[k] = from_float<T>(0.f);
    }
  }

  // READ_ONLY: through the non-coherent read-only cache; only for data no kernel thread writes
  // (weights).
  template <bool READ_ONLY = false>
  __device__ __forceinline__ void load(const T* p) {
    if constexpr (kChunks > 0) {
      const uint4* src = reinterpret_cast<const uint4*>(p);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        if constexpr (READ_ONLY) {
          reinterpret_cast<uint4*>(e)[c] = __ldg(src + c);
        } else {
          reinterpret_cast<uint4*>(e)[c] = src[c];
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) e[k] = p[k];
    }
  }

  __device__ __forceinline__ void store(T* p) const {
    if constexpr (kChunks > 0) {
      uint4* dst = reinterpret_cast<uint4*>(p);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) dst[c] = reinterpret_cast<const uint4*>(e)[c];
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) p[k] = e[k];
    }
  }

  // Same as store(), with the 16-byte stores written in PTX. In the looped kernels the compiler
  // was seen splitting plain uint4 stores into four 4-byte stores. The asm is a compiler memory
  // barrier, so callers compute all the vectors of a chunk before storing them.
  __device__ __forceinline__ void store_pinned(T* p) const {
    if constexpr (kChunks > 0) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p + c * (16 / sizeof(T))),
                     "r"(word(4 * c)), "r"(word(4 * c + 1)), "r"(word(4 * c + 2)),
                     "r"(word(4 * c + 3))
                     : "memory");
      }
    } else {
      store(p);
    }
  }
};

// VEC affine parameters as float: w = weight + weight_offset (1 without weight), b = bias (0
// without bias). Weights are re-read per row from L1/L2 rather than held across rows, which would
// cost NV * VEC more registers per thread.
template <typename W, int VEC>
struct Affine {
  float w[VEC], b[VEC];
  __device__ __forceinline__ void load(const W* weight, const W* bias, int64_t col, float offset) {
    if (weight != nullptr) {
      Vec<W, VEC> v;
      v.template load<true>(weight + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) w[k] = v.f(k) + offset;
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) w[k] = 1.f;
    }
    if (bias != nullptr) {
      Vec<W, VEC> v;
      v.template load<true>(bias + col);
#pragma unroll
      for (int k = 0; k < VEC; ++k) b[k] = v.f(k);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) b[k] = 0.f;
    }
  }
};

// dst[0..VEC) += v in shared memory (16-byte accesses when VEC is a multiple of 4; dst is then
// 16-byte aligned by construction).
template <int VEC>
__device__ __forceinline__ void smem_add(float* dst, const float (&v)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int c = 0; c < VEC / 4; ++c) {
      float4* q = reinterpret_cast<float4*>(dst) + c;
      float4 a = *q;
      a.x += v[4 * c];
      a.y += v[4 * c + 1];
      a.z += v[4 * c + 2];
      a.w += v[4 * c + 3];
      *q = a;
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dst[k] += v[k];
  }
}

// ------------------------------------------------------------------------------------------------
// Sum of K values over the threads of one row; every thread of the row gets the same bits (xor
// butterflies add the same pair in either order; the block stage reads the warp sums in one fixed
// order), which keeps the kernels deterministic.
//   tpr <= 32 (a power of two): the row is tpr aligned lanes of one warp: shuffles only.
//   tpr a multiple of 32 dividing blockDim.x: the row is tpr / 32 consecutive warps; red holds
//   K x 32 warp sums. Contains __syncthreads(), so every thread of the block must call it (the row
//   loops are block-uniform).
template <int K>
__device__ __forceinline__ void row_allreduce(float (&v)[K], int tpr, float (*red)[32]) {
  if (tpr <= 32) {
    for (int off = tpr >> 1; off > 0; off >>= 1) {
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(kFullMask, v[k], off);
    }
    return;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(kFullMask, v[k], off);
  }
  const int warp = threadIdx.x >> 5;
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) red[k][warp] = v[k];
  }
  __syncthreads();
  const int row_warps = tpr >> 5;
  const int first = (threadIdx.x / tpr) * row_warps;  // this row's warps: [first, first + row_warps)
#pragma unroll
  for (int k = 0; k < K; ++k) {
    float s = 0.f;
    for (int w = 0; w < row_warps; ++w) s += red[k][first + w];
    v[k] = s;
  }
  __syncthreads();  // red is overwritten by the next call
}

// ------------------------------------------------------------------------------------------------
// Per-vector pieces of the math, shared by the kernels below.

// 1/sqrt(mean of squares or variance + eps). rsqrtf(inf) = 0 and NaN stays NaN, as in PyTorch.
__device__ __forceinline__ float rstd_of(float sum_sq, float n, float eps) {
  return rsqrtf(sum_sq / n + eps);
}

// h = round(x + residual) to T: the fused residual add, rounded as unfused PyTorch code rounds it.
template <typename T, int VEC>
__device__ __forceinline__ void add_residual(Vec<T, VEC>& h, const Vec<T, VEC>& r) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) h.e[k] = from_float<T>(h.f(k) + r.f(k));
}

// First statistics pass: sum of h (RMSNorm: of h^2). Zero-filled vectors past N add nothing.
template <bool IS_RMS, typename T, int VEC>
__device__ __forceinline__ float stat_sum(const Vec<T, VEC>& h) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) s += IS_RMS ? h.f(k) * h.f(k) : h.f(k);
  return s;
}

// LayerNorm's second pass: sum of (h - mean)^2 (exact two-pass variance, no cancellation).
// Callers skip vectors past N, which would add mean^2.
template <typename T, int VEC>
__device__ __forceinline__ float centered_sum_sq(const Vec<T, VEC>& h, float mean) {
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float d = h.f(k) - mean;
    s += d * d;
  }
  return s;
}

// y = (h - mean) * rstd * (weight + offset) + bias, rounded once to T (mean = 0 for RMSNorm).
template <typename T, typename W, int VEC>
__device__ __forceinline__ Vec<T, VEC> norm_output(const Vec<T, VEC>& h, const Affine<W, VEC>& a,
                                                   float mean, float rstd) {
  Vec<T, VEC> y;
#pragma unroll
  for (int k = 0; k < VEC; ++k) y.e[k] = from_float<T>((h.f(k) - mean) * rstd * a.w[k] + a.b[k]);
  return y;
}

// Backward, first pass over a vector: with xhat = (x - mean) * rstd and g = dy * (weight + offset),
// adds sum(g) (LayerNorm only) and sum(g * xhat) into s[0..K), dy * xhat into dw and dy into db.
// K = 1 for RMSNorm (s[0] = sum(g * xhat)), 2 for LayerNorm.
template <int K, typename T, typename W, int VEC>
__device__ __forceinline__ void bwd_terms(const Vec<T, VEC>& xv, const Vec<T, VEC>& dyv,
                                          const Affine<W, VEC>& a, float mean, float rstd,
                                          float (&s)[K], float (&dw)[VEC], float (&db)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float xhat = (xv.f(k) - mean) * rstd;
    const float d = dyv.f(k);
    const float g = d * a.w[k];
    if constexpr (K == 2) s[0] += g;
    s[K - 1] += g * xhat;
    dw[k] += d * xhat;
    db[k] += d;
  }
}

// Backward, second pass: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dresidual), rounded
// once to T (mean_g = 0 for RMSNorm).
template <typename T, typename W, int VEC>
__device__ __forceinline__ Vec<T, VEC> bwd_dx(const Vec<T, VEC>& xv, const Vec<T, VEC>& dyv,
                                              const Vec<T, VEC>& drv, bool has_dres,
                                              const Affine<W, VEC>& a, float mean, float rstd,
                                              float mean_g, float mean_gx) {
  Vec<T, VEC> o;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const float xhat = (xv.f(k) - mean) * rstd;
    const float g = dyv.f(k) * a.w[k];
    float v = rstd * (g - mean_g - xhat * mean_gx);
    if (has_dres) v += drv.f(k);
    o.e[k] = from_float<T>(v);
  }
  return o;
}

// Backward accumulators in shared memory: acc[group][n_acc][N] fp32, the dweight slice (if any)
// first, then the dbias slice. Zeroes and adds only this thread's own columns.
struct SmemAcc {
  float* w;  // this group's dweight sums, or nullptr
  float* b;  // this group's dbias sums, or nullptr

  __device__ __forceinline__ SmemAcc(float* acc, int group, int n_acc, int N, bool has_dw,
                                     bool has_db) {
    float* base = acc + group * n_acc * N;
    w = has_dw ? base : nullptr;
    b = has_db ? base + (has_dw ? N : 0) : nullptr;
  }
  template <int VEC>
  __device__ __forceinline__ void zero(int col) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (w != nullptr) w[col + k] = 0.f;
      if (b != nullptr) b[col + k] = 0.f;
    }
  }
  template <int VEC>
  __device__ __forceinline__ void add(int col, const float (&dw)[VEC], const float (&db)[VEC]) {
    if (w != nullptr) smem_add<VEC>(w + col, dw);
    if (b != nullptr) smem_add<VEC>(b + col, db);
  }
};

// End of a backward block: partials[a][blockIdx.x][col] = sum over the block's row groups g (in
// order) of acc[g][a][col]. Synchronizes the block first (other threads' columns are read).
__device__ __forceinline__ void write_block_partials(const float* acc, int groups, int n_acc,
                                                     int N, float* partials) {
  __syncthreads();
  for (int i = threadIdx.x; i < n_acc * N; i += blockDim.x) {
    const int a = i / N, col = i - a * N;
    float t = 0.f;
    for (int g = 0; g < groups; ++g) t += acc[(g * n_acc + a) * N + col];
    partials[(int64_t(a) * gridDim.x + blockIdx.x) * N + col] = t;
  }
}

// ------------------------------------------------------------------------------------------------
// Forward, row cached in registers. Thread `lane` of a row owns the vectors j = 0..NV-1 at columns
// (j * tpr + lane) * VEC: consecutive threads touch consecutive 16-byte pieces (coalesced), and the
// column set of a thread is the same for every row. Requires tpr * NV * VEC >= N (launcher).
template <typename T, typename W, bool IS_RMS, int VEC, int NV>
__global__ void __launch_bounds__(kFwdMaxThreads, 1)
    norm_fwd_rows_kernel(const NormFwdParams p, const int tpr) {
  __shared__ float red[1][32];
  const int N = static_cast<int>(p.N);  // <= kFwdMaxThreads * NV * VEC here
  const float n = static_cast<float>(N);
  const int rows_per_block = blockDim.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int group = threadIdx.x / tpr;
  const T* x = static_cast<const T*>(p.x);
  const T* res = static_cast<const T*>(p.residual);
  const W* weight = static_cast<const W*>(p.weight);
  const W* bias = static_cast<const W*>(p.bias);
  T* out = static_cast<T*>(p.out);
  T* res_out = static_cast<T*>(p.residual_out);

  // Block-uniform loop (row_allreduce may synchronize the block); rows past M only skip memory.
  for (int64_t row0 = int64_t(blockIdx.x) * rows_per_block; row0 < p.M;
       row0 += int64_t(gridDim.x) * rows_per_block) {
    const int64_t row = row0 + group;
    const bool row_ok = row < p.M;

    // h = x (+ residual, rounded to T and written to residual_out); all loads issued first.
    Vec<T, VEC> h[NV];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = (j * tpr + lane) * VEC;
      h[j].zero();
      if (row_ok && col < N) h[j].load(x + row * p.x_row_stride + col);
    }
    if (res != nullptr) {
      Vec<T, VEC> r[NV];
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int col = (j * tpr + lane) * VEC;
        r[j].zero();
        if (row_ok && col < N) r[j].load(res + row * p.residual_row_stride + col);
      }
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int col = (j * tpr + lane) * VEC;
        add_residual(h[j], r[j]);
        if (row_ok && col < N) h[j].store(res_out + row * N + col);
      }
    }

    float s[1] = {0.f};
#pragma unroll
    for (int j = 0; j < NV; ++j) s[0] += stat_sum<IS_RMS>(h[j]);
    row_allreduce<1>(s, tpr, red);
    float mean = 0.f, rstd;
    if constexpr (IS_RMS) {
      rstd = rstd_of(s[0], n, p.eps);
    } else {
      mean = s[0] / n;
      float c[1] = {0.f};
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        if ((j * tpr + lane) * VEC < N) c[0] += centered_sum_sq(h[j], mean);
      }
      row_allreduce<1>(c, tpr, red);
      rstd = rstd_of(c[0], n, p.eps);
    }
    if (row_ok && lane == 0) {
      p.rstd[row] = rstd;
      if constexpr (!IS_RMS) p.mean[row] = mean;
    }

#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = (j * tpr + lane) * VEC;
      if (row_ok && col < N) {
        Affine<W, VEC> a;
        a.load(weight, bias, col, p.weight_offset);
        norm_output(h[j], a, mean, rstd).store(out + row * N + col);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Forward for any N: one row per block (blockDim.x == kLoopThreads), kLoopUnroll vectors in flight
// per thread, the row re-read for each pass (sum -> centered sum of squares for LayerNorm ->
// output); the launcher keeps few rows resident so that the re-reads hit L2. With a residual the
// later passes read h back from residual_out (one stream instead of two); each thread re-reads only
// columns it wrote itself, so program order makes that safe (plain loads, not the read-only path).
template <typename T, typename W, bool IS_RMS, int VEC>
__global__ void __launch_bounds__(kLoopThreads, 1) norm_fwd_looped_kernel(const NormFwdParams p) {
  __shared__ float red[1][32];
  constexpr int U = kLoopUnroll;
  const int64_t N = p.N;
  const float n = static_cast<float>(N);
  const int64_t stride = int64_t(blockDim.x) * VEC;  // between a thread's consecutive vectors
  const int64_t first = int64_t(threadIdx.x) * VEC;
  const T* res = static_cast<const T*>(p.residual);
  const W* weight = static_cast<const W*>(p.weight);
  const W* bias = static_cast<const W*>(p.bias);

  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    const T* xr = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* rr = res != nullptr ? res + row * p.residual_row_stride : nullptr;
    T* hr = res != nullptr ? static_cast<T*>(p.residual_out) + row * N : nullptr;
    T* yr = static_cast<T*>(p.out) + row * N;

    // Pass 1: h (and residual_out), sum of h (RMSNorm: of h^2).
    float s[1] = {0.f};
    for (int64_t base = first; base < N; base += U * stride) {
      Vec<T, VEC> h[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        h[u].zero();
        if (base + u * stride < N) h[u].load(xr + base + u * stride);
      }
      if (rr != nullptr) {
        Vec<T, VEC> r[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          r[u].zero();
          if (base + u * stride < N) r[u].load(rr + base + u * stride);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          add_residual(h[u], r[u]);
          if (base + u * stride < N) h[u].store_pinned(hr + base + u * stride);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) s[0] += stat_sum<IS_RMS>(h[u]);
    }
    row_allreduce<1>(s, blockDim.x, red);

    const T* src = hr != nullptr ? hr : xr;  // h, as rounded
    float mean = 0.f, rstd;
    if constexpr (IS_RMS) {
      rstd = rstd_of(s[0], n, p.eps);
    } else {
      mean = s[0] / n;
      float c[1] = {0.f};
      for (int64_t base = first; base < N; base += U * stride) {
        Vec<T, VEC> h[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          h[u].zero();
          if (base + u * stride < N) h[u].load(src + base + u * stride);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (base + u * stride < N) c[0] += centered_sum_sq(h[u], mean);
        }
      }
      row_allreduce<1>(c, blockDim.x, red);
      rstd = rstd_of(c[0], n, p.eps);
    }
    if (threadIdx.x == 0) {
      p.rstd[row] = rstd;
      if constexpr (!IS_RMS) p.mean[row] = mean;
    }

    for (int64_t base = first; base < N; base += U * stride) {
      Vec<T, VEC> h[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        h[u].zero();
        if (base + u * stride < N) h[u].load(src + base + u * stride);
      }
      Vec<T, VEC> y[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = base + u * stride;
        if (col < N) {
          Affine<W, VEC> a;
          a.load(weight, bias, col, p.weight_offset);
          y[u] = norm_output(h[u], a, mean, rstd);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (base + u * stride < N) y[u].store_pinned(yr + base + u * stride);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward, rows cached in registers (same thread/column layout as norm_fwd_rows_kernel):
//   xhat = (h - mean) * rstd (RMSNorm: h * rstd), g = dy * (weight + offset)
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dresidual   (RMSNorm: no mean(g) term)
// dweight/dbias partial sums (dy * xhat, dy over this block's rows) accumulate in fp32 in shared
// memory (SmemAcc, one slice per row group), each thread touching only its own columns, so no
// synchronization is needed until write_block_partials at the end.
template <typename T, typename W, bool IS_RMS, int VEC, int NV>
__global__ void __launch_bounds__(kBwdMaxThreads, NV <= 2 ? 2 : 1)
    norm_bwd_rows_kernel(const NormBwdParams p, const int tpr, float* __restrict__ partials) {
  extern __shared__ float4 acc_raw[];  // float4: 16-byte alignment for the vector accesses
  __shared__ float red[2][32];
  constexpr int K = IS_RMS ? 1 : 2;  // row sums: [sum(g),] sum(g * xhat)
  const int N = static_cast<int>(p.N);
  const float n = static_cast<float>(N);
  const int rows_per_block = blockDim.x / tpr;
  const int lane = threadIdx.x % tpr;
  const int group = threadIdx.x / tpr;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* dres = static_cast<const T*>(p.dresidual);
  const W* weight = static_cast<const W*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const bool has_dw = p.dweight != nullptr;
  const bool has_db = !IS_RMS && p.dbias != nullptr;
  const int n_acc = int(has_dw) + int(has_db);
  float* acc_all = reinterpret_cast<float*>(acc_raw);
  SmemAcc acc(acc_all, group, n_acc, N, has_dw, has_db);

  // The NV vectors of the group's threads cover every column < N exactly once.
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int col = (j * tpr + lane) * VEC;
    if (col < N) acc.template zero<VEC>(col);
  }

  for (int64_t row0 = int64_t(blockIdx.x) * rows_per_block; row0 < p.M;
       row0 += int64_t(gridDim.x) * rows_per_block) {
    const int64_t row = row0 + group;
    const bool row_ok = row < p.M;
    float mean = 0.f, rstd = 0.f;
    if (row_ok) {
      rstd = p.rstd[row];
      if constexpr (!IS_RMS) mean = p.mean[row];
    }
    Vec<T, VEC> xv[NV], dyv[NV];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = (j * tpr + lane) * VEC;
      xv[j].zero();
      dyv[j].zero();
      if (row_ok && col < N) {
        xv[j].load(x + row * p.x_row_stride + col);
        dyv[j].load(dy + row * p.dy_row_stride + col);
      }
    }

    float s[K];
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = (j * tpr + lane) * VEC;
      if (row_ok && col < N) {
        Affine<W, VEC> a;
        a.load(weight, nullptr, col, p.weight_offset);
        float dw[VEC] = {}, db[VEC] = {};
        bwd_terms(xv[j], dyv[j], a, mean, rstd, s, dw, db);
        acc.add(col, dw, db);
      }
    }
    row_allreduce<K>(s, tpr, red);
    const float mean_g = IS_RMS ? 0.f : s[0] / n;
    const float mean_gx = s[K - 1] / n;

#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = (j * tpr + lane) * VEC;
      if (row_ok && col < N) {
        Vec<T, VEC> drv;
        drv.zero();
        if (dres != nullptr) drv.load(dres + row * p.dresidual_row_stride + col);
        Affine<W, VEC> a;
        a.load(weight, nullptr, col, p.weight_offset);
        bwd_dx(xv[j], dyv[j], drv, dres != nullptr, a, mean, rstd, mean_g, mean_gx)
            .store(dx + row * N + col);
      }
    }
  }
  if (n_acc > 0) write_block_partials(acc_all, rows_per_block, n_acc, N, partials);
}

// ------------------------------------------------------------------------------------------------
// Backward for rows too long for registers whose dweight/dbias accumulators still fit in shared
// memory: one row per block (blockDim.x == kLoopThreads), the row read twice (sums, then dx), the
// second read served by L2 (the launcher keeps few rows resident). Same math and accumulators as
// norm_bwd_rows_kernel.
template <typename T, typename W, bool IS_RMS, int VEC>
__global__ void __launch_bounds__(kLoopThreads, 1)
    norm_bwd_looped_kernel(const NormBwdParams p, float* __restrict__ partials) {
  extern __shared__ float4 acc_raw[];
  __shared__ float red[2][32];
  constexpr int U = kLoopUnroll;
  constexpr int K = IS_RMS ? 1 : 2;
  const int N = static_cast<int>(p.N);  // the accumulators fit in shared memory
  const float n = static_cast<float>(N);
  const int stride = blockDim.x * VEC;
  const int first = threadIdx.x * VEC;
  const W* weight = static_cast<const W*>(p.weight);
  const T* dres = static_cast<const T*>(p.dresidual);
  const bool has_dw = p.dweight != nullptr;
  const bool has_db = !IS_RMS && p.dbias != nullptr;
  const int n_acc = int(has_dw) + int(has_db);
  float* acc_all = reinterpret_cast<float*>(acc_raw);
  SmemAcc acc(acc_all, 0, n_acc, N, has_dw, has_db);
  for (int col = first; col < N; col += stride) acc.template zero<VEC>(col);

  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    const T* xr = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* dyr = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
    const float rstd = p.rstd[row];
    const float mean = IS_RMS ? 0.f : p.mean[row];

    float s[K];
#pragma unroll
    for (int k = 0; k < K; ++k) s[k] = 0.f;
    for (int base = first; base < N; base += U * stride) {
      Vec<T, VEC> xv[U], dyv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        xv[u].zero();
        dyv[u].zero();
        if (base + u * stride < N) {
          xv[u].load(xr + base + u * stride);
          dyv[u].load(dyr + base + u * stride);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int col = base + u * stride;
        if (col < N) {
          Affine<W, VEC> a;
          a.load(weight, nullptr, col, p.weight_offset);
          float dw[VEC] = {}, db[VEC] = {};
          bwd_terms(xv[u], dyv[u], a, mean, rstd, s, dw, db);
          acc.add(col, dw, db);
        }
      }
    }
    row_allreduce<K>(s, blockDim.x, red);
    const float mean_g = IS_RMS ? 0.f : s[0] / n;
    const float mean_gx = s[K - 1] / n;

    for (int base = first; base < N; base += U * stride) {
      Vec<T, VEC> xv[U], dyv[U], drv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        xv[u].zero();
        dyv[u].zero();
        drv[u].zero();
        if (base + u * stride < N) {
          xv[u].load(xr + base + u * stride);
          dyv[u].load(dyr + base + u * stride);
          if (dres != nullptr) drv[u].load(dres + row * p.dresidual_row_stride + base + u * stride);
        }
      }
      Vec<T, VEC> o[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int col = base + u * stride;
        if (col < N) {
          Affine<W, VEC> a;
          a.load(weight, nullptr, col, p.weight_offset);
          o[u] = bwd_dx(xv[u], dyv[u], drv[u], dres != nullptr, a, mean, rstd, mean_g, mean_gx);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int col = base + u * stride;
        if (col < N) o[u].store_pinned(static_cast<T*>(p.dx) + row * N + col);
      }
    }
  }
  if (n_acc > 0) write_block_partials(acc_all, 1, n_acc, N, partials);
}

// ------------------------------------------------------------------------------------------------
// Backward for any N (accumulators beyond shared memory), pass 1: per row, mean(g) and
// mean(g * xhat) into row_sums[row] (one row per block, blockDim.x == kLoopThreads).
template <typename T, typename W, bool IS_RMS, int VEC>
__global__ void __launch_bounds__(kLoopThreads, 2)
    norm_bwd_row_sums_kernel(const NormBwdParams p, float2* __restrict__ row_sums) {
  __shared__ float red[2][32];
  constexpr int U = kLoopUnroll;
  const int64_t N = p.N;
  const float n = static_cast<float>(N);
  const int64_t stride = int64_t(blockDim.x) * VEC;
  const W* weight = static_cast<const W*>(p.weight);

  for (int64_t row = blockIdx.x; row < p.M; row += gridDim.x) {
    const T* xr = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* dyr = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
    const float rstd = p.rstd[row];
    const float mean = IS_RMS ? 0.f : p.mean[row];
    float s[2] = {0.f, 0.f};
    for (int64_t base = int64_t(threadIdx.x) * VEC; base < N; base += U * stride) {
      Vec<T, VEC> xv[U], dyv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        xv[u].zero();
        dyv[u].zero();
        if (base + u * stride < N) {
          xv[u].load(xr + base + u * stride);
          dyv[u].load(dyr + base + u * stride);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t col = base + u * stride;
        if (col < N) {
          Affine<W, VEC> a;
          a.load(weight, nullptr, col, p.weight_offset);
          float dw[VEC] = {}, db[VEC] = {};  // unused here
          bwd_terms(xv[u], dyv[u], a, mean, rstd, s, dw, db);
        }
      }
    }
    row_allreduce<2>(s, blockDim.x, red);
    if (threadIdx.x == 0) row_sums[row] = make_float2(IS_RMS ? 0.f : s[0] / n, s[1] / n);
  }
}

// Backward for any N, pass 2: dx from the row sums, and dweight/dbias partials in registers.
// blockIdx.x picks blockDim.x * VEC columns (one vector per thread), blockIdx.y a strided set of
// rows (kApplyRows in flight per thread); the block writes partials[a][blockIdx.y][its columns].
template <typename T, typename W, bool IS_RMS, int VEC>
__global__ void __launch_bounds__(kApplyThreads)
    norm_bwd_apply_kernel(const NormBwdParams p, const float2* __restrict__ row_sums,
                          float* __restrict__ partials) {
  constexpr int R = kApplyRows;
  const int64_t N = p.N;
  const int64_t col = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (col >= N) return;  // no barriers below
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ dres = static_cast<const T*>(p.dresidual);
  T* __restrict__ dx = static_cast<T*>(p.dx);
  Affine<W, VEC> a;  // this thread's columns never change: load once
  a.load(static_cast<const W*>(p.weight), nullptr, col, p.weight_offset);
  float dw[VEC] = {}, db[VEC] = {};

  for (int64_t row0 = int64_t(blockIdx.y) * R; row0 < p.M; row0 += int64_t(gridDim.y) * R) {
    Vec<T, VEC> xv[R], dyv[R], drv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = row0 + r;
      xv[r].zero();
      dyv[r].zero();
      drv[r].zero();
      if (row < p.M) {
        xv[r].load(x + row * p.x_row_stride + col);
        dyv[r].load(dy + row * p.dy_row_stride + col);
        if (dres != nullptr) drv[r].load(dres + row * p.dresidual_row_stride + col);
      }
    }
    Vec<T, VEC> o[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = row0 + r;
      if (row < p.M) {
        const float rstd = p.rstd[row];
        const float mean = IS_RMS ? 0.f : p.mean[row];
        const float2 rs = row_sums[row];
        float unused[2] = {0.f, 0.f};
        bwd_terms(xv[r], dyv[r], a, mean, rstd, unused, dw, db);
        o[r] = bwd_dx(xv[r], dyv[r], drv[r], dres != nullptr, a, mean, rstd, rs.x, rs.y);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (row0 + r < p.M) o[r].store(dx + (row0 + r) * N + col);
    }
  }

  const bool has_dw = p.dweight != nullptr;
  const bool has_db = !IS_RMS && p.dbias != nullptr;
  float* dst = partials + int64_t(blockIdx.y) * N + col;  // [a][blockIdx.y][col]
  if (has_dw) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dst[k] = dw[k];
    dst += int64_t(gridDim.y) * N;
  }
  if (has_db) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dst[k] = db[k];
  }
}

// ------------------------------------------------------------------------------------------------
// out_a[col] = sum over b of partials[a][b][col], b = 0..num_partials-1, in a fixed order
// (kFinalizeLanes strided lanes, then the lanes in order): deterministic, no atomics.
// blockDim (32, kFinalizeLanes); blockIdx.x: 32 columns; blockIdx.y: a (0: out0, 1: out1).
template <typename W>
__global__ void __launch_bounds__(32 * kFinalizeLanes)
    norm_bwd_finalize_kernel(const float* __restrict__ partials, int64_t num_partials, int64_t N,
                             W* __restrict__ out0, W* __restrict__ out1) {
  __shared__ float lanes[kFinalizeLanes][32];
  const int64_t col = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const float* src = partials + int64_t(blockIdx.y) * num_partials * N;
  float s = 0.f;
  if (col < N) {
    for (int64_t b = threadIdx.y; b < num_partials; b += kFinalizeLanes) s += src[b * N + col];
  }
  lanes[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float t = 0.f;
#pragma unroll
    for (int l = 0; l < kFinalizeLanes; ++l) t += lanes[l][threadIdx.x];
    (blockIdx.y == 0 ? out0 : out1)[col] = from_float<W>(t);
  }
}

}  // namespace norm_kernels
}  // namespace lmkern
