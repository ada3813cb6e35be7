// The CUDA sampling kernel's algorithm (csrc/include/lmkern/sampling.cuh, sample_row) run one
// step after another on the CPU, with the same decision code (csrc/include/lmkern/sampling_math.h:
// ordered keys, radix walk, fixed-point mass, top-p target, race keys, row statistics). What the
// GPU does in parallel is order-independent by construction (integer histograms, argmax with an
// index tie-break, bucket choice as a minimum over slots), so this sequential run makes the same
// choices; only the float sums of the logprob may round differently. `splits` > 1 reproduces the
// split path: per-chunk statistics combined in chunk order, the race seeded and pruned per chunk.
//
// Built and driven by tests/test_sampling_cuda_algo.py (no GPU needed):
//   sampling_cuda_algo selftest     checks of the scalar helpers
//   sampling_cuda_algo IN OUT       sample the rows in IN
// IN (little-endian): int64 B, V, splits; float32 logits[B*V]; float32 T[B]; int64 k[B];
// float32 p[B]; float32 m[B]; uint64 seed[B]; int64 stream[B]. OUT: int64 ids[B]; float32 lp[B].
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "lmkern/sampling_math.h"

using namespace lmkern::sampling_math;
using lmkern::philox_first_word;
using lmkern::uniform_open01;

namespace {

struct Row {
  const float* x;
  int V;
  float T, p, m;
  int64_t k;
  uint64_t seed;
  uint32_t stream;
};

struct Bins {
  std::vector<uint32_t> count = std::vector<uint32_t>(kBins, 0u);
  std::vector<uint64_t> mass = std::vector<uint64_t>(kBins, 0u);
};

// The first slot with a non-zero count where above + inclusive prefix >= need (-1 if none), with
// its count and exclusive prefix: pick_bucket, sequentially.
int pick(const Bins& b, bool by_count, uint64_t above, uint64_t need, uint32_t* count,
         uint64_t* excl) {
  uint64_t run = 0;
  for (int s = 0; s < kBins; ++s) {
    const uint64_t q = by_count ? uint64_t(b.count[s]) : b.mass[s];
    if (b.count[s] != 0u && above + run + q >= need) {
      *count = b.count[s];
      *excl = run;
      return s;
    }
    run += q;
  }
  return -1;
}

uint64_t total_mass(const Bins& b) {
  uint64_t t = 0;
  for (int s = 0; s < kBins; ++s) t += b.mass[s];
  return t;
}

uint32_t topk_threshold(const Row& r) {
  RadixWalk w;
  for (;;) {
    Bins b;
    for (int i = 0; i < r.V; ++i) {
      const uint32_t key = ordered_key(r.x[i] / r.T);
      if (w.matches(key)) ++b.count[level_slot(key, w.level)];
    }
    uint32_t count = 0;
    uint64_t excl = 0;
    const int slot = pick(b, true, w.above, uint64_t(r.k), &count, &excl);
    if (slot < 0) return 0u;
    w.advance(slot, count, excl, uint64_t(r.k), true);
    if (w.done) return w.threshold();
  }
}

uint32_t topp_threshold(const Row& r, float zmax, int frac_bits, uint32_t min_key) {
  RadixWalk w;
  uint64_t target = 0;
  for (;;) {
    Bins b;
    for (int i = 0; i < r.V; ++i) {
      const float z = r.x[i] / r.T;
      const uint32_t key = ordered_key(z);
      if (key >= min_key && w.matches(key)) {
        const int s = level_slot(key, w.level);
        ++b.count[s];
        b.mass[s] += mass_fixed(expf(z - zmax), frac_bits);
      }
    }
    if (w.level == 0) target = topp_target(r.p, total_mass(b));
    uint32_t count = 0;
    uint64_t excl = 0;
    const int slot = pick(b, false, w.above, target, &count, &excl);
    if (slot < 0) return w.level == 0 ? min_key : w.prefix;
    w.advance(slot, count, excl, target, false);
    if (w.done) return w.threshold();
  }
}

void sample_row(const Row& r, int splits, int64_t* id_out, float* lp_out) {
  // Chunks as the launcher makes them: multiples of 16 elements, no empty chunk.
  int chunk = r.V;
  if (splits > 1) {
    chunk = std::max(16, int(((int64_t(r.V) + splits - 1) / splits + 15) / 16 * 16));
    splits = std::max(1, int((int64_t(r.V) + chunk - 1) / chunk));
  }
  // Pass A per chunk, combined in chunk order.
  RowStats st = row_stats_init();
  for (int c = 0; c < splits; ++c) {
    // Per-thread partials (4-element vectors dealt round-robin to 512 threads, each thread's in
    // increasing index), then combined: the kernel's rounding, roughly, rather than one long sum.
    std::vector<RowStats> threads(512, row_stats_init());
    const int begin = c * chunk, end = std::min(r.V, begin + chunk);
    for (int i = begin; i < end; ++i) row_stats_add(threads[((i - begin) / 4) % 512], r.x[i], i);
    RowStats part = row_stats_init();
    for (const RowStats& t : threads) part = row_stats_combine(part, t);
    st = row_stats_combine(st, part);
  }
  const bool greedy = r.T == 0.f;
  const bool sampled = r.T > 0.f && r.T < INFINITY;
  auto finish = [&](int id) {
    *id_out = id;
    *lp_out = id < 0 ? NAN : (r.x[id] - st.xmax) - logf(st.sumexp);
  };
  if (!row_valid(st.flags) || !(greedy || sampled)) return finish(-1);
  if (greedy_row(r.T, st.xmax)) return finish(st.imax);
  const bool topk = r.k > 0 && r.k < r.V;
  const bool topp = r.p < 1.f;
  const bool minp = r.m > 0.f;
  const float zmax = st.xmax / r.T;
  const int frac_bits = mass_frac_bits(r.V);
  uint32_t thr = 0u;
  if (topk) thr = topk_threshold(r);
  if (topp) thr = std::max(thr, topp_threshold(r, zmax, frac_bits, thr));

  RaceBest best{-INFINITY, 0};
  for (int c = 0; c < splits; ++c) {
    RaceBest local{-INFINITY, 0};
    if (!minp || 1.f >= r.m) local = RaceBest{race_key(zmax, r.seed, uint32_t(st.imax), r.stream), st.imax};
    const int begin = c * chunk, end = std::min(r.V, begin + chunk);
    for (int i = begin; i < end; ++i) {
      const float z = r.x[i] / r.T;
      if (z + kRaceGumbelMax < local.key) continue;
      if (ordered_key(z) < thr) continue;
      if (minp && !(expf(z - zmax) >= r.m)) continue;
      const float key = race_key(z, r.seed, uint32_t(i), r.stream);
      if (race_better(key, i, local)) local = RaceBest{key, i};
    }
    best = race_combine(best, local);
  }
  finish(best.idx);
}

// Checks of the scalar helpers on their own; prints each failure, returns how many.
int selftest() {
  int failures = 0;
  auto check = [&](bool ok, const char* what, double a = 0, double b = 0) {
    if (!ok) {
      fprintf(stderr, "selftest: %s (%.9g, %.9g)\n", what, a, b);
      ++failures;
    }
  };
  // ordered_key preserves order and equality (with -0 == +0) over a spread of floats.
  std::vector<float> vals = {-INFINITY, -3e38f, -1.f, -1e-30f, -1e-45f, -0.f, 0.f, 1e-45f, 1e-30f,
                             0.5f, 1.f, 1.0000001f, 3e38f, INFINITY};
  uint64_t s = 0x9E3779B97F4A7C15ull;
  for (int i = 0; i < 20000; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    uint32_t bits = uint32_t(s >> 32);
    float f;
    memcpy(&f, &bits, 4);
    if (f == f) vals.push_back(f);
  }
  for (size_t i = 0; i < vals.size(); ++i) {
    const size_t j = (i * 7919 + 13) % vals.size();
    const float a = vals[i], b = vals[j];
    const uint32_t ka = ordered_key(a), kb = ordered_key(b);
    check((a < b) == (ka < kb) && (a == b) == (ka == kb), "ordered_key order", a, b);
  }
  // Fixed-point mass: V masses of at most 1 fit below 2^63, with as many bits as possible.
  const int64_t sizes[] = {0, 1, 2, 3, 1000, 32000, 65536, 131072, 152064, 262144, 2147483647};
  for (const int64_t V : sizes) {
    const int f = mass_frac_bits(V);
    const long double cap = std::ldexp(1.0L, 63);
    check(V * std::ldexp(1.0L, f) < cap, "mass_frac_bits overflow", double(V), f);
    check(f == 62 || V * std::ldexp(1.0L, f + 1) >= cap, "mass_frac_bits not tight", double(V), f);
    check(mass_fixed(1.f, f) == (uint64_t(1) << f), "mass_fixed(1)", double(V), f);
  }
  check(mass_fixed(0.f, 40) == 0 && mass_fixed(NAN, 40) == 0, "mass_fixed(0 or NaN)");
  check(mass_fixed(0.25f, 40) == (uint64_t(1) << 38), "mass_fixed(1/4)");
  check(mass_fixed(0.3f, 10) == 307, "mass_fixed rounds", double(mass_fixed(0.3f, 10)));
  check(topp_target(0.5f, 3) == 2 && topp_target(0.5f, 4) == 2, "topp_target ceil");
  check(topp_target(0.f, 100) == 0 && topp_target(-1.f, 100) == 0, "topp_target p <= 0");
  check(topp_target(1.f, 12345) == 12345, "topp_target p = 1");
  // The race key's noise -log(-log(u)) is bounded by kRaceGumbelMax on both ends of u's range.
  const float g_hi = -logf(-logf(uniform_open01(0xFFFFFFFFu)));
  const float g_lo = -logf(-logf(uniform_open01(0u)));
  check(g_hi < kRaceGumbelMax - 0.05f, "gumbel upper bound", g_hi);
  check(g_lo > -2.9f && g_lo < 0.f, "gumbel lower bound", g_lo);
  check(race_key(0.f, 1, 2, 3) == -logf(-logf(uniform_open01(philox_first_word(1, 2, 3)))),
        "race_key formula");
  // The walk fixes one digit per level and its threshold is the bucket's lowest key.
  RadixWalk w;
  w.advance(kBins - 1 - 5, 10, 0, 100, true);  // digit 5 at level 0, 10 of 100 needed: go on
  check(!w.done && w.level == 1 && w.prefix == (5u << 21), "walk level 0");
  check(w.matches((5u << 21) | 123u) && !w.matches(6u << 21), "walk matches");
  w.advance(kBins - 1 - 7, 90, 10, 100, true);  // whole bucket kept: above 10 + 90 == 100
  check(w.done && w.threshold() == ((5u << 21) | (7u << 10)) && w.above == 10, "walk early stop");
  return failures;
}

template <typename V>
bool read(FILE* f, V* dst, size_t n) {
  return fread(dst, sizeof(V), n, f) == n;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "selftest") return selftest() == 0 ? 0 : 1;
  if (argc != 3) {
    fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE* in = fopen(argv[1], "rb");
  if (in == nullptr) return 2;
  int64_t hdr[3];
  if (!read(in, hdr, 3)) return 3;
  const int64_t B = hdr[0], V = hdr[1];
  const int splits = int(hdr[2]);
  std::vector<float> x(size_t(B * V)), T(B), p(B), m(B);
  std::vector<int64_t> k(B), stream(B);
  std::vector<uint64_t> seed(B);
  if (!read(in, x.data(), x.size()) || !read(in, T.data(), B) || !read(in, k.data(), B) ||
      !read(in, p.data(), B) || !read(in, m.data(), B) || !read(in, seed.data(), B) ||
      !read(in, stream.data(), B)) {
    return 3;
  }
  fclose(in);
  std::vector<int64_t> ids(B);
  std::vector<float> lp(B);
  for (int64_t r = 0; r < B; ++r) {
    const Row row{x.data() + r * V, int(V), T[r], p[r], m[r], k[r], seed[r], uint32_t(stream[r])};
    sample_row(row, splits, &ids[r], &lp[r]);
  }
  FILE* out = fopen(argv[2], "wb");
  if (out == nullptr) return 2;
  fwrite(ids.data(), sizeof(int64_t), B, out);
  fwrite(lp.data(), sizeof(float), B, out);
  fclose(out);
  return 0;
}
