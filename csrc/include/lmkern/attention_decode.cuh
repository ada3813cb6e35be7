// Split-KV decoding attention (flash-decoding) CUDA kernels, framework-free: raw pointers, sizes
// and strides in (AttentionDecodeParams, see attention.h), no torch include. The host side (dtype
// and shape dispatch, number of splits, workspace, launches) is csrc/cuda/attention_kernels.cu.
//
// attention_decode_kernel: one block of kDecodeThreads threads per (batch b, kv head, tile of
// ROWS query rows of that kv head's GQA group, split). The rows of a tile are (query i, query head
// h of the group) pairs, r = i * G + (h mod G) with G = Hq / Hkv, so every K/V element a block
// reads serves all ROWS rows. The block walks its split's share of the row's visible keys in
// tiles of TILE keys:
//   1. scores: a group of TPK consecutive threads holds one key, each thread NV 16-byte vectors of
//      it (the key's D elements spread over the group); the query rows sit in registers in the
//      same layout (pre-multiplied by scale * log2(e)); per-key dot products are reduced across
//      the group by warp shuffles and stored to shared memory, masked keys as -inf. KPT keys per
//      thread per tile: KPT * NV = kDecodeVecsPerThread independent 16-byte loads in flight.
//   2. the tile's V vectors are loaded (same layout) while
//   3. one warp per row updates the row's running max m and sum l (online softmax, base 2) and
//      turns the scores into probabilities exp2(s - m);
//   4. each thread rescales its fp32 partial output (ROWS x its NV vectors) and adds p * v.
// The score buffer is double-buffered, so a tile costs two block barriers. At the end the
// per-key-group partial outputs are summed in shared memory, divided by l and written: to out
// and lse directly with one split, else as fp32 partials (normalized output, lse) that
// attention_decode_combine_kernel merges: lse = logsumexp over splits, out = sum_s exp(lse_s -
// lse) * out_s.
//
// Keys are never loaded past the row's L_b = clamp(cache_seqlens[b], 0, Smax) (nor past the last
// key any of the tile's rows sees when causal: query i sees key j iff j < L_b and
// j <= i + cache_seqlens[b] - Sq), so whatever the cache holds there (NaN included)
// cannot reach the output. A row that sees no key gets l = 0: out 0, lse -inf (the running max of
// such a row stays -inf and is replaced by 0 in the exponentials, so no inf - inf appears).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lmkern/attention.h"

namespace lmkern {
namespace attention_kernels {

constexpr float kLog2e = 1.4426950408889634f;

// An additive bias as the kernels scale it by log2(e): a finite value below -2.3e38 (Hugging
// Face masks with float32's min) would overflow to -inf there and read as "no key", so it is
// raised to -2.3e38, which still weighs nothing beside any ordinary score (a row of only such
// values attends its keys uniformly, as torch does). -inf stays -inf.
__host__ __device__ inline float bias_floor(float b) {
  return b < -2.3e38f && b != -INFINITY ? -2.3e38f : b;
}
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;
// 16-byte K (then V) loads in flight per thread per tile: fewer with 8 rows, whose registers go
// to the rows' queries and partial outputs (and which do 8x the math per byte loaded).
__host__ __device__ constexpr int decode_vecs_per_thread(int rows) { return rows >= 8 ? 4 : 8; }
constexpr int kCombineWarps = 4;         // rows per block of the combine kernel
constexpr int kCombineMaxSplits = 256;   // shared-memory weights per row of the combine kernel

// ------------------------------------------------------------------------------------------------
// Element helpers. Explicit intrinsics: torch builds define __CUDA_NO_HALF_CONVERSIONS__.

template <typename T>
__device__ __forceinline__ T attn_from_float(float v);
template <>
__device__ __forceinline__ float attn_from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half attn_from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 attn_from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float attn_to_float(float v) { return v; }
__device__ __forceinline__ float attn_to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float attn_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// 16 bytes (16 / sizeof(T) elements) unpacked to floats.
template <typename T>
__device__ __forceinline__ void unpack16(const uint4& u, float* f);
template <>
__device__ __forceinline__ void unpack16<float>(const uint4& u, float* f) {
  f[0] = __uint_as_float(u.x);
  f[1] = __uint_as_float(u.y);
  f[2] = __uint_as_float(u.z);
  f[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ float2 half2_bits_to_float2(uint32_t w) {
  return __half22float2(__halves2half2(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)),
                                       __ushort_as_half(static_cast<unsigned short>(w >> 16))));
}
__device__ __forceinline__ float2 bf162_bits_to_float2(uint32_t w) {
  // bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits.
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
template <>
__device__ __forceinline__ void unpack16<__half>(const uint4& u, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = half2_bits_to_float2(w[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}
template <>
__device__ __forceinline__ void unpack16<__nv_bfloat16>(const uint4& u, float* f) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = bf162_bits_to_float2(w[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// Read-only 16-byte load; p must be 16-byte aligned.
__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// ------------------------------------------------------------------------------------------------
// Decode kernel.
//   T     element type of q, k, v, out (float, __half, __nv_bfloat16)
//   TPK   threads per key (4, 8, 16 or 32), a power of two: the head dim's D / VEC vectors are
//         spread over them, vector vi held by thread vi % TPK (as its vector vi / TPK)
//   NV    vectors per thread per key: ceil(D / VEC / TPK) (1 or 2)
//   ROWS  query rows per block (1, 4 or 8)
// Grid: x = B * Hkv * row_tiles (row tile fastest, then kv head), y = splits.
// o_part/lse_part: nullptr with one split (the block then writes out/lse), else the fp32 partials
// [split][b][h][i][D] and [split][b][h][i].
template <typename T, int TPK, int NV, int ROWS>
__global__ void __launch_bounds__(kDecodeThreads)
    attention_decode_kernel(const AttentionDecodeParams p, int row_tiles, float* o_part,
                            float* lse_part) {
  constexpr int VEC = 16 / int(sizeof(T));
  constexpr int KG = kDecodeThreads / TPK;       // keys processed side by side
  constexpr int VPT = decode_vecs_per_thread(ROWS);
  constexpr int KPT = VPT / NV;                   // keys per thread per tile
  constexpr int TILE = KG * KPT;
  constexpr int DP = TPK * NV * VEC;              // head dim padded to the thread layout
  static_assert(TPK >= 1 && TPK <= 32 && (TPK & (TPK - 1)) == 0, "TPK: a power of two <= 32");
  static_assert(VPT % NV == 0, "NV must divide the vectors per thread");
  static_assert(ROWS <= 2 * kDecodeWarps, "the softmax step gives each warp at most two rows");

  __shared__ float s_p[2][ROWS][TILE];  // scores, then probabilities, of the current tile
  __shared__ float s_m[ROWS], s_l[ROWS], s_alpha[ROWS];
  __shared__ float s_red[KG][DP];       // per-key-group partial outputs of one row

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int li = tid % TPK, kg = tid / TPK;

  int64_t bx = blockIdx.x;
  const int64_t rt = bx % row_tiles;
  bx /= row_tiles;
  const int64_t kvh = bx % p.Hkv;
  const int64_t b = bx / p.Hkv;
  const int split = blockIdx.y;
  const int num_splits = gridDim.y;

  const int64_t G = p.Hq / p.Hkv;
  const int64_t R = G * p.Sq;  // rows of this kv head
  const int64_t r0 = rt * ROWS;
  const int64_t D = p.D;
  const int64_t nvec = D / VEC;
  // The row's keys are [0, L); the causal diagonal is placed by the given length itself, as in
  // the reference (a length beyond Smax reads all Smax slots but moves no query's limit).
  const int64_t L_given = p.cache_seqlens[b];
  const int64_t L = L_given < 0 ? 0 : (L_given > p.Smax ? p.Smax : L_given);

  // Keys this tile of rows may see: [0, kv_end), then this split's share [kv_lo, kv_hi), whole
  // tiles each (the last split's share may be shorter, trailing splits' empty).
  int64_t kv_end = L;
  if (p.causal) {
    const int64_t r_last = (r0 + ROWS < R ? r0 + ROWS : R) - 1;
    const int64_t lim = r_last / G + L_given - p.Sq + 1;
    kv_end = lim < kv_end ? lim : kv_end;
    if (kv_end < 0) kv_end = 0;
  }
  const int64_t per_split = (kv_end + num_splits - 1) / num_splits;
  const int64_t chunk = (per_split + TILE - 1) / TILE * TILE;
  const int64_t kv_lo = int64_t(split) * chunk;
  const int64_t kv_hi = kv_lo + chunk < kv_end ? kv_lo + chunk : kv_end;

  // The query rows, this thread's slices, scaled to base-2 scores; the last key each row sees.
  const float qscale = p.scale * kLog2e;
  float q[ROWS][NV][VEC];
  int limit[ROWS];  // relative to kv_lo: the row sees keys kv_lo + j, j <= limit (< 2^31 keys)
  const T* qbase = static_cast<const T*>(p.q) + b * p.q_batch_stride;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t rr = r0 + r;
    const bool valid = rr < R;
    const int64_t i = valid ? rr / G : 0;
    const int64_t h = kvh * G + (valid ? rr % G : 0);
    const int64_t lim = !valid ? -1 : (p.causal ? i + L_given - p.Sq : L - 1) - kv_lo;
    limit[r] = int(lim < -1 ? -1 : (lim > INT32_MAX ? INT32_MAX : lim));
#pragma unroll
    for (int nv = 0; nv < NV; ++nv) {
      const int64_t vi = li + nv * TPK;
      float f[VEC];
      if (valid && vi < nvec) {
        unpack16<T>(ldg16(qbase + i * p.q_row_stride + h * p.q_head_stride + vi * VEC), f);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) f[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) q[r][nv][e] = f[e] * qscale;
    }
  }

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride;

  float acc[ROWS][NV][VEC];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int nv = 0; nv < NV; ++nv)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[r][nv][e] = 0.f;
  if (tid < ROWS) {
    s_m[tid] = -INFINITY;
    s_l[tid] = 0.f;
  }

  // From here on key indices are relative to kv_lo, as int.
  const int n_keys = int(kv_hi > kv_lo ? kv_hi - kv_lo : 0);
  if (n_keys > 0) {
    kbase += kv_lo * p.k_row_stride;
    vbase += kv_lo * p.v_row_stride;
  }
  int buf = 0;
  for (int t0 = 0; t0 < n_keys; t0 += TILE, buf ^= 1) {
    // 1. Scores of the tile's keys.
    uint4 kr[KPT][NV];
#pragma unroll
    for (int kk = 0; kk < KPT; ++kk) {
      const int j = t0 + kg + kk * KG;
#pragma unroll
      for (int nv = 0; nv < NV; ++nv) {
        const int64_t vi = li + nv * TPK;
        kr[kk][nv] = (j < n_keys && vi < nvec) ? ldg16(kbase + j * p.k_row_stride + vi * VEC)
                                              : make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int kk = 0; kk < KPT; ++kk) {
      const int j = t0 + kg + kk * KG;
      float s[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) s[r] = 0.f;
#pragma unroll
      for (int nv = 0; nv < NV; ++nv) {
        float kf[VEC];
        unpack16<T>(kr[kk][nv], kf);
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
          for (int e = 0; e < VEC; ++e) s[r] = fmaf(q[r][nv][e], kf[e], s[r]);
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int off = TPK / 2; off > 0; off >>= 1) s[r] += __shfl_xor_sync(kFullMask, s[r], off);
      }
      if (li == 0) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          s_p[buf][r][kg + kk * KG] = (j < n_keys && j <= limit[r]) ? s[r] : -INFINITY;
        }
      }
    }

    // 2. The tile's values, in flight during the softmax step.
    uint4 vr[KPT][NV];
#pragma unroll
    for (int kk = 0; kk < KPT; ++kk) {
      const int j = t0 + kg + kk * KG;
#pragma unroll
      for (int nv = 0; nv < NV; ++nv) {
        const int64_t vi = li + nv * TPK;
        vr[kk][nv] = (j < n_keys && vi < nvec) ? ldg16(vbase + j * p.v_row_stride + vi * VEC)
                                              : make_uint4(0u, 0u, 0u, 0u);
      }
    }
    __syncthreads();

    // 3. Online softmax, one warp per row.
    for (int r = warp; r < ROWS; r += kDecodeWarps) {
      const float m_old = s_m[r];
      float mx = -INFINITY;
      for (int jj = lane; jj < TILE; jj += 32) mx = fmaxf(mx, s_p[buf][r][jj]);
      const float m_new = fmaxf(m_old, warp_max(mx));
      const float m_safe = m_new == -INFINITY ? 0.f : m_new;
      float sum = 0.f;
      for (int jj = lane; jj < TILE; jj += 32) {
        const float e = exp2f(s_p[buf][r][jj] - m_safe);
        s_p[buf][r][jj] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_safe);
        s_alpha[r] = alpha;
        s_l[r] = s_l[r] * alpha + sum;
        s_m[r] = m_new;
      }
    }
    __syncthreads();

    // 4. Rescale and accumulate p * v.
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float alpha = s_alpha[r];
#pragma unroll
      for (int nv = 0; nv < NV; ++nv)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[r][nv][e] *= alpha;
    }
#pragma unroll
    for (int kk = 0; kk < KPT; ++kk) {
#pragma unroll
      for (int nv = 0; nv < NV; ++nv) {
        float vf[VEC];
        unpack16<T>(vr[kk][nv], vf);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float pr = s_p[buf][r][kg + kk * KG];
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[r][nv][e] = fmaf(pr, vf[e], acc[r][nv][e]);
        }
      }
    }
  }
  __syncthreads();

  // Sum the key groups' partial outputs row by row, normalize, write.
  const int64_t BHS = p.B * p.Hq * p.Sq;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t rr = r0 + r;
    if (rr >= R) break;  // block-uniform
#pragma unroll
    for (int nv = 0; nv < NV; ++nv)
#pragma unroll
      for (int e = 0; e < VEC; ++e) s_red[kg][(li + nv * TPK) * VEC + e] = acc[r][nv][e];
    __syncthreads();
    const int64_t i = rr / G;
    const int64_t h = kvh * G + rr % G;
    const float l = s_l[r];
    const float inv_l = l > 0.f ? 1.f / l : 0.f;
    const int64_t row = (b * p.Hq + h) * p.Sq + i;  // index into (B, Hq, Sq)
    for (int d = tid; d < D; d += kDecodeThreads) {
      float o = 0.f;
#pragma unroll
      for (int g = 0; g < KG; ++g) o += s_red[g][d];
      o *= inv_l;
      if (o_part == nullptr) {
        static_cast<T*>(p.out)[((b * p.Sq + i) * p.Hq + h) * D + d] = attn_from_float<T>(o);
      } else {
        o_part[(split * BHS + row) * D + d] = o;
      }
    }
    if (tid == 0) {
      const float lse = l > 0.f ? (s_m[r] + __log2f(l)) * kLn2 : -INFINITY;
      if (lse_part == nullptr) {
        p.lse[row] = lse;
      } else {
        lse_part[split * BHS + row] = lse;
      }
    }
    __syncthreads();
  }
}

// Merges the splits' partials: one warp per (b, h, i) row. A row whose every split saw no key
// gets out 0, lse -inf.
template <typename T>
__global__ void __launch_bounds__(kCombineWarps * 32)
    attention_decode_combine_kernel(const float* __restrict__ o_part,
                                    const float* __restrict__ lse_part, int num_splits,
                                    int64_t Hq, int64_t Sq, int64_t BHS, int64_t D, T* out,
                                    float* lse) {
  __shared__ float s_w[kCombineWarps][kCombineMaxSplits];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row = int64_t(blockIdx.x) * kCombineWarps + warp;
  if (row >= BHS) return;  // warp-uniform; no block barrier below
  float m = -INFINITY;
  for (int s = lane; s < num_splits; s += 32) m = fmaxf(m, lse_part[s * BHS + row]);
  m = warp_max(m);
  const int64_t i = row % Sq;
  const int64_t h = (row / Sq) % Hq;
  const int64_t b = row / (Sq * Hq);
  T* orow = out + ((b * Sq + i) * Hq + h) * D;
  if (m == -INFINITY) {
    for (int64_t d = lane; d < D; d += 32) orow[d] = attn_from_float<T>(0.f);
    if (lane == 0) lse[row] = -INFINITY;
    return;
  }
  float sum = 0.f;
  for (int s = lane; s < num_splits; s += 32) sum += __expf(lse_part[s * BHS + row] - m);
  sum = warp_sum(sum);
  const float row_lse = m + __logf(sum);
  for (int s = lane; s < num_splits; s += 32) {
    s_w[warp][s] = __expf(lse_part[s * BHS + row] - row_lse);
  }
  __syncwarp();
  for (int64_t d = lane; d < D; d += 32) {
    float o = 0.f;
    for (int s = 0; s < num_splits; ++s) o = fmaf(s_w[warp][s], o_part[(s * BHS + row) * D + d], o);
    orow[d] = attn_from_float<T>(o);
  }
  if (lane == 0) lse[row] = row_lse;
}

}  // namespace attention_kernels
}  // namespace lmkern
