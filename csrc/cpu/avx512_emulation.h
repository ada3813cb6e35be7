// Test builds only (-DLMKERN_EMULATE_AVX512, made by `make test-avx512-emulated`): the
// AVX-512 copy of the CPU kernels compiled against SIMDe's portable versions of the AVX-512
// intrinsics (https://github.com/simd-everywhere/simde), so that a machine without AVX-512 (CI)
// runs that copy's code: 16-lane registers, masked loads and stores, mask compares, bf16/fp16
// packing. It checks lmkern's use of the intrinsics and its L = 16 logic, not the compiler's
// AVX-512 code generation. The real intrinsics' names become SIMDe's (native aliases).
#pragma once

// Every intrinsics header first: the aliases are macros that would break one included later.
#include <x86intrin.h>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

// Masked loads and stores that touch only the lanes of the mask, as the instructions do: SIMDe
// 0.8's read all 64 (32) bytes and store zeros into the masked-off lanes, past the end of a row.
template <class E, int N, class V>
static inline V lmkern_emulated_maskz_load(uint32_t k, const void* p) {
  E lanes[N] = {};
  for (int j = 0; j < N; ++j)
    if (k >> j & 1) std::memcpy(&lanes[j], static_cast<const char*>(p) + j * sizeof(E), sizeof(E));
  V r;
  std::memcpy(&r, lanes, sizeof(r));
  return r;
}
template <class E, int N, class V>
static inline void lmkern_emulated_mask_store(void* p, uint32_t k, V a) {
  E lanes[N];
  std::memcpy(lanes, &a, sizeof(lanes));
  for (int j = 0; j < N; ++j)
    if (k >> j & 1) std::memcpy(static_cast<char*>(p) + j * sizeof(E), &lanes[j], sizeof(E));
}
#undef _mm512_maskz_loadu_ps
#undef _mm512_mask_storeu_ps
#undef _mm256_maskz_loadu_epi16
#undef _mm256_mask_storeu_epi16
#define _mm512_maskz_loadu_ps(k, p) (lmkern_emulated_maskz_load<float, 16, simde__m512>(k, p))
#define _mm512_mask_storeu_ps(p, k, a) (lmkern_emulated_mask_store<float, 16, simde__m512>(p, k, a))
#define _mm256_maskz_loadu_epi16(k, p) (lmkern_emulated_maskz_load<uint16_t, 16, simde__m256i>(k, p))
#define _mm256_mask_storeu_epi16(p, k, a) (lmkern_emulated_mask_store<uint16_t, 16, simde__m256i>(p, k, a))

// The two intrinsics of simd.h's Avx512 that SIMDe 0.8 lacks, lane by lane.
static inline simde__m256i lmkern_emulated_cvtepi32_epi16(simde__m512i a) {  // truncates
  int32_t wide[16];
  int16_t narrow[16];
  std::memcpy(wide, &a, sizeof(wide));
  for (int j = 0; j < 16; ++j) narrow[j] = static_cast<int16_t>(wide[j]);
  simde__m256i r;
  std::memcpy(&r, narrow, sizeof(r));
  return r;
}
static inline simde__m256i lmkern_emulated_cvtps_ph(simde__m512 a) {  // round to nearest even
  float f[16];
  c10::Half h[16];
  std::memcpy(f, &a, sizeof(f));
  for (int j = 0; j < 16; ++j) h[j] = static_cast<c10::Half>(f[j]);
  simde__m256i r;
  std::memcpy(&r, h, sizeof(r));
  return r;
}
#define _mm512_cvtepi32_epi16(a) lmkern_emulated_cvtepi32_epi16(a)
#define _mm512_cvtps_ph(a, rounding) lmkern_emulated_cvtps_ph(a)
