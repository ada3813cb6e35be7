// Scalar pieces of the CUDA sampling kernels (csrc/include/lmkern/sampling.cuh) that do not depend
// on the thread layout: the order-preserving integer image of a float, the radix-select walk that
// narrows a threshold digit by digit, the fixed-point probability mass, the top-p target and the
// exponential-race key. __host__ __device__ and free of CUDA headers, so that a host program can
// run the same decisions on the CPU (tests/sampling_cuda_algo.cpp, driven by
// tests/test_sampling_cuda_algo.py) and check them against lmkern/reference/sampling.py. The
// C++ CPU sampler shares the row-level decisions (greedy_row).
#pragma once
#include <cmath>
#include <cstdint>

#include "lmkern/philox.h"  // LMKERN_HOST_DEVICE, philox_first_word, uniform_open01

namespace lmkern {
namespace sampling_math {

// ------------------------------------------------------------------------------------------------
// Order-preserving key: a < b as floats  <=>  ordered_key(a) < ordered_key(b) as uint32 (for
// non-NaN values). -0 is folded onto +0 so that equal floats get equal keys, as the reference's
// float comparisons see them. Negative floats have their bits flipped, positive ones their sign.
LMKERN_HOST_DEVICE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  union {
    float f;
    uint32_t u;
  } c{f};
  return c.u;
#endif
}

LMKERN_HOST_DEVICE uint32_t ordered_key(float f) {
  uint32_t b = float_bits(f);
  if (b == 0x80000000u) b = 0u;  // -0 -> +0
  const uint32_t flip = (b & 0x80000000u) ? 0xFFFFFFFFu : 0x80000000u;
  return b ^ flip;
}

// ------------------------------------------------------------------------------------------------
// Radix select over ordered keys: three levels of 11, 11 and 10 bits, most significant first.
// Histograms have kBins slots in *descending* key order (slot = kBins - 1 - digit), so that a prefix
// sum over slots is the mass or count of the keys above a bucket.
constexpr int kRadixLevels = 3;
constexpr int kBins = 2048;

LMKERN_HOST_DEVICE int level_shift(int level) { return level == 0 ? 21 : level == 1 ? 10 : 0; }
LMKERN_HOST_DEVICE uint32_t level_digit(uint32_t key, int level) {
  return (key >> level_shift(level)) & (level == 2 ? 0x3FFu : 0x7FFu);
}
LMKERN_HOST_DEVICE int level_slot(uint32_t key, int level) {
  return kBins - 1 - int(level_digit(key, level));
}

// The state of one threshold search. Each level picks the bucket holding the boundary (the first
// non-empty slot, in descending key order, at which `above` plus the inclusive prefix of the
// counted quantity reaches `need`), fixes its digit, and stops as soon as the set {key >= lowest
// key of the bucket} is already the answer.
struct RadixWalk {
  uint32_t prefix = 0;  // key bits fixed by the levels done so far (lower bits zero)
  int level = 0;        // the level to histogram next
  uint64_t above = 0;   // count or mass of the counted keys above the current bucket
  bool done = false;

  // Whether `key` lies in the bucket still being narrowed (every key does at level 0).
  LMKERN_HOST_DEVICE bool matches(uint32_t key) const {
    if (level == 0) return true;
    const int high = level_shift(level - 1);  // bits [high, 32) are fixed
    return (key >> high) == (prefix >> high);
  }

  // The chosen bucket at this level: its slot, its count, and the counted quantity of the slots
  // before it (above it in key order). by_count: top-k (the quantity is the count, need = k);
  // else top-p (the quantity is mass).
  LMKERN_HOST_DEVICE void advance(int slot, uint32_t count, uint64_t excl, uint64_t need,
                                  bool by_count) {
    prefix |= uint32_t(kBins - 1 - slot) << level_shift(level);
    above += excl;
    // top-k: the bucket holds the k-th largest and everything in it is kept (above + count == k):
    // the threshold is its lowest key. top-p: a single key in the bucket is the boundary itself.
    const bool whole = by_count ? above + count == need : count == 1;
    if (whole || level == kRadixLevels - 1) {
      done = true;
    } else {
      ++level;
    }
  }

  // Keep keys >= threshold() once done: the lowest key of the final bucket.
  LMKERN_HOST_DEVICE uint32_t threshold() const { return prefix; }
};

// ------------------------------------------------------------------------------------------------
// Probability mass in fixed point: exp(z - zmax) in [0, 1] times 2^frac_bits, rounded. Integer
// sums are exact and independent of the order of addition, so every thread, block and run sees
// the same histogram and makes the same decision. frac_bits is chosen so that V masses of at most
// 1 cannot overflow 64 bits (V * 2^frac_bits < 2^63).
LMKERN_HOST_DEVICE int mass_frac_bits(int64_t V) {
  int bits = 0;
  while (bits < 63 && (int64_t(1) << bits) <= V) ++bits;  // V < 2^bits
  const int f = 63 - bits;
  return f > 62 ? 62 : f;
}

LMKERN_HOST_DEVICE uint64_t mass_fixed(float e, int frac_bits) {
  // e * 2^frac_bits is exact in float (a power-of-two scale); rounding to an integer happens once.
  const float scaled = ldexpf(e, frac_bits);
  if (!(scaled >= 0.5f)) return 0;  // also NaN
#if defined(__CUDA_ARCH__)
  return __float2ull_rn(scaled);
#else
  return uint64_t(llrintf(scaled));
#endif
}

// The top-p rule "inclusive cumulative mass >= p * total" for integer cumulative masses:
// cumulative >= ceil(p * total). Saturates rather than wrap for p * total beyond 2^64.
LMKERN_HOST_DEVICE uint64_t topp_target(float p, uint64_t total) {
  if (!(p > 0.f)) return 0;
  const double t = ceil(double(p) * double(total));
  if (t >= 18446744073709551615.0) return ~uint64_t(0);
  return uint64_t(t);
}

// ------------------------------------------------------------------------------------------------
// Exponential race (Gumbel-max): the key of token i is z_i - log(-log(u_i)). With u in
// [2^-24, 1 - 2^-24] (uniform_open01), -log(-log(u)) lies in [-2.82, 16.64]; kRaceGumbelMax bounds
// it with room for rounding, so a token with z + kRaceGumbelMax < (a key already seen) cannot win
// and its random word need not be computed.
constexpr float kRaceGumbelMax = 16.75f;

LMKERN_HOST_DEVICE float race_key(float z, uint64_t seed, uint32_t i, uint32_t stream) {
  const float u = uniform_open01(philox_first_word(seed, i, stream));
  return z - logf(-logf(u));
}

// (key, index) pairs of the race: the larger key wins, the smaller index on ties. The initial
// value (-inf, 0) stands for "every token not seen has key -inf", which is what the reference's
// argmax over keys masked with -inf returns when no survivor has a finite key.
struct RaceBest {
  float key;
  int idx;
};

LMKERN_HOST_DEVICE bool race_better(float key, int idx, const RaceBest& b) {
  return key > b.key || (key == b.key && idx < b.idx);
}

LMKERN_HOST_DEVICE RaceBest race_combine(const RaceBest& a, const RaceBest& b) {
  return race_better(b.key, b.idx, a) ? b : a;
}

// ------------------------------------------------------------------------------------------------
// Per-row statistics of the raw logits, accumulated in one pass: the running max and the sum of
// exp(x - max) (rescaled when the max grows), the first index of the max, and validity flags.
enum : uint32_t { kHasNan = 1u, kHasPosInf = 2u, kHasFinite = 4u };

struct RowStats {
  float xmax;     // -inf before any element
  float sumexp;   // sum of exp(x - xmax) over the elements seen
  int imax;       // first index of xmax (INT32_MAX before any element)
  uint32_t flags;
};

LMKERN_HOST_DEVICE RowStats row_stats_init() { return RowStats{-INFINITY, 0.f, 0x7FFFFFFF, 0u}; }

// Elements must be added in increasing index order (then the strict > keeps the first max).
LMKERN_HOST_DEVICE void row_stats_add(RowStats& s, float x, int i) {
  s.flags |= (x != x ? kHasNan : 0u) | (x == INFINITY ? kHasPosInf : 0u) |
             (fabsf(x) < INFINITY ? kHasFinite : 0u);
  if (x > s.xmax) {
    s.sumexp = s.sumexp * expf(s.xmax - x) + 1.f;  // expf(-inf) = 0 for the first element
    s.xmax = x;
    s.imax = i;
  } else if (x > -INFINITY) {
    s.sumexp += expf(x - s.xmax);  // -inf adds nothing (and -inf - -inf would be NaN)
  }
}

LMKERN_HOST_DEVICE float rescaled_sum(const RowStats& s, float m) {
  return s.xmax == -INFINITY ? 0.f : s.sumexp * expf(s.xmax - m);
}

// Commutative (bit for bit), so butterfly reductions leave every lane with the same value.
LMKERN_HOST_DEVICE RowStats row_stats_combine(const RowStats& a, const RowStats& b) {
  RowStats r;
  const bool take_b = b.xmax > a.xmax || (b.xmax == a.xmax && b.imax < a.imax);
  r.xmax = take_b ? b.xmax : a.xmax;
  r.imax = take_b ? b.imax : a.imax;
  r.sumexp = rescaled_sum(a, r.xmax) + rescaled_sum(b, r.xmax);
  r.flags = a.flags | b.flags;
  return r;
}

// torch.argmax order for the one-hot softmax at T == 0: NaN is the largest value, then the first
// index among equals.
LMKERN_HOST_DEVICE bool argmax_better(float v, int i, float bv, int bi) {
  const bool v_nan = v != v, b_nan = bv != bv;
  if (v_nan || b_nan) return v_nan && (!b_nan || i < bi);
  return v > bv || (v == bv && i < bi);
}

// A row the op can sample: no NaN, no +inf, at least one finite logit.
LMKERN_HOST_DEVICE bool row_valid(uint32_t flags) {
  return (flags & (kHasNan | kHasPosInf)) == 0 && (flags & kHasFinite) != 0;
}

// Whether a valid row whose largest logit is xmax takes the limit T -> 0, its first argmax: at
// T == 0, and where float32 reaches that limit, i.e. xmax / T overflows. Every other logit then
// has (x - xmax) / T <= -2^-24 * FLT_MAX (exp gives exactly 0), while z = x / T itself no longer
// orders the tokens (all that overflow tie at +inf, or every z is -inf). Shared by every backend:
// the CUDA kernels, the C++ CPU kernels and the CPU run of the CUDA algorithm.
LMKERN_HOST_DEVICE bool greedy_row(float temp, float xmax) {
  return temp == 0.f || (temp > 0.f && fabsf(xmax) < INFINITY && !(fabsf(xmax / temp) < INFINITY));
}

}  // namespace sampling_math
}  // namespace lmkern
