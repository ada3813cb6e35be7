// Counter-based random numbers shared by every sampling backend (C++ CPU, CUDA, and, bit for bit,
// the Triton kernels through tl.philox and the reference in lmkern/reference/sampling.py).
//
// Philox4x32-10 (Salmon et al., SC'11), in the form Triton's tl.philox computes it, so that the
// same (key, counter) gives the same 32-bit word on every backend. A sampled row uses
//   key     = its 64-bit seed (k0 = low 32 bits, k1 = high 32 bits)
//   counter = (token index i, stream, 0, 0), stream = row index for a scalar seed, 0 for per-row
//             seeds (then the draw depends only on the row's own seed, not on its batch position)
// and the first output word. No state: any element can be drawn by any thread in any order.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LMKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LMKERN_HOST_DEVICE inline
#endif

namespace lmkern {

struct Philox4x32 {
  static constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  static constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
};

// The first word of Philox4x32-10 at counter (c0, c1, 0, 0) under the 64-bit key `seed`.
LMKERN_HOST_DEVICE uint32_t philox_first_word(uint64_t seed, uint32_t c0, uint32_t c1) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(Philox4x32::kRoundA) * c0;
    const uint64_t p2 = static_cast<uint64_t>(Philox4x32::kRoundB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += Philox4x32::kKeyA;
    k1 += Philox4x32::kKeyB;
  }
  return c0;
}

// A uniform float strictly inside (0, 1): the top 23 bits as the odd integer 2j + 1 over 2^24,
// exactly representable in fp32, so -log(u) is finite and positive on every backend.
LMKERN_HOST_DEVICE float uniform_open01(uint32_t bits) {
  return static_cast<float>(((bits >> 9) << 1) | 1u) * 5.9604644775390625e-08f;  // 2^-24
}

}  // namespace lmkern
