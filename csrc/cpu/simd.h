// Minimal SIMD layer for the CPU kernels: one "register" of fp32 lanes per instruction set, with
// loads and stores that convert from/to float32, bfloat16 and float16 on the fly.
//
// The extension is compiled for baseline x86-64 (SSE2) or aarch64: no -mavx2/-march flags, so
// the wheel runs anywhere. The x86 sets (GCC only; other compilers get Portable) are compiled
// under `#pragma GCC target` regions (LMKERN_TARGET_*) and picked at run time (pick_kernels in
// norm_cpu.cpp); a kernel that uses one of them must be compiled inside the same region, so the
// intrinsics inline. Every set has the same static interface:
//   R, L                    register type and its number of fp32 lanes
//   zero, set1, add, sub, mul, fmadd (a*b+c), hsum (sum of lanes)
//   load(const T*), store(T*, R)         full register, T in {float, BFloat16, Half}
//   load(const T*, n), store(T*, R, n)   first n < L lanes only; lanes >= n load as 0 and are
//                                        never read or written in memory
//   keep(R, n)                           lanes >= n set to 0
//   rounded(R)                           a itself, but opaque to the compiler: a product passed
//                                        through it is rounded, never fused into a later add
// Conversions round to nearest even, like c10::BFloat16/c10::Half; any NaN stays NaN.
#pragma once

// The kernels are built from small functions and lambdas that must inline into the row loops.
#define LMKERN_INLINE inline __attribute__((always_inline))
#define LMKERN_LAMBDA_INLINE __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LMKERN_X86_SIMD 1
// GCC 12 reports the _mm*_undefined_* temporaries of its own AVX-512 headers as uninitialized;
// the suppression covers the header's lines only if this is its first inclusion (so include
// simd.h first).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define LMKERN_PRAGMA(x) _Pragma(#x)
#define LMKERN_TARGET_BEGIN(isa) LMKERN_PRAGMA(GCC push_options) LMKERN_PRAGMA(GCC target(isa))
#define LMKERN_TARGET_END LMKERN_PRAGMA(GCC pop_options)
#ifdef LMKERN_EMULATE_AVX512  // test builds: the AVX-512 copy runs on SIMDe (avx512_emulation.h)
#include "avx512_emulation.h"
#define LMKERN_AVX512_ISA "avx2,fma,f16c,bmi2"
#else
#define LMKERN_AVX512_ISA "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,bmi2"
#endif
#define LMKERN_AVX2_ISA "avx2,fma,f16c"
#else
#define LMKERN_X86_SIMD 0
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace lmkern::cpu {

using c10::BFloat16;
using c10::Half;

// Partial loads/stores through a small zeroed buffer, for ISAs without masked 16-bit accesses.
// A macro, not a function, so that it is compiled inside each ISA's target region.
#define LMKERN_PARTIAL_VIA_BUFFER                            \
  template <class T>                                         \
  LMKERN_INLINE static R load(const T* p, int n) {           \
    T buf[L];                                                \
    std::memset(static_cast<void*>(buf), 0, sizeof(buf));    \
    std::memcpy(static_cast<void*>(buf), p, n * sizeof(T));  \
    return load(static_cast<const T*>(buf));                 \
  }                                                          \
  template <class T>                                         \
  LMKERN_INLINE static void store(T* p, R a, int n) {        \
    T buf[L];                                                \
    store(buf, a);                                           \
    std::memcpy(static_cast<void*>(p), buf, n * sizeof(T));  \
  }

// ------------------------------------------------------------------------------ portable
// GCC/Clang vector extensions: 4 floats in one native 128-bit register (SSE2, NEON), whatever
// the target.
struct Portable {
  static constexpr int L = 4;
  typedef float R __attribute__((vector_size(16)));
  typedef int32_t Ri __attribute__((vector_size(16)));
  typedef uint32_t Ru __attribute__((vector_size(16)));
  typedef uint16_t Rh __attribute__((vector_size(8)));

  LMKERN_INLINE static R zero() { return R{0.f, 0.f, 0.f, 0.f}; }
  LMKERN_INLINE static R set1(float a) { return R{a, a, a, a}; }
  LMKERN_INLINE static R add(R a, R b) { return a + b; }
  LMKERN_INLINE static R sub(R a, R b) { return a - b; }
  LMKERN_INLINE static R mul(R a, R b) { return a * b; }
  LMKERN_INLINE static R fmadd(R a, R b, R c) { return a * b + c; }
  LMKERN_INLINE static float hsum(R a) { return (a[0] + a[1]) + (a[2] + a[3]); }
  template <class To, class From>
  LMKERN_INLINE static To bits(From v) {
    To t;
    std::memcpy(&t, &v, sizeof(t));
    return t;
  }

  LMKERN_INLINE static R load(const float* p) {
    R r;
    std::memcpy(&r, p, sizeof(r));
    return r;
  }
  LMKERN_INLINE static R load(const BFloat16* p) {
    Rh h;
    std::memcpy(&h, p, sizeof(h));
    return bits<R>(__builtin_convertvector(h, Ru) << 16);
  }
  LMKERN_INLINE static R load(const Half* p) {
    return R{static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]),
             static_cast<float>(p[3])};
  }
  LMKERN_INLINE static void store(float* p, R a) { std::memcpy(p, &a, sizeof(a)); }
  LMKERN_INLINE static void store(BFloat16* p, R a) {  // as Avx2's bf16_round_bits
    const Ru u = bits<Ru>(a);
    const Ru r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const Ru nan = bits<Ru>(a != a);
    const Rh h = __builtin_convertvector((r & ~nan) | (nan & 0x7fc0u), Rh);
    std::memcpy(static_cast<void*>(p), &h, sizeof(h));
  }
  LMKERN_INLINE static void store(Half* p, R a) {
    for (int j = 0; j < L; ++j) p[j] = static_cast<Half>(a[j]);
  }
  LMKERN_PARTIAL_VIA_BUFFER
  LMKERN_INLINE static R keep(R a, int n) {
    const Ri lanes = {0, 1, 2, 3};
    return bits<R>(bits<Ri>(a) & (lanes < n));
  }
  LMKERN_INLINE static R rounded(R a) {
#if defined(__x86_64__)
    asm("" : "+x"(a));
#elif defined(__aarch64__)
    asm("" : "+w"(a));
#else
    asm volatile("" : "+m"(a));
#endif
    return a;
  }
};

#if LMKERN_X86_SIMD
LMKERN_TARGET_BEGIN(LMKERN_AVX2_ISA)
// bfloat16 <-> float32: bf16 is the top half of an fp32. Rounding to nearest even adds
// 0x7fff + (bit 16) before truncating; a NaN is replaced by the canonical 0x7fc0 (the rounding
// add could otherwise carry a NaN with a small payload into inf).
LMKERN_INLINE __m256i bf16_round_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i biased = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
  const __m256i r = _mm256_srli_epi32(biased, 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
}

struct Avx2 {
  static constexpr int L = 8;
  using R = __m256;
  LMKERN_INLINE static R zero() { return _mm256_setzero_ps(); }
  LMKERN_INLINE static R set1(float a) { return _mm256_set1_ps(a); }
  LMKERN_INLINE static R add(R a, R b) { return _mm256_add_ps(a, b); }
  LMKERN_INLINE static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  LMKERN_INLINE static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  LMKERN_INLINE static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  LMKERN_INLINE static float hsum(R a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  LMKERN_INLINE static R load(const float* p) { return _mm256_loadu_ps(p); }
  LMKERN_INLINE static R load(const BFloat16* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
  }
  LMKERN_INLINE static R load(const Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  LMKERN_INLINE static void store(float* p, R a) { _mm256_storeu_ps(p, a); }
  LMKERN_INLINE static void store(BFloat16* p, R a) {
    const __m256i r = bf16_round_bits(a);  // 8 x 32-bit values <= 0xffff: packus is exact
    const __m128i h =
        _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
  LMKERN_INLINE static void store(Half* p, R a) {
    const __m128i h = _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  }
  LMKERN_INLINE static __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  LMKERN_INLINE static R load(const float* p, int n) {
    return _mm256_maskload_ps(p, lanes_below(n));
  }
  LMKERN_INLINE static void store(float* p, R a, int n) {
    _mm256_maskstore_ps(p, lanes_below(n), a);
  }
  LMKERN_PARTIAL_VIA_BUFFER  // the float overloads above (masked) are preferred for fp32
  LMKERN_INLINE static R keep(R a, int n) {
    return _mm256_and_ps(a, _mm256_castsi256_ps(lanes_below(n)));
  }
  LMKERN_INLINE static R rounded(R a) {
    asm("" : "+x"(a));
    return a;
  }
};
LMKERN_TARGET_END

LMKERN_TARGET_BEGIN(LMKERN_AVX512_ISA)
struct Avx512 {
  static constexpr int L = 16;
  using R = __m512;
  LMKERN_INLINE static R zero() { return _mm512_setzero_ps(); }
  LMKERN_INLINE static R set1(float a) { return _mm512_set1_ps(a); }
  LMKERN_INLINE static R add(R a, R b) { return _mm512_add_ps(a, b); }
  LMKERN_INLINE static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  LMKERN_INLINE static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  LMKERN_INLINE static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  LMKERN_INLINE static float hsum(R a) {
    return Avx2::hsum(_mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)));
  }

  LMKERN_INLINE static __mmask16 mask(int n) {
    return static_cast<__mmask16>(_bzhi_u32(0xffffu, n));
  }
  LMKERN_INLINE static R from_bf16(__m256i b) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
  }
  LMKERN_INLINE static __m256i to_bf16(R a) {  // as bf16_round_bits
    const __m512i u = _mm512_castps_si512(a);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i biased = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    const __mmask16 nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    const __m512i r =
        _mm512_mask_mov_epi32(_mm512_srli_epi32(biased, 16), nan, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
  }
  LMKERN_INLINE static __m256i to_half(R a) {
    return _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  LMKERN_INLINE static __m256i load256(const void* p) {
    return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  }
  LMKERN_INLINE static void store256(void* p, __m256i v) {
    _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  }

  LMKERN_INLINE static R load(const float* p) { return _mm512_loadu_ps(p); }
  LMKERN_INLINE static R load(const BFloat16* p) { return from_bf16(load256(p)); }
  LMKERN_INLINE static R load(const Half* p) { return _mm512_cvtph_ps(load256(p)); }
  LMKERN_INLINE static void store(float* p, R a) { _mm512_storeu_ps(p, a); }
  LMKERN_INLINE static void store(BFloat16* p, R a) { store256(p, to_bf16(a)); }
  LMKERN_INLINE static void store(Half* p, R a) { store256(p, to_half(a)); }
  // Masked accesses never touch memory in the masked-off lanes.
  LMKERN_INLINE static R load(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  LMKERN_INLINE static R load(const BFloat16* p, int n) {
    return from_bf16(_mm256_maskz_loadu_epi16(mask(n), p));
  }
  LMKERN_INLINE static R load(const Half* p, int n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p));
  }
  LMKERN_INLINE static void store(float* p, R a, int n) { _mm512_mask_storeu_ps(p, mask(n), a); }
  LMKERN_INLINE static void store(BFloat16* p, R a, int n) {
    _mm256_mask_storeu_epi16(p, mask(n), to_bf16(a));
  }
  LMKERN_INLINE static void store(Half* p, R a, int n) {
    _mm256_mask_storeu_epi16(p, mask(n), to_half(a));
  }
  LMKERN_INLINE static R keep(R a, int n) { return _mm512_maskz_mov_ps(mask(n), a); }
  LMKERN_INLINE static R rounded(R a) {
#ifdef LMKERN_EMULATE_AVX512  // no 512-bit registers to name
    asm volatile("" : "+m"(a));
#else
    asm("" : "+v"(a));
#endif
    return a;
  }
};
LMKERN_TARGET_END
#endif  // LMKERN_X86_SIMD

}  // namespace lmkern::cpu
