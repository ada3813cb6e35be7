// The attention CUDA kernels' own code (csrc/include/lmkern/attention_decode.cuh and
// attention_prefill.cuh) run on the CPU. Every CUDA thread of a block is a std::thread; blocks run
// one after another. The few CUDA language pieces the kernels use are emulated here:
//   __shared__ arrays are static (one copy, shared by the block's threads), __syncthreads and
//   __syncwarp are barriers, __shfl_xor_sync exchanges through a per-warp buffer between two warp
//   barriers, fp16/bf16 are 16-bit patterns converted with round-to-nearest-even;
//   the sm_80 PTX wrappers of attention_prefill.cuh (LMKERN_ATTENTION_HOST_EMULATION) follow the
//   PTX ISA: ldmatrix.x4 (.trans) hands each lane the elements of the four 8x8 matrices whose row
//   addresses lanes 8m..8m+7 give; mma.m16n8k16 assembles A (16x16), B (16x8) from all 32 lanes'
//   fragments and returns each lane its C elements; cp.async copies land at cp.async.wait_group
//   (so a read before the wait would see stale data).
// So the thread layouts, index math, masks, barriers and fragment layouts are the kernels' own;
// only the order of fp32 additions inside one mma differs from the hardware's.
//
// Built and driven by tests/test_attention_cuda_algo.py (no GPU needed), with an include directory
// whose cuda_runtime.h / cuda_fp16.h / cuda_bf16.h are empty (everything is defined here):
//   attention_cuda_algo IN OUT
// IN (little-endian): int64 mode (0 decode, 1 forward), then per mode (see read_decode /
// read_forward); OUT: float32 out (q's shape), float32 lse, and for the forward its stats (row
// max, then row log-sum, each laid out as lse).
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

// ------------------------------------------------------------------------------------------------
// CUDA language emulation

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)
#define __restrict__ __restrict

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

thread_local dim3 threadIdx, blockIdx;
dim3 gridDim, blockDim;

inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}

struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t s = uint32_t(h.bits >> 15) << 31;
  const int e = (h.bits >> 10) & 0x1f;
  const uint32_t m = h.bits & 0x3ff;
  if (e == 0x1f) return __uint_as_float(s | 0x7f800000u | (m << 13));
  if (e == 0) {  // subnormal or zero: m * 2^-24
    const float v = std::ldexp(float(m), -24);
    return s ? -v : v;
  }
  return __uint_as_float(s | (uint32_t(e - 15 + 127) << 23) | (m << 13));
}
inline __half __float2half_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint16_t s = uint16_t((u >> 16) & 0x8000);
  if (std::isnan(f)) return {uint16_t(s | 0x7e00)};
  const float a = std::fabs(f);
  if (a >= 65520.f) return {uint16_t(s | 0x7c00)};  // rounds to inf
  if (a < 6.103515625e-05f) {                       // subnormal half: multiples of 2^-24
    const float q = std::nearbyint(a * 16777216.f);   // round half to even (default mode)
    return {uint16_t(s | uint16_t(q))};
  }
  const uint32_t au = u & 0x7fffffffu;
  uint32_t e = (au >> 23) - 127 + 15;
  uint32_t m = au & 0x7fffff;
  uint32_t hm = m >> 13;
  const uint32_t rest = m & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (hm & 1))) {
    if (++hm == 0x400) {
      hm = 0;
      ++e;
    }
  }
  return {uint16_t(s | (e << 10) | hm)};
}
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(unsigned short b) { return {b}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(uint32_t(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u = __float_as_uint(f);
  if (std::isnan(f)) return {uint16_t((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {uint16_t(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline float __log2f(float x) { return std::log2(x); }
inline float __logf(float x) { return std::log(x); }
inline float __expf(float x) { return std::exp(x); }

// One block's synchronization state.
struct BlockCtx {
  explicit BlockCtx(int threads) : block(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  float fx[32][32];
  uint32_t ux[32][32][6];
};
thread_local BlockCtx* ctx = nullptr;

inline void __syncthreads() { ctx->block.arrive_and_wait(); }
inline void __syncwarp() { ctx->warps[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  ctx->fx[w][lane] = v;
  __syncwarp();
  const float r = ctx->fx[w][lane ^ off];
  __syncwarp();
  return r;
}

// Runs kernel() for every block of the grid, `threads` threads a block.
template <typename F>
void launch(dim3 grid, unsigned threads, F kernel) {
  gridDim = grid;
  blockDim = dim3{threads, 1, 1};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        BlockCtx c{static_cast<int>(threads)};
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < threads; ++t) {
          ts.emplace_back([&, t] {
            ctx = &c;
            threadIdx = dim3{t, 0, 0};
            blockIdx = dim3{x, y, z};
            kernel();
          });
        }
        for (auto& th : ts) th.join();
      }
}

// ------------------------------------------------------------------------------------------------
// sm_80 PTX wrappers of attention_prefill.cuh, emulated.

alignas(16) unsigned char g_dyn_smem[256 * 1024];
struct PendingCopy {
  uint32_t dst;
  const void* src;
  bool pred;
};
thread_local std::vector<PendingCopy> g_pending;

namespace lmkern {
namespace attention_kernels {

inline unsigned char* dynamic_smem() { return g_dyn_smem; }
inline uint32_t smem_addr(const void* p) {
  return uint32_t(static_cast<const unsigned char*>(p) - g_dyn_smem);
}
inline void cp_async16(uint32_t dst, const void* src, bool pred) {
  g_pending.push_back({dst, src, pred});
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() {
  for (const PendingCopy& c : g_pending) {
    if (c.pred) {
      std::memcpy(g_dyn_smem + c.dst, c.src, 16);
    } else {
      std::memset(g_dyn_smem + c.dst, 0, 16);
    }
  }
  g_pending.clear();
}

inline uint16_t smem_u16(uint32_t addr) {
  uint16_t v;
  std::memcpy(&v, g_dyn_smem + addr, 2);
  return v;
}

inline void ldmatrix_emulated(uint32_t (&r)[4], uint32_t addr, bool trans) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  ctx->ux[w][lane][0] = addr;
  __syncwarp();
  const int g = lane >> 2, t = lane & 3;
  for (int m = 0; m < 4; ++m) {
    uint32_t lo, hi;
    if (!trans) {  // row g, columns 2t, 2t + 1
      const uint32_t row = ctx->ux[w][8 * m + g][0];
      lo = smem_u16(row + 4 * t);
      hi = smem_u16(row + 4 * t + 2);
    } else {  // rows 2t, 2t + 1, column g
      lo = smem_u16(ctx->ux[w][8 * m + 2 * t][0] + 2 * g);
      hi = smem_u16(ctx->ux[w][8 * m + 2 * t + 1][0] + 2 * g);
    }
    r[m] = lo | (hi << 16);
  }
  __syncwarp();
}
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { ldmatrix_emulated(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { ldmatrix_emulated(r, addr, true); }

template <typename T>
inline float bits_to_float(uint32_t b) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__half{uint16_t(b)});
  } else {
    return __bfloat162float(__nv_bfloat16{uint16_t(b)});
  }
}

// c += A B for the warp; A element (row, k) is in lane (row % 8) * 4 + (k % 8) / 2, register
// (row >= 8) + 2 (k >= 8), half k % 2; B element (k, col) in lane col * 4 + (k % 8) / 2,
// register b0 / b1 for k < 8 / k >= 8, half k % 2; C element (row, col) in lane
// (row % 8) * 4 + col / 2, register 2 (row >= 8) + col % 2.
template <typename T>
inline void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  for (int i = 0; i < 4; ++i) ctx->ux[w][lane][i] = a[i];
  ctx->ux[w][lane][4] = b0;
  ctx->ux[w][lane][5] = b1;
  __syncwarp();
  auto A = [&](int row, int k) {
    const uint32_t reg = ctx->ux[w][(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)];
    return bits_to_float<T>(k % 2 ? reg >> 16 : reg & 0xffff);
  };
  auto B = [&](int k, int col) {
    const uint32_t reg = ctx->ux[w][col * 4 + (k % 8) / 2][k >= 8 ? 5 : 4];
    return bits_to_float<T>(k % 2 ? reg >> 16 : reg & 0xffff);
  };
  const int g = lane >> 2, t = lane & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
    c[e] += s;
  }
  __syncwarp();
}

}  // namespace attention_kernels
}  // namespace lmkern

#define LMKERN_ATTENTION_HOST_EMULATION 1
#include "lmkern/attention_decode.cuh"
#include "lmkern/attention_prefill.cuh"

using namespace lmkern;
using namespace lmkern::attention_kernels;

// ------------------------------------------------------------------------------------------------
// Driver

namespace {

FILE* g_in = nullptr;

int64_t read_i64() {
  int64_t v;
  if (std::fread(&v, 8, 1, g_in) != 1) std::exit(3);
  return v;
}
template <typename V>
std::vector<V> read_vec(size_t n) {
  std::vector<V> v(n);
  if (n > 0 && std::fread(v.data(), sizeof(V), n, g_in) != n) std::exit(3);
  return v;
}
template <typename T>
std::vector<T> to_type(const std::vector<float>& f) {
  std::vector<T> t(f.size());
  for (size_t i = 0; i < f.size(); ++i) t[i] = attn_from_float<T>(f[i]);
  return t;
}
template <typename T>
std::vector<float> to_float_vec(const std::vector<T>& t) {
  std::vector<float> f(t.size());
  for (size_t i = 0; i < t.size(); ++i) f[i] = attn_to_float(t[i]);
  return f;
}

using DecodeFn = void (*)(AttentionDecodeParams, int, float*, float*);

template <typename T, int TPK, int NV>
DecodeFn decode_rows(int rows) {
  switch (rows) {
    case 1: return attention_decode_kernel<T, TPK, NV, 1>;
    case 4: return attention_decode_kernel<T, TPK, NV, 4>;
    case 8: return attention_decode_kernel<T, TPK, NV, 8>;
  }
  return nullptr;
}

// The launcher's choice (csrc/cuda/attention_kernels.cu): rows from R, TPK from D.
template <typename T>
DecodeFn decode_fn(int64_t D, int rows) {
  constexpr int VEC = 16 / int(sizeof(T));
  const int64_t nvec = D / VEC;
  int tpk = 4;
  while (tpk < 32 && tpk < nvec) tpk *= 2;
  const int64_t nv = (nvec + tpk - 1) / tpk;
  if (nv == 1) {
    switch (tpk) {
      case 4: return decode_rows<T, 4, 1>(rows);
      case 8: return decode_rows<T, 8, 1>(rows);
      case 16: return decode_rows<T, 16, 1>(rows);
      case 32: return decode_rows<T, 32, 1>(rows);
    }
  }
  if constexpr (VEC == 4) {
    if (nv == 2) return decode_rows<T, 32, 2>(rows);
  }
  return nullptr;
}

// int64 dtype, B, Sq, Hq, Hkv, D, Smax, causal, splits; float32 scale; float32 q, k, v (values
// of the dtype); int32 cache_seqlens[B].
template <typename T>
void run_decode(FILE* out_file) {
  const int64_t B = read_i64(), Sq = read_i64(), Hq = read_i64(), Hkv = read_i64();
  const int64_t D = read_i64(), Smax = read_i64(), causal = read_i64(), splits = read_i64();
  const float scale = read_vec<float>(1)[0];
  std::vector<T> q = to_type<T>(read_vec<float>(B * Sq * Hq * D));
  std::vector<T> k = to_type<T>(read_vec<float>(B * Smax * Hkv * D));
  std::vector<T> v = to_type<T>(read_vec<float>(B * Smax * Hkv * D));
  std::vector<int32_t> lens = read_vec<int32_t>(B);
  std::vector<T> out(B * Sq * Hq * D);
  std::vector<float> lse(B * Hq * Sq);

  AttentionDecodeParams p;
  p.q = q.data();
  p.q_batch_stride = Sq * Hq * D;
  p.q_row_stride = Hq * D;
  p.q_head_stride = D;
  p.k = k.data();
  p.v = v.data();
  p.k_batch_stride = p.v_batch_stride = Smax * Hkv * D;
  p.k_row_stride = p.v_row_stride = Hkv * D;
  p.k_head_stride = p.v_head_stride = D;
  p.cache_seqlens = lens.data();
  p.out = out.data();
  p.lse = lse.data();
  p.B = B;
  p.Sq = Sq;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.D = D;
  p.Smax = Smax;
  p.scale = scale;
  p.causal = causal != 0;
  const int64_t R = (Hq / Hkv) * Sq;
  const int rows = R <= 1 ? 1 : (R <= 4 ? 4 : 8);
  const int64_t row_tiles = (R + rows - 1) / rows;
  const DecodeFn fn = decode_fn<T>(D, rows);
  if (fn == nullptr) std::exit(4);
  std::vector<float> o_part, lse_part;
  float* op = nullptr;
  float* lp = nullptr;
  if (splits > 1) {
    o_part.assign(splits * B * Hq * Sq * D, NAN);  // garbage the kernels must overwrite
    lse_part.assign(splits * B * Hq * Sq, NAN);
    op = o_part.data();
    lp = lse_part.data();
  }
  launch(dim3{unsigned(B * Hkv * row_tiles), unsigned(splits), 1}, kDecodeThreads,
         [&] { fn(p, int(row_tiles), op, lp); });
  if (splits > 1) {
    const int64_t BHS = B * Hq * Sq;
    launch(dim3{unsigned((BHS + kCombineWarps - 1) / kCombineWarps), 1, 1}, kCombineWarps * 32, [&] {
      attention_decode_combine_kernel<T>(op, lp, int(splits), Hq, Sq, BHS, D, out.data(),
                                         lse.data());
    });
  }
  const std::vector<float> of = to_float_vec(out);
  std::fwrite(of.data(), 4, of.size(), out_file);
  std::fwrite(lse.data(), 4, lse.size(), out_file);
}

using PrefillFn = void (*)(AttentionFwdParams);

template <typename T>
PrefillFn prefill_fn(int64_t D) {
  switch (D) {
    case 32: return attention_prefill_kernel<T, 32>;
    case 64: return attention_prefill_kernel<T, 64>;
    case 80: return attention_prefill_kernel<T, 80>;
    case 96: return attention_prefill_kernel<T, 96>;
    case 128: return attention_prefill_kernel<T, 128>;
    case 160: return attention_prefill_kernel<T, 160>;
    case 192: return attention_prefill_kernel<T, 192>;
    case 256: return attention_prefill_kernel<T, 256>;
  }
  return nullptr;
}

// int64 B, Hq, Hkv, D, Sq, Sk (packed: totals), packed, causal, top_left, max_seqlen_q,
// has_seqused, bias_numel (0: no bias), bias strides[4]; float32 scale; float32 q, k, v (dense
// (B, S, H, D) or packed (total, H, D), contiguous); packed: int32 cu_q[B + 1], cu_k[B + 1];
// int32 seqused[B] if has_seqused; float32 bias storage[bias_numel].
template <typename T>
void run_forward(FILE* out_file) {
  const int64_t B = read_i64(), Hq = read_i64(), Hkv = read_i64(), D = read_i64();
  const int64_t Sq = read_i64(), Sk = read_i64(), packed = read_i64(), causal = read_i64();
  const int64_t top_left = read_i64(), max_q = read_i64(), has_used = read_i64();
  const int64_t bias_numel = read_i64();
  int64_t bs[4];
  for (int64_t& s : bs) s = read_i64();
  const float scale = read_vec<float>(1)[0];
  const int64_t nq = (packed ? 1 : B) * Sq * Hq * D, nk = (packed ? 1 : B) * Sk * Hkv * D;
  std::vector<T> q = to_type<T>(read_vec<float>(nq));
  std::vector<T> k = to_type<T>(read_vec<float>(nk));
  std::vector<T> v = to_type<T>(read_vec<float>(nk));
  std::vector<int32_t> cu_q, cu_k, used;
  if (packed) {
    cu_q = read_vec<int32_t>(B + 1);
    cu_k = read_vec<int32_t>(B + 1);
  }
  if (has_used) used = read_vec<int32_t>(B);
  std::vector<float> bias = read_vec<float>(bias_numel);
  // garbage the kernel must overwrite
  std::vector<T> out(nq, attn_from_float<T>(NAN));
  std::vector<float> lse((packed ? 1 : B) * Hq * Sq, NAN);
  std::vector<float> stats(2 * lse.size(), NAN);

  AttentionFwdParams p;
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.q_batch_stride = packed ? 0 : Sq * Hq * D;
  p.k_batch_stride = p.v_batch_stride = packed ? 0 : Sk * Hkv * D;
  p.q_row_stride = Hq * D;
  p.k_row_stride = p.v_row_stride = Hkv * D;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = D;
  if (bias_numel > 0) {
    p.bias = bias.data();
    p.bias_batch_stride = bs[0];
    p.bias_head_stride = bs[1];
    p.bias_row_stride = bs[2];
    p.bias_col_stride = bs[3];
  }
  if (packed) {
    p.cu_seqlens_q = cu_q.data();
    p.cu_seqlens_k = cu_k.data();
  }
  if (has_used) p.seqused_k = used.data();
  p.out = out.data();
  p.lse = lse.data();
  p.row_max = stats.data();
  p.row_log_sum = stats.data() + lse.size();
  p.B = B;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.D = D;
  p.Sq = Sq;
  p.Sk = Sk;
  p.max_seqlen_q = max_q;
  p.scale = scale;
  p.causal = causal != 0;
  p.causal_top_left = top_left != 0;
  const PrefillFn fn = prefill_fn<T>(D);
  if (fn == nullptr) std::exit(4);
  // The launcher's grid (csrc/cuda/attention_kernels.cu).
  constexpr int64_t BM = 64;
  int64_t m_blocks = ((packed ? std::max<int64_t>(max_q, 1) : Sq) + BM - 1) / BM;
  if (packed) m_blocks = std::max<int64_t>(std::min<int64_t>(m_blocks, (Sq + BM - 1) / BM), 1);
  if (B > 0 && Sq > 0) {
    launch(dim3{unsigned(m_blocks), unsigned(Hq), unsigned(B)}, kPrefillThreads, [&] { fn(p); });
  }
  const std::vector<float> of = to_float_vec(out);
  std::fwrite(of.data(), 4, of.size(), out_file);
  std::fwrite(lse.data(), 4, lse.size(), out_file);
  std::fwrite(stats.data(), 4, stats.size(), out_file);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  g_in = std::fopen(argv[1], "rb");
  FILE* out = std::fopen(argv[2], "wb");
  if (g_in == nullptr || out == nullptr) return 2;
  const int64_t mode = read_i64(), dtype = read_i64();
  if (mode == 0) {
    if (dtype == 0) run_decode<float>(out);
    if (dtype == 1) run_decode<__half>(out);
    if (dtype == 2) run_decode<__nv_bfloat16>(out);
  } else {
    if (dtype == 1) run_forward<__half>(out);
    if (dtype == 2) run_forward<__nv_bfloat16>(out);
  }
  std::fclose(out);
  std::fclose(g_in);
  return 0;
}
