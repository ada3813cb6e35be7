// FlashAttention-2 style forward (prefill) CUDA kernel for fp16 and bf16, framework-free: raw
// pointers, sizes and strides in (AttentionFwdParams, see attention.h), no torch include. The
// host side is csrc/cuda/attention_kernels.cu. Needs sm_80 or newer (mma.sync, ldmatrix,
// cp.async).
//
// One block of 4 warps per (row block of kBlockM = 64 queries, query head h, sequence b); each
// warp owns 16 query rows. The block walks the keys its rows may see in tiles of kBlockN:
//   - Q (kBlockM x D), one K tile and one V tile sit in shared memory, rows padded by 16 bytes
//     (D + 8 elements), which makes every ldmatrix phase hit 8 distinct 16-byte bank groups;
//     they are filled with cp.async (16 bytes a thread), rows past the sequence zero-filled;
//   - S = Q K^T with mma.sync m16n8k16 (fp32 accumulators), A fragments of Q and B fragments of K
//     by ldmatrix; scores scaled to base 2 (scale * log2(e)), the bias added, then masked scores
//     set to -inf (only tiles that cross the causal diagonal or the end of the keys test each
//     element);
//   - online softmax per row in fp32 (the row's 4 lanes share max and sum by shuffles), the
//     output accumulators rescaled by exp2(m_old - m_new);
//   - O += P V: the probabilities go from the S accumulators straight into A fragments (rounded
//     to the input type), V's B fragments by ldmatrix.trans.
// Loads overlap math as in FlashAttention-2: the V tile is loaded while S is computed, the next K
// tile while P V is.
// A row whose running max is still -inf (no visible key yet) uses 0 in its exponentials, so no
// inf - inf appears; a row that never sees a key ends with l = 0: out 0, lse -inf.
// Causal block skipping: a row block stops at the last key its last row sees.
// Packed (varlen) sequences: blocks stride over their sequence's row blocks (any grid size is
// correct), every cu_seqlens value is clamped to [0, total]; the blocks of the first and last
// sequence also write out 0 / lse -inf to the packed rows outside every sequence.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lmkern/attention.h"
#include "lmkern/attention_decode.cuh"  // element helpers, constants

namespace lmkern {
namespace attention_kernels {

constexpr int kPrefillThreads = 128;  // 4 warps of 16 query rows

template <int D>
struct PrefillConfig {
  static_assert(D % 16 == 0 && D >= 16 && D <= 256, "head dim: a multiple of 16 up to 256");
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = D <= 128 ? 64 : 32;  // bounds the registers for large D
  static constexpr int kStride = D + 8;                // shared-memory row, in elements
  static constexpr size_t kSmemBytes = size_t(kBlockM + 2 * kBlockN) * kStride * 2;
};

// ------------------------------------------------------------------------------------------------
// sm_80 PTX wrappers. A host build of this header (tests/attention_cuda_algo.cpp, which runs the
// kernels' code on the CPU, one thread per CUDA thread) defines LMKERN_ATTENTION_HOST_EMULATION
// and supplies emulations of exactly these functions, with the PTX ISA's fragment layouts.
#if !defined(LMKERN_ATTENTION_HOST_EMULATION)

// The block's dynamic shared memory.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char attn_smem[];
  return attn_smem;
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; with pred false nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a * b, m16n8k16, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif  // !LMKERN_ATTENTION_HOST_EMULATION

// Two floats rounded to T, packed: lo in the low 16 bits (the lower column of a fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  return uint32_t(__half_as_ushort(__float2half_rn(lo))) |
         (uint32_t(__half_as_ushort(__float2half_rn(hi))) << 16);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// rows x D tile of a (row-strided, unit element stride) matrix into shared memory at row stride
// LD; rows >= valid_rows are zero-filled (never read).
template <typename T, int D, int LD, int ROWS>
__device__ __forceinline__ void load_tile_async(T* smem, const T* src, int64_t row_stride,
                                                int64_t valid_rows) {
  constexpr int CPR = D / 8;  // 16-byte chunks per row
#pragma unroll
  for (int c = threadIdx.x; c < ROWS * CPR; c += kPrefillThreads) {
    const int row = c / CPR;
    const int col = (c % CPR) * 8;
    const bool ok = row < valid_rows;
    const T* g = ok ? src + row * row_stride + col : src;
    cp_async16(smem_addr(smem + row * LD + col), g, ok);
  }
}

// Row i's lse (natural log) and, when asked for, its stats (max m, log2 row sum l), m and lse
// in the log2 domain. A row with l == 0 saw no key: -inf, (-inf, 0). A NaN l (NaN scores) gives
// NaN lse and max, as the reference does (the max may have skipped the NaN scores).
__device__ __forceinline__ void store_row_stats(const AttentionFwdParams& p, int64_t i, float m,
                                                float l) {
  const bool seen = l != 0.f;
  const float log_sum = seen ? __log2f(l) : 0.f;
  p.lse[i] = seen ? (m + log_sum) * kLn2 : -INFINITY;
  if (p.row_max != nullptr) {
    p.row_max[i] = seen ? (l == l ? m : l) : -INFINITY;
    p.row_log_sum[i] = log_sum;
  }
}

// Packed rows [lo, hi) of head h: out 0, lse -inf; rows strided over the grid's x blocks.
template <typename T, int D>
__device__ void write_empty_rows(const AttentionFwdParams& p, int64_t h, int64_t lo, int64_t hi) {
  for (int64_t r = lo + int64_t(blockIdx.x) * kPrefillThreads + threadIdx.x; r < hi;
       r += int64_t(gridDim.x) * kPrefillThreads) {
    T* o = static_cast<T*>(p.out) + (r * p.Hq + h) * D;
    for (int d = 0; d < D; ++d) o[d] = attn_from_float<T>(0.f);
    store_row_stats(p, h * p.Sq + r, -INFINITY, 0.f);
  }
}

// ------------------------------------------------------------------------------------------------
// The kernel. Grid: x = row blocks (strided over when the sequence has more), y = Hq, z = B.
// Dynamic shared memory: PrefillConfig<D>::kSmemBytes.
template <typename T, int D>
__global__ void __launch_bounds__(kPrefillThreads)
    attention_prefill_kernel(const AttentionFwdParams p) {
  using Cfg = PrefillConfig<D>;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, LD = Cfg::kStride;
  constexpr int NT = BN / 8;  // score tiles (8 keys each) per warp
  constexpr int DT = D / 8;   // output tiles (8 dims each) per warp
  constexpr int KS = D / 16;  // k-steps of Q K^T
  static_assert(NT % 2 == 0 && DT % 2 == 0, "fragments are loaded in pairs");

  T* sQ = reinterpret_cast<T*>(dynamic_smem());
  T* sK = sQ + BM * LD;
  T* sV = sK + BN * LD;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t kvh = h / (p.Hq / p.Hkv);
  const bool packed = p.cu_seqlens_q != nullptr;

  // This sequence's rows and keys.
  int64_t q0 = 0, Sq_b = p.Sq, k0 = 0, Sk_b = p.Sk;
  if (packed) {
    auto clamp = [](int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); };
    q0 = clamp(p.cu_seqlens_q[b], 0, p.Sq);
    Sq_b = clamp(p.cu_seqlens_q[b + 1], q0, p.Sq) - q0;
    k0 = clamp(p.cu_seqlens_k[b], 0, p.Sk);
    Sk_b = clamp(p.cu_seqlens_k[b + 1], k0, p.Sk) - k0;
    // Packed rows outside every sequence: out 0, lse -inf (this head's share).
    if (b == 0) write_empty_rows<T, D>(p, h, 0, q0);
    if (b == p.B - 1) write_empty_rows<T, D>(p, h, clamp(p.cu_seqlens_q[p.B], 0, p.Sq), p.Sq);
  }
  if (p.seqused_k != nullptr) {
    const int64_t u = p.seqused_k[b];
    Sk_b = u < 0 ? 0 : (u < Sk_b ? u : Sk_b);
  }
  const int64_t causal_off = p.causal_top_left ? 0 : Sk_b - Sq_b;

  const T* qb = static_cast<const T*>(p.q) + (packed ? 0 : b * p.q_batch_stride) +
                q0 * p.q_row_stride + h * p.q_head_stride;
  const T* kb = static_cast<const T*>(p.k) + (packed ? 0 : b * p.k_batch_stride) +
                k0 * p.k_row_stride + kvh * p.k_head_stride;
  const T* vb = static_cast<const T*>(p.v) + (packed ? 0 : b * p.v_batch_stride) +
                k0 * p.v_row_stride + kvh * p.v_head_stride;
  const float* biasb =
      p.bias == nullptr ? nullptr : p.bias + b * p.bias_batch_stride + h * p.bias_head_stride;
  const float sl2 = p.scale * kLog2e;

  const int g = lane >> 2, t4 = lane & 3;
  const int wrow = warp * 16;  // the warp's first row in the block

  // Row blocks in reverse order of blockIdx.x: with a causal mask the last rows see the most
  // keys, and their blocks are launched first (shorter tail).
  const int64_t first_block = int64_t(gridDim.x) - 1 - blockIdx.x;
  for (int64_t m0 = first_block * BM; m0 < Sq_b; m0 += int64_t(gridDim.x) * BM) {
    // Keys [0, n_end) are seen by some row of this block.
    int64_t n_end = Sk_b;
    if (p.causal) {
      const int64_t last_row = (m0 + BM < Sq_b ? m0 + BM : Sq_b) - 1;
      const int64_t lim = last_row + causal_off + 1;
      n_end = lim < n_end ? lim : n_end;
      if (n_end < 0) n_end = 0;
    }
    const int n_tiles = int((n_end + BN - 1) / BN);

    if (n_tiles > 0) {
      load_tile_async<T, D, LD, BM>(sQ, qb + m0 * p.q_row_stride, p.q_row_stride, Sq_b - m0);
      load_tile_async<T, D, LD, BN>(sK, kb, p.k_row_stride, n_end);
      cp_async_commit();
    }

    float o[DT][4];
#pragma unroll
    for (int d = 0; d < DT; ++d)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};

    for (int nt = 0; nt < n_tiles; ++nt) {
      const int64_t n0 = int64_t(nt) * BN;
      cp_async_wait_all();  // K tile nt (and Q)
      __syncthreads();      // ... visible to all; every warp is done with V tile nt - 1
      load_tile_async<T, D, LD, BN>(sV, vb + n0 * p.v_row_stride, p.v_row_stride, n_end - n0);
      cp_async_commit();

      // S = Q K^T for the warp's 16 rows and the tile's BN keys.
      float s[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t a[4];
        ldmatrix_x4(a, smem_addr(sQ + (wrow + (lane & 15)) * LD + ks * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          uint32_t kf[4];
          ldmatrix_x4(kf, smem_addr(sK + (np * 16 + (lane >> 4) * 8 + (lane & 7)) * LD +
                                    ks * 16 + ((lane >> 3) & 1) * 8));
          mma16816<T>(s[2 * np], a, kf[0], kf[1]);
          mma16816<T>(s[2 * np + 1], a, kf[2], kf[3]);
        }
      }

      // Base-2 scores, plus the bias, then the masks (a masked key is -inf whatever its bias).
      // Element e of tile j: row wrow + g (+ 8 for e >= 2), key n0 + 8 j + 2 t4 (+ 1 for odd e).
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] *= sl2;
      if (biasb != nullptr) {
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
          const int64_t row = m0 + wrow + g + (e >> 1) * 8;
          if (row >= Sq_b) continue;
          const float* brow = biasb + row * p.bias_row_stride;
#pragma unroll
          for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int64_t col = n0 + j * 8 + t4 * 2 + c;
              if (col < n_end) {
                s[j][e + c] = fmaf(bias_floor(__ldg(brow + col * p.bias_col_stride)), kLog2e, s[j][e + c]);
              }
            }
          }
        }
      }
      // Only tiles that cross the causal diagonal or the end of the keys test each element:
      // keys from lim[hr] on (relative to n0) are masked in row g + 8 hr.
      const bool need_mask = n0 + BN > n_end || (p.causal && n0 + BN - 1 > m0 + causal_off);
      if (need_mask) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          int64_t lim = n_end - n0;
          if (p.causal) {
            const int64_t c = m0 + wrow + g + 8 * hr + causal_off + 1 - n0;
            lim = c < lim ? c : lim;
          }
#pragma unroll
          for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              if (j * 8 + t4 * 2 + c >= lim) s[j][2 * hr + c] = -INFINITY;
            }
          }
        }
      }

      // Online softmax: rows g (elements 0, 1) and g + 8 (elements 2, 3).
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * hr], s[j][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
        const float m_new = fmaxf(m_run[hr], mx);
        const float m_safe = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m_run[hr] - m_safe);
        m_run[hr] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 2 * hr; e < 2 * hr + 2; ++e) {
            s[j][e] = exp2f(s[j][e] - m_safe);
            sum += s[j][e];
          }
        }
        l_run[hr] = l_run[hr] * alpha + sum;  // this lane's columns; the quad is summed at the end
#pragma unroll
        for (int d = 0; d < DT; ++d) {
          o[d][2 * hr] *= alpha;
          o[d][2 * hr + 1] *= alpha;
        }
      }

      cp_async_wait_all();  // V tile nt
      __syncthreads();      // ... visible to all; every warp is done with K tile nt
      if (nt + 1 < n_tiles) {
        load_tile_async<T, D, LD, BN>(sK, kb + (n0 + BN) * p.k_row_stride, p.k_row_stride,
                                      n_end - n0 - BN);
      }
      cp_async_commit();

      // O += P V.
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < DT / 2; ++dp) {
          uint32_t vf[4];
          ldmatrix_x4_trans(vf, smem_addr(sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD +
                                          dp * 16 + (lane >> 4) * 8));
          mma16816<T>(o[2 * dp], a, vf[0], vf[1]);
          mma16816<T>(o[2 * dp + 1], a, vf[2], vf[3]);
        }
      }
    }
    cp_async_wait_all();
    __syncthreads();  // shared memory free for the next row block

    // Normalize and write rows g and g + 8 of the warp.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = l_run[hr];
      l += __shfl_xor_sync(kFullMask, l, 1);
      l += __shfl_xor_sync(kFullMask, l, 2);
      const int64_t row = m0 + wrow + g + 8 * hr;
      if (row >= Sq_b) continue;
      const float inv_l = l != 0.f ? 1.f / l : 0.f;  // (a NaN l, from NaN scores, stays NaN)
      const int64_t orow = packed ? q0 + row : b * p.Sq + row;  // row of the (.., Hq, D) output
      T* out = static_cast<T*>(p.out) + (orow * p.Hq + h) * D;
#pragma unroll
      for (int d = 0; d < DT; ++d) {
        const uint32_t w = pack2<T>(o[d][2 * hr] * inv_l, o[d][2 * hr + 1] * inv_l);
        *reinterpret_cast<uint32_t*>(out + d * 8 + t4 * 2) = w;
      }
      if (t4 == 0) store_row_stats(p, packed ? h * p.Sq + q0 + row : (b * p.Hq + h) * p.Sq + row, m_run[hr], l);
    }
  }
}

}  // namespace attention_kernels
}  // namespace lmkern
