// Per-ISA vector helpers beyond simd.h's interface, shared by the CPU kernel headers: the
// register type's integer twin (compares, selects, bit tricks through GCC vector extensions),
// selects, max and exp.
//
// Deliberately without include guard: isa_instances.h includes it once per instruction set,
// inside the namespace that defines `Isa` and inside the matching target region, right before
// the kernel header(s) it instantiates.

using R = Isa::R;
constexpr int L = Isa::L;
typedef int32_t Ri __attribute__((vector_size(sizeof(R))));
typedef uint32_t Ru __attribute__((vector_size(sizeof(R))));
typedef uint64_t Rd __attribute__((vector_size(sizeof(R))));  // L / 2 64-bit lanes

LMKERN_INLINE R vselect(Ri mask, R a, R b) { return mask ? a : b; }
LMKERN_INLINE R vmax(R a, R b) { return vselect(a > b, a, b); }  // b when a is NaN

// Whether any lane of a compare result is set (one test instruction on x86).
LMKERN_INLINE bool any_lane(Ri m) {
#if LMKERN_ISA_ID == 2
  return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif LMKERN_ISA_ID == 1
  return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#else
  int32_t acc = 0;
  for (int j = 0; j < L; ++j) acc |= m[j];
  return acc != 0;
#endif
}

// Bit j set iff lane j of a compare result is set.
LMKERN_INLINE uint32_t lane_bits(Ri m) {
#if LMKERN_ISA_ID == 2
  return _mm512_movepi32_mask((__m512i)m);
#elif LMKERN_ISA_ID == 1
  return static_cast<uint32_t>(_mm256_movemask_ps((__m256)m));
#else
  uint32_t bits = 0;
  for (int j = 0; j < L; ++j) bits |= static_cast<uint32_t>(m[j] != 0) << j;
  return bits;
#endif
}

// (a & 0xffffffff) * m per 64-bit lane: the 32 x 32 -> 64-bit product of the low halves (one
// multiply instruction on x86).
LMKERN_INLINE Rd mul_low_u32(Rd a, uint32_t m) {
#if LMKERN_ISA_ID == 2
  return (Rd)_mm512_mul_epu32((__m512i)a, _mm512_set1_epi64(m));
#elif LMKERN_ISA_ID == 1
  return (Rd)_mm256_mul_epu32((__m256i)a, _mm256_set1_epi64x(m));
#else
  return (a & 0xffffffffu) * uint64_t{m};
#endif
}
#undef LMKERN_ISA_ID

// The lanes 0, 1, ..., L - 1.
LMKERN_INLINE Ri lane_index() {
  Ri r;
  for (int j = 0; j < L; ++j) r[j] = j;
  return r;
}

// log(x) for positive normal x (and +inf): x = 2^e m with m in [sqrt(1/2), sqrt(2)), log(m) by
// the classic single-precision minimax polynomial in f = m - 1 (about 1 ulp), e ln 2 added in two
// parts so that it stays exact.
LMKERN_INLINE R vlog(R x) {
  const Ru b = (Ru)x;
  Ri e = (Ri)(b >> 23) - 127;
  R m = (R)((b & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const Ri big = m > Isa::set1(1.41421356f);
  m = vselect(big, Isa::mul(m, Isa::set1(0.5f)), m);
  e = e - big;  // big lanes are -1: e + 1
  const R f = Isa::sub(m, Isa::set1(1.f));
  const R f2 = Isa::mul(f, f), f4 = Isa::mul(f2, f2);
  // p(f) = c0 + c1 f + ... + c8 f^8 by Estrin's scheme: a short dependency chain, because the
  // callers (the sampler's race keys) are latency bound.
  const R q01 = Isa::fmadd(Isa::set1(-2.4999993993e-1f), f, Isa::set1(3.3333331174e-1f));
  const R q23 = Isa::fmadd(Isa::set1(-1.6668057665e-1f), f, Isa::set1(2.0000714765e-1f));
  const R q45 = Isa::fmadd(Isa::set1(-1.2420140846e-1f), f, Isa::set1(1.4249322787e-1f));
  const R q67 = Isa::fmadd(Isa::set1(-1.1514610310e-1f), f, Isa::set1(1.1676998740e-1f));
  const R q03 = Isa::fmadd(q23, f2, q01);
  const R q47 = Isa::fmadd(q67, f2, q45);
  const R q07 = Isa::fmadd(q47, f4, q03);
  const R p = Isa::fmadd(Isa::mul(Isa::set1(7.0376836292e-2f), f4), f4, q07);
  const R ef = __builtin_convertvector(e, R);
  R y = Isa::mul(Isa::mul(p, f), f2);
  y = Isa::fmadd(ef, Isa::set1(-2.12194440e-4f), y);
  y = Isa::fmadd(f2, Isa::set1(-0.5f), y);
  return Isa::fmadd(ef, Isa::set1(0.693359375f), Isa::add(f, y));
}

// exp(x) for x <= 0 or NaN (what softmax-style code produces after subtracting a max):
// 2^n e^f with n = round(x / ln 2), |f| <= ln2 / 2, e^f by its degree-7 Taylor polynomial (< 1 ulp
// of truncation). Below -87.3 (including -inf) the result is 0; NaN stays NaN.
LMKERN_INLINE R vexp(R x) {
  const R lo = Isa::set1(-87.3f);
  const R xc = vselect(x < lo, lo, x);
  const R magic = Isa::set1(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const R n = Isa::sub(Isa::fmadd(xc, Isa::set1(1.44269504f), magic), magic);
  R f = Isa::fmadd(n, Isa::set1(-0.693145751953125f), xc);  // ln 2 in two parts: f is exact
  f = Isa::fmadd(n, Isa::set1(-1.428606765330187e-06f), f);
  R p = Isa::set1(1.f / 5040);
  p = Isa::fmadd(p, f, Isa::set1(1.f / 720));
  p = Isa::fmadd(p, f, Isa::set1(1.f / 120));
  p = Isa::fmadd(p, f, Isa::set1(1.f / 24));
  p = Isa::fmadd(p, f, Isa::set1(1.f / 6));
  p = Isa::fmadd(p, f, Isa::set1(0.5f));
  p = Isa::fmadd(p, f, Isa::set1(1.f));
  p = Isa::fmadd(p, f, Isa::set1(1.f));
  const Ri e = (__builtin_convertvector(n, Ri) + 127) << 23;  // n >= -126: a normal 2^n
  const R r = Isa::mul(p, (R)e);
  return vselect(x < lo, Isa::zero(), r);
}
