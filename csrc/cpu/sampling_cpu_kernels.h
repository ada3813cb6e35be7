// Sampling row kernels (lmkern::sample, lmkern::softmax), written once against simd.h. The
// algorithm is described at the top of sampling_cpu.cpp, which declares what is used here
// (Candidate, Scratch, Best, RowParams, top_p_on_list, the constants).
//
// Deliberately without include guard: sampling_cpu.cpp compiles it once per instruction set
// through isa_instances.h (Isa, R, L, Ri, Ru, vselect, vexp in scope).
//
// Every pass streams the row with vector loads: a row is read a few times (from cache after the
// first), and only tokens that pass a vector test are looked at one by one.

LMKERN_INLINE float max_lane(R a) {
  float m = a[0];
  for (int j = 1; j < L; ++j) m = a[j] > m ? a[j] : m;
  return m;
}

// exp(x) for x <= 0, through the same polynomial as the vector passes (so that a token's mass is
// the same number wherever it is computed).
LMKERN_INLINE float exp_le0(float x) { return vexp(Isa::set1(x))[0]; }

// Lanes [0, n) (n may exceed L: then every lane).
LMKERN_INLINE Ri lanes_below(int64_t n) {
  return lane_index() < static_cast<int>(std::min<int64_t>(n, L));
}

// The histogram bin of each lane's z: the top kBinBits bits of the order-preserving integer image
// of the float (negative floats bit-inverted, positive ones with the sign bit set).
LMKERN_INLINE Ru bin_of(R z) {
  const Ru b = (Ru)z;
  const Ru key = ((Ri)b < 0) ? ~b : (b | 0x80000000u);
  return key >> (32 - kBinBits);
}

// The first n < L logits at x, the missing lanes as -inf (never read from memory).
template <class T>
LMKERN_INLINE R load_tail(const T* x, int n) {
  return vselect(lane_index() < n, Isa::load(x, n), Isa::set1(-kInf));
}

// L logits at x + i, or the row's last n - i < L of them (missing lanes -inf).
template <class T>
LMKERN_INLINE R load_lanes(const T* x, int64_t i, int64_t n) {
  return i + L <= n ? Isa::load(x + i) : load_tail(x + i, static_cast<int>(n - i));
}

// ---------------------------------------------------------------------- race keys

// hi:lo = a * m per 32-bit lane, in the register's own layout: the even lanes' products from the
// low halves of the 64-bit lanes, the odd lanes' from the high halves, no lane shuffles.
LMKERN_INLINE void mul_hi_lo(Ru a, uint32_t m, Ru& hi, Ru& lo) {
  const Rd even = mul_low_u32((Rd)a, m);
  const Rd odd = mul_low_u32((Rd)a >> 32, m);
  hi = (Ru)((even >> 32) | (odd & 0xffffffff00000000ull));
  lo = (Ru)((even & 0xffffffffull) | (odd << 32));
}

// Philox4x32-10's first word at counters (c0[lane], stream, 0, 0) under key `seed`, lane-wise:
// the same words as philox_first_word (lmkern/philox.h), L at a time.
LMKERN_INLINE Ru philox_first_words(uint64_t seed, Ru c0, uint32_t stream) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  Ru c1 = Ru{} + stream, c2 = Ru{} + 0u, c3 = c2;
  for (int round = 0; round < 10; ++round) {
    Ru hi0, lo0, hi2, lo2;
    mul_hi_lo(c0, Philox4x32::kRoundA, hi0, lo0);
    mul_hi_lo(c2, Philox4x32::kRoundB, hi2, lo2);
    c0 = hi2 ^ c1 ^ k0;
    c2 = hi0 ^ c3 ^ k1;
    c1 = lo2;
    c3 = lo0;
    k0 += Philox4x32::kKeyA;
    k1 += Philox4x32::kKeyB;
  }
  return c0;
}

// The exponential-race keys z - log(-log(u)) of L tokens with indices `index` (the Philox counter
// is the index's low 32 bits, as in every backend), u = uniform_open01 of their Philox words.
// Every key of the CPU backend comes from here, so a token's key does not depend on the path.
LMKERN_INLINE R race_keys(R z, Ru index, uint64_t seed, uint32_t stream) {
  const Ru bits = philox_first_words(seed, index, stream);
  const R u = Isa::mul(__builtin_convertvector((Ri)(((bits >> 9) << 1) | 1u), R),
                       Isa::set1(5.9604644775390625e-08f));  // (2j + 1) / 2^24, as uniform_open01
  return Isa::sub(z, vlog(Isa::sub(Isa::zero(), vlog(u))));
}

// The indices i, i + 1, ..., i + L - 1 as Philox counters (low 32 bits).
LMKERN_INLINE Ru lane_counters(int64_t i) { return (Ru)lane_index() + static_cast<uint32_t>(i); }

// Tokens waiting for their race keys. Keys are made a full register at a time from the queue,
// so a register of the row in which only a few tokens may still win costs a few queue writes,
// not L keys.
struct RaceQueue {
  static constexpr int kCap = 8 * L;
  alignas(64) float z[kCap] = {};
  alignas(64) uint32_t counter[kCap] = {};
  int64_t index[kCap] = {};
  int n = 0;
  uint64_t seed;
  uint32_t stream;

  RaceQueue(uint64_t seed_, uint32_t stream_) : seed(seed_), stream(stream_) {}

  // Queues the tokens i + j, j a set bit of `lanes`, of register z_lanes; makes their keys when
  // the queue is nearly full.
  LMKERN_INLINE void push(R z_lanes, int64_t i, uint32_t lanes, Best& best) {
    for (; lanes; lanes &= lanes - 1) {
      const int j = __builtin_ctz(lanes);
      z[n] = z_lanes[j];
      counter[n] = static_cast<uint32_t>(i + j);
      index[n] = i + j;
      ++n;
    }
    if (n > kCap - L) flush(best);
  }

  // The keys of every queued token, offered to the race (the queue empties).
  LMKERN_INLINE void flush(Best& best) {
    for (int r = 0; r < n; r += L) {
      Ru c;
      std::memcpy(&c, counter + r, sizeof c);
      const R key = race_keys(Isa::load(z + r), c, seed, stream);
      uint32_t lanes = lane_bits(lanes_below(n - r) & (key >= Isa::set1(best.key)));
      for (; lanes; lanes &= lanes - 1) {
        const int j = __builtin_ctz(lanes);
        best.offer(key[j], index[r + j]);
      }
    }
    n = 0;
  }
};

// ---------------------------------------------------------------------- row passes

struct RowScan {
  float max;       // largest non-NaN logit (+inf if any, -inf if none)
  int64_t argmax;  // its first index
  bool nan;        // any NaN
};

// One streaming pass over raw logits: max, first argmax, NaN. Each lane keeps its own max and the
// index where it first reached it (two sets of lanes for independent dependency chains); the
// lanes are merged at the end. Lane indices are int32 relative to chunks of 2^30 tokens.
template <class T>
LMKERN_INLINE RowScan scan_row(const T* x, int64_t V) {
  RowScan out{-kInf, 0, false};
  constexpr int64_t kChunk = int64_t{1} << 30;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const T* xc = x + c0;
    const int64_t n = std::min(kChunk, V - c0);
    R m0 = Isa::set1(-kInf), m1 = m0;
    Ri i0 = Ri{} + 0, i1 = i0, nan = i0;
    Ri idx = lane_index();
    int64_t i = 0;
    for (; i + 2 * L <= n; i += 2 * L, idx += 2 * L) {
      const R a = Isa::load(xc + i), b = Isa::load(xc + i + L);
      nan |= (a != a) | (b != b);
      const Ri ga = a > m0, gb = b > m1;
      m0 = vselect(ga, a, m0);
      i0 = ga ? idx : i0;
      m1 = vselect(gb, b, m1);
      i1 = gb ? idx + L : i1;
    }
    for (; i < n; i += L, idx += L) {
      const R a = load_lanes(xc, i, n);
      nan |= a != a;
      const Ri ga = a > m0;
      m0 = vselect(ga, a, m0);
      i0 = ga ? idx : i0;
    }
    // Per lane the two sets saw interleaved indices: on equal values the smaller index is first.
    const Ri take1 = (m1 > m0) | ((m1 == m0) & (i1 < i0));
    m0 = vselect(take1, m1, m0);
    i0 = take1 ? i1 : i0;
    float best = -kInf;
    int64_t arg = 0;
    for (int j = 0; j < L; ++j) {
      if (m0[j] > best || (m0[j] == best && m0[j] != -kInf && i0[j] < arg)) {
        best = m0[j];
        arg = i0[j];
      }
    }
    out.nan |= any_lane(nan);
    if (best > out.max) {  // strict: an earlier chunk keeps ties
      out.max = best;
      out.argmax = c0 + arg;
    }
  }
  return out;
}

inline bool invalid(const RowScan& s) { return s.nan || s.max == kInf || s.max == -kInf; }

// A raw-logit bound for a bound on z = fl(x / T): every x with fl(x / T) >= bound has x >= the
// result (a little below bound * T: both roundings are within 2^-24 relative, the margin is 2^-20
// plus an absolute 1e-30 for subnormals). Tokens between it and the exact bound are false
// positives that the caller's exact test drops. Where bound * T is not finite (an overflowed z at
// a tiny T, or T = inf), every token passes.
inline float raw_bound(float bound, float temp) {
  const float b = bound * temp;
  if (!std::isfinite(b)) return -kInf;
  return b - std::fabs(b) * 0x1p-20f - 1e-30f;
}

// The candidate list of fused_top_k: the tokens with z >= the k-th largest z seen so far.
struct TopKList {
  Scratch& s;
  int64_t k;
  float temp;
  float bound = -kInf;  // the k-th largest z so far once the list has been cut, else -inf
  size_t cap, limit;

  TopKList(Scratch& scratch, int64_t k_, float temp_)
      : s(scratch), k(k_), temp(temp_), cap(static_cast<size_t>(std::max<int64_t>(4 * k_, 256))) {
    limit = cap;
    s.cand.clear();
    s.cand.reserve(cap);
  }

  // Keeps the k largest z (and every token tied with the k-th); raises the bound.
  void cut() {
    std::nth_element(s.cand.begin(), s.cand.begin() + (k - 1), s.cand.end(), before);
    bound = s.cand[k - 1].z;
    const float b = bound;
    s.cand.erase(std::remove_if(s.cand.begin(), s.cand.end(),
                                [b](const Candidate& c) { return c.z < b; }),
                 s.cand.end());
  }

  // Adds the tokens i + j, j a set bit of `lanes`, whose z reaches the bound. Out of line: the
  // rare path, kept apart so that the streaming loop's state stays in registers.
  template <class T>
  __attribute__((noinline)) void add(const T* x, int64_t i, uint32_t lanes) {
    for (; lanes; lanes &= lanes - 1) {
      const int64_t j = i + __builtin_ctz(lanes);
      const float z = static_cast<float>(x[j]) / temp;
      if (!(z >= bound)) continue;  // below the exact bound (or the bound rose meanwhile)
      s.cand.push_back({z, j});
      if (s.cand.size() >= limit) {
        cut();
        // Many tokens tied at the bound stay: grow rather than re-select every push.
        limit = std::max(cap, 2 * s.cand.size());
      }
    }
  }

  // The bound in raw-logit units for the streaming loop's vector test (see raw_bound).
  R raw() const { return Isa::set1(raw_bound(bound, temp)); }
};

// Top-k fused into the first read of the row: validity, max, and the candidates (TopKList). Each
// register of logits is compared with the list's bound in raw-logit units while the row streams
// by: z is computed only for the rare tokens that pass, so after the first few thousand tokens the
// row costs its loads and a few vector compares. Leaves exactly the tokens with z >= t_k in
// s.cand. Returns false for an invalid row.
template <class T>
bool fused_top_k(const T* x, int64_t V, float temp, int64_t k, Scratch& s) {
  TopKList list(s, k, temp);
  R xbound = list.raw();
  R hi = Isa::set1(-kInf);
  Ri nan = Ri{} + 0;
  int64_t i = 0;
  for (; i + 2 * L <= V; i += 2 * L) {
    const R a = Isa::load(x + i), b = Isa::load(x + i + L);
    nan |= (a != a) | (b != b);
    hi = vmax(vmax(a, b), hi);
    const Ri ha = a >= xbound, hb = b >= xbound;
    if (!any_lane(ha | hb)) continue;
    list.add(x, i, lane_bits(ha) | lane_bits(hb) << L);
    xbound = list.raw();
  }
  for (; i < V; i += L) {
    const R a = load_lanes(x, i, V);  // missing lanes -inf
    nan |= a != a;
    hi = vmax(a, hi);
    list.add(x, i, lane_bits((a >= xbound) & lanes_below(V - i)));
    xbound = list.raw();
  }
  const float row_max = max_lane(hi);  // +inf if any (NaN lanes are skipped by vmax)
  if (any_lane(nan) || row_max == kInf || row_max == -kInf) return false;
  if (static_cast<int64_t>(s.cand.size()) > k) list.cut();
  return true;
}

// Top-p over the whole row (no top-k): returns t_p, the z of the first token (descending) where
// the cumulative probability reaches p. A mass histogram on the order-preserving integer image of
// z (kBins bins) finds the bin where the cumulative probability, summed from the top bin down,
// reaches p; a second pass collects that bin's tokens, and only they are sorted.
template <class T>
float top_p_threshold(const T* x, int64_t V, float temp, float zmax, float p, Scratch& s) {
  s.counts.assign(kBins, 0);
  s.mass.assign(kBins, 0);
  const int bits = mass_bits(V);
  const R tv = Isa::set1(temp), zm = Isa::set1(zmax), scale = Isa::set1(std::ldexp(1.f, bits));
  for (int64_t i = 0; i < V; i += L) {
    const R z = load_lanes(x, i, V) / tv;
    const R e = vexp(z - zm);
    const R m = vselect(e == e, e * scale, Isa::zero());  // NaN (z = +inf at a tiny T) adds 0
    const Ru bin = bin_of(z);
    const int w = static_cast<int>(std::min<int64_t>(L, V - i));
    for (int u = 0; u < w; ++u) {
      s.mass[bin[u]] += static_cast<uint64_t>(static_cast<int64_t>(m[u]));
      ++s.counts[bin[u]];
    }
  }
  uint64_t total_fixed = 0;
  for (int b = 0; b < kBins; ++b) total_fixed += s.mass[b];
  const double total = std::ldexp(static_cast<double>(total_fixed), -bits);
  double cum = 0;  // probability of the bins above `bin`
  uint32_t bin = kBins - 1;
  for (; bin > 0; --bin) {
    const double m = std::ldexp(static_cast<double>(s.mass[bin]), -bits) / total;
    if (s.counts[bin] && cum + m >= p) break;
    cum += m;
  }
  s.cand.clear();
  const Ru target = Ru{} + bin;
  for (int64_t i = 0; i < V; i += L) {
    const R z = load_lanes(x, i, V) / tv;
    const Ri hit = (Ri)(bin_of(z) == target) & lanes_below(V - i);
    if (!any_lane(hit)) continue;
    for (int u = 0; u < L; ++u)
      if (hit[u]) s.cand.push_back({z[u], i + u});
  }
  if (s.cand.empty()) return -kInf;
  std::sort(s.cand.begin(), s.cand.end(), before);
  for (const Candidate& c : s.cand) {
    cum += exp_le0(c.z - zmax) / total;
    if (cum >= p) return c.z;
  }
  return s.cand.back().z;
}

// Every path but top-k (no filter, top-p and/or min-p over the whole row, greedy): returns the id
// (-1 for an invalid row) and the raw max in xmax_out.
template <class T>
int64_t sample_row_full(const T* x, int64_t V, const RowParams& q, Scratch& s, float& xmax_out) {
  const RowScan st = scan_row(x, V);
  xmax_out = st.max;
  if (invalid(st)) return -1;
  if (q.temperature == 0.f) return st.argmax;  // greedy

  const float temp = q.temperature;
  const float zmax = st.max / temp;  // division by T > 0 preserves order
  const bool m_active = q.min_p > 0.f;
  const float threshold =
      q.top_p < 1.f ? top_p_threshold(x, V, temp, zmax, q.top_p, s) : -kInf;
  Best best;  // the max always survives
  best.offer(race_keys(Isa::set1(zmax), Ru{} + static_cast<uint32_t>(st.argmax), q.seed, q.stream)[0],
             st.argmax);
  const R tv = Isa::set1(temp), thr = Isa::set1(threshold), zm = Isa::set1(zmax);
  const R min_p = Isa::set1(m_active ? q.min_p : -1.f);
  RaceQueue queue(q.seed, q.stream);
  for (int64_t i = 0; i < V; i += L) {
    const R z = load_lanes(x, i, V) / tv;
    // A token that cannot reach the best key even with the largest Gumbel noise is skipped before
    // any random word is made; the margin scales with |z| so that the fp32 rounding of the key
    // cannot defeat the bound. (best.key lags while tokens wait in the queue: that only lets
    // more through.)
    const R reach = z + Isa::set1(kGumbelMax) + vmax(z, -z) * Isa::set1(1e-6f);
    Ri maybe = (z >= thr) & (reach >= Isa::set1(best.key)) & lanes_below(V - i);
    if (!any_lane(maybe)) continue;
    if (m_active) maybe &= vexp(z - zm) >= min_p;
    queue.push(z, i, lane_bits(maybe), best);
  }
  queue.flush(best);
  return best.index;
}

// sum of term(i) over the registers i = 0, L, 2L, ... < V: fp32 lanes within chunks of 1024
// tokens, the chunk sums added exactly (ExactSum), so that the rounding error does not grow with V.
template <class F>
LMKERN_INLINE ExactSum chunked_sum(int64_t V, F&& term) {
  constexpr int64_t kChunk = 1024;
  ExactSum total;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t c1 = std::min(V, c0 + kChunk);
    R acc = Isa::zero();
    for (int64_t i = c0; i < c1; i += L) acc = acc + term(i);
    total.add(Isa::hsum(acc));
  }
  return total;
}

// sum_i exp(x_i - xmax) of the raw logits (xmax finite).
template <class T>
double sum_exp(const T* x, int64_t V, float xmax) {
  const R m = Isa::set1(xmax);
  // missing lanes load as -inf: they add 0
  return chunked_sum(V, [&](int64_t i) LMKERN_LAMBDA_INLINE { return vexp(load_lanes(x, i, V) - m); })
      .value();
}

// The race over the candidate list (min-p applied).
inline int64_t race_on_list(const Scratch& s, float zmax, const RowParams& q) {
  Best best;
  RaceQueue queue(q.seed, q.stream);
  for (const Candidate& c : s.cand)
    if (!(q.min_p > 0.f && exp_le0(c.z - zmax) < q.min_p)) queue.push(Isa::set1(c.z), c.index, 1u, best);
  queue.flush(best);
  return best.index;
}

template <class T>
void sample_row(const SampleParams& p, int64_t r, Scratch& s) {
  const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
  const int64_t V = p.V;
  const RowParams q = row_params(p, r);
  int64_t id;
  float xmax;
  if (q.temperature != 0.f && q.top_k > 0 && q.top_k < V) {
    // Top-k: one pass over the row, then only the ~k candidates.
    id = -1;
    if (fused_top_k(x, V, q.temperature, q.top_k, s)) {
      xmax = -kInf;
      for (const Candidate& c : s.cand) xmax = std::max(xmax, static_cast<float>(x[c.index]));
      const float zmax = xmax / q.temperature;
      if (q.top_p < 1.f) top_p_on_list(zmax, q.top_p, s);
      id = race_on_list(s, zmax, q);
    }
  } else {
    id = sample_row_full(x, V, q, s, xmax);
  }
  p.ids[r] = id;
  if (!p.logprobs) return;
  if (id < 0) {
    p.logprobs[r] = kNaN;
    return;
  }
  // log_softmax of the raw logits at the chosen id
  p.logprobs[r] =
      static_cast<float>(static_cast<float>(x[id]) - xmax - std::log(sum_exp(x, V, xmax)));
}

template <class T>
void softmax_row(const SoftmaxParams& p, int64_t r) {
  const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
  float* out = p.probs + r * p.V;
  const int64_t V = p.V;
  const float temp = p.temperatures ? p.temperatures[r] : p.temperature;
  const RowScan st = scan_row(x, V);
  if (temp == 0.f && !st.nan) {  // the limit T -> 0: one-hot at the first argmax
    std::fill(out, out + V, 0.f);
    out[st.argmax] = 1.f;
    return;
  }
  // A NaN logit makes the whole row NaN, as in torch (exp of NaN - anything).
  const R zm = Isa::set1(st.nan ? kNaN : st.max / temp);
  const R tv = Isa::set1(temp);
  const double sum = chunked_sum(V, [&](int64_t i) LMKERN_LAMBDA_INLINE {
    const R e = vexp(load_lanes(x, i, V) / tv - zm);  // missing lanes: exp(-inf) = 0
    if (i + L <= V) Isa::store(out + i, e);
    else Isa::store(out + i, e, static_cast<int>(V - i));
    return e;
  }).value();
  const R inv = Isa::set1(static_cast<float>(1.0 / sum));
  int64_t i = 0;
  for (; i + L <= V; i += L) Isa::store(out + i, Isa::load(out + i) * inv);
  if (i < V) {
    const int w = static_cast<int>(V - i);
    Isa::store(out + i, Isa::load(out + i, w) * inv, w);
  }
}
