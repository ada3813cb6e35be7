// Sampling passes (lmkern::sample, lmkern::softmax), written once against simd.h. The algorithm
// is described at the top of sampling_cpu.cpp, which declares what is used here (Candidate,
// Best, RowParams, RowScan, Range, RowState, RangePart, ExactSum, the constants).
//
// Deliberately without include guard: sampling_cpu.cpp compiles it once per instruction set
// through isa_instances.h (Isa, R, L, Ri, Ru, vselect, vexp in scope).
//
// Every pass streams a range of a row (the whole row, or one of the ranges a split row is cut
// into) with vector loads, and only tokens that pass a vector test are looked at one by one.
// Indices are the row's, so a token is treated the same whichever range holds it.

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

// L logits at x + i, or the last n - i < L of them before n (missing lanes -inf).
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

// ---------------------------------------------------------------------- range passes

// One streaming pass over raw logits: max, first argmax, NaN. Each lane keeps its own max and the
// index where it first reached it (two sets of lanes for independent dependency chains); the
// lanes are merged at the end. Lane indices are int32 relative to chunks of 2^30 tokens.
template <class T>
LMKERN_INLINE RowScan scan_range(const T* x, Range rg) {
  RowScan out{-kInf, rg.begin, false};
  constexpr int64_t kChunk = int64_t{1} << 30;
  for (int64_t c0 = rg.begin; c0 < rg.end; c0 += kChunk) {
    const T* xc = x + c0;
    const int64_t n = std::min(kChunk, rg.end - c0);
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

// A raw-logit bound for a bound on z = fl(x / T): every x with fl(x / T) >= bound has x >= the
// result. fl(x / T) rounds to within half a step of z's format at bound: 2^-24 relative for a
// normal z, but the fixed 2^-149 of a subnormal one (a huge T), which is far coarser; so bound
// first steps down by the larger of 2^-20 relative and 2^-147, then the product * T by 2^-20
// relative (its own rounding) and 1e-30. Tokens between it and the exact bound are false positives
// that the caller's exact test drops. Where the product is not finite (an overflowed z at a tiny
// T, or T = inf), every token passes.
inline float raw_bound(float bound, float temp) {
  const float b = (bound - std::max(std::fabs(bound) * 0x1p-20f, 0x1p-147f)) * temp;
  if (!std::isfinite(b)) return -kInf;
  return b - std::fabs(b) * 0x1p-20f - 1e-30f;
}

// The candidate list of top_k_range: the tokens with z >= the k-th largest z seen so far.
struct TopKList {
  std::vector<Candidate>& cand;
  int64_t k;
  float temp;
  float bound = -kInf;  // the k-th largest z so far once the list has been cut, else -inf
  size_t cap, limit;

  TopKList(std::vector<Candidate>& cand_, int64_t k_, float temp_)
      : cand(cand_), k(k_), temp(temp_), cap(static_cast<size_t>(std::max<int64_t>(4 * k_, 256))) {
    limit = cap;
    cand.clear();
    cand.reserve(cap);
  }

  // Adds the tokens i + j, j a set bit of `lanes`, whose z reaches the bound. Out of line: the
  // rare path, kept apart so that the streaming loop's state stays in registers.
  template <class T>
  __attribute__((noinline)) void add(const T* x, int64_t i, uint32_t lanes) {
    for (; lanes; lanes &= lanes - 1) {
      const int64_t j = i + __builtin_ctz(lanes);
      const float z = static_cast<float>(x[j]) / temp;
      if (!(z >= bound)) continue;  // below the exact bound (or the bound rose meanwhile)
      cand.push_back({z, j});
      if (cand.size() >= limit) {
        bound = cut_to_top_k(cand, k);
        // Many tokens tied at the bound stay: grow rather than re-select every push.
        limit = std::max(cap, 2 * cand.size());
      }
    }
  }

  // The bound in raw-logit units for the streaming loop's vector test (see raw_bound).
  R raw() const { return Isa::set1(raw_bound(bound, temp)); }
};

// Top-k fused into the first read of the range: validity and max (the argmax is not tracked),
// and in `cand` exactly the tokens whose z reaches the range's k-th largest (every token of the
// range if it has k or fewer). Each register of logits is compared with the list's bound in
// raw-logit units while the range streams by: z is computed only for the rare tokens that pass,
// so after the first few thousand tokens the range costs its loads and a few vector compares.
// The row's top-k set is in the union of its ranges' lists: a token among the row's k largest
// is among its own range's k largest.
template <class T>
RowScan top_k_range(const T* x, Range rg, float temp, int64_t k, std::vector<Candidate>& cand) {
  TopKList list(cand, k, temp);
  R xbound = list.raw();
  R hi = Isa::set1(-kInf);
  Ri nan = Ri{} + 0;
  int64_t i = rg.begin;
  for (; i + 2 * L <= rg.end; i += 2 * L) {
    const R a = Isa::load(x + i), b = Isa::load(x + i + L);
    nan |= (a != a) | (b != b);
    hi = vmax(vmax(a, b), hi);
    const Ri ha = a >= xbound, hb = b >= xbound;
    if (!any_lane(ha | hb)) continue;
    list.add(x, i, lane_bits(ha) | lane_bits(hb) << L);
    xbound = list.raw();
  }
  for (; i < rg.end; i += L) {
    const R a = load_lanes(x, i, rg.end);  // missing lanes -inf
    nan |= a != a;
    hi = vmax(a, hi);
    list.add(x, i, lane_bits((a >= xbound) & lanes_below(rg.end - i)));
    xbound = list.raw();
  }
  if (static_cast<int64_t>(cand.size()) > k) cut_to_top_k(cand, k);
  return {max_lane(hi), rg.begin, any_lane(nan)};  // max +inf if any (vmax skips NaN lanes)
}

// Top-p over the whole row, first pass: a mass histogram on the order-preserving integer image of
// z (kBins bins, masses in fixed point, see mass_bits), added into counts and mass.
template <class T>
void histogram_range(const T* x, Range rg, int64_t V, float temp, float zmax, uint32_t* counts,
                     uint64_t* mass) {
  const R tv = Isa::set1(temp), zm = Isa::set1(zmax);
  const R scale = Isa::set1(std::ldexp(1.f, mass_bits(V)));
  for (int64_t i = rg.begin; i < rg.end; i += L) {
    const R z = load_lanes(x, i, rg.end) / tv;
    const R e = vexp(z - zm);
    const R m = vselect(e == e, e * scale, Isa::zero());  // NaN (z = +inf at a tiny T) adds 0
    const Ru bin = bin_of(z);
    const int w = static_cast<int>(std::min<int64_t>(L, rg.end - i));
    for (int u = 0; u < w; ++u) {
      mass[bin[u]] += static_cast<uint64_t>(static_cast<int64_t>(m[u]));
      ++counts[bin[u]];
    }
  }
}

// Top-p over the whole row, second pass: appends the tokens of histogram bin `bin` to out.
template <class T>
void bin_tokens_range(const T* x, Range rg, float temp, uint32_t bin, std::vector<Candidate>& out) {
  const R tv = Isa::set1(temp);
  const Ru target = Ru{} + bin;
  for (int64_t i = rg.begin; i < rg.end; i += L) {
    const R z = load_lanes(x, i, rg.end) / tv;
    const Ri hit = (Ri)(bin_of(z) == target) & lanes_below(rg.end - i);
    if (!any_lane(hit)) continue;
    for (int u = 0; u < L; ++u)
      if (hit[u]) out.push_back({z[u], i + u});
  }
}

// t_p from the boundary bin's tokens (row.cum: the probability of the bins above it): the z of
// the first token (descending) where the cumulative probability reaches p.
inline float threshold_in_bin(std::vector<Candidate>& cand, const RowState& row) {
  if (cand.empty()) return -kInf;
  std::sort(cand.begin(), cand.end(), before);
  double cum = row.cum;
  for (const Candidate& c : cand) {
    cum += exp_le0(c.z - row.zmax) / row.total;
    if (cum >= row.q.top_p) return c.z;
  }
  return cand.back().z;
}

// The race over a range of the row (z >= threshold, min-p applied), from `best` on.
template <class T>
void race_range(const T* x, Range rg, const RowState& row, Best& best) {
  const RowParams& q = row.q;
  const bool m_active = q.min_p > 0.f;
  const R tv = Isa::set1(q.temperature), thr = Isa::set1(row.threshold), zm = Isa::set1(row.zmax);
  const R min_p = Isa::set1(m_active ? q.min_p : -1.f);
  RaceQueue queue(q.seed, q.stream);
  for (int64_t i = rg.begin; i < rg.end; i += L) {
    const R z = load_lanes(x, i, rg.end) / tv;
    // A token that cannot reach the best key even with the largest Gumbel noise is skipped before
    // any random word is made; the margin scales with |z| so that the fp32 rounding of the key
    // cannot defeat the bound. (best.key lags while tokens wait in the queue: that only lets
    // more through.)
    const R reach = z + Isa::set1(kGumbelMax) + vmax(z, -z) * Isa::set1(1e-6f);
    Ri maybe = (z >= thr) & (reach >= Isa::set1(best.key)) & lanes_below(rg.end - i);
    if (!any_lane(maybe)) continue;
    if (m_active) maybe &= vexp(z - zm) >= min_p;
    queue.push(z, i, lane_bits(maybe), best);
  }
  queue.flush(best);
}

// sum of term(i) over the registers i of the range: fp32 lanes within chunks of kSumChunk tokens
// (rg.begin is a multiple of it), the chunk sums added exactly (ExactSum), so that the rounding
// error does not grow with V and the sum does not depend on how the row is split.
template <class F>
LMKERN_INLINE ExactSum chunked_sum(Range rg, F&& term) {
  ExactSum total;
  for (int64_t c0 = rg.begin; c0 < rg.end; c0 += kSumChunk) {
    const int64_t c1 = std::min(rg.end, c0 + kSumChunk);
    R acc = Isa::zero();
    for (int64_t i = c0; i < c1; i += L) acc = acc + term(i);
    total.add(Isa::hsum(acc));
  }
  return total;
}

// sum of exp(x_i - xmax) over the range (xmax finite).
template <class T>
ExactSum sum_exp(const T* x, Range rg, float xmax) {
  const R m = Isa::set1(xmax);
  // missing lanes load as -inf: they add 0
  return chunked_sum(rg, [&](int64_t i) LMKERN_LAMBDA_INLINE { return vexp(load_lanes(x, i, rg.end) - m); });
}

// The race over the candidate list (min-p applied).
inline int64_t race_on_list(const std::vector<Candidate>& cand, float zmax, const RowParams& q) {
  Best best;
  RaceQueue queue(q.seed, q.stream);
  for (const Candidate& c : cand)
    if (!(q.min_p > 0.f && exp_le0(c.z - zmax) < q.min_p)) queue.push(Isa::set1(c.z), c.index, 1u, best);
  queue.flush(best);
  return best.index;
}

// ---------------------------------------------------------------------- the sampler

template <class T>
LMKERN_INLINE const T* logits_row(const SampleParams& p, int64_t r) {
  return static_cast<const T*>(p.logits) + r * p.logits_row_stride;
}

// Pass `pass` of row r over one range (needs_pass says which passes a row takes).
template <class T>
void run_pass(int pass, const SampleParams& p, int64_t r, const RowState& row, Range rg, RangePart& part) {
  const T* x = logits_row<T>(p, r);
  const RowParams& q = row.q;
  switch (pass) {
    case kScan:
      part.scan = row.kind == Kind::kTopK ? top_k_range(x, rg, q.temperature, q.top_k, part.cand)
                                          : scan_range(x, rg);
      break;
    case kHistogram:
      part.counts.assign(kBins, 0);
      part.mass.assign(kBins, 0);
      histogram_range(x, rg, p.V, q.temperature, row.zmax, part.counts.data(), part.mass.data());
      break;
    case kBinTokens:
      part.cand.clear();
      bin_tokens_range(x, rg, q.temperature, row.bin, part.cand);
      break;
    default:  // kFinish: the race (kFull) and the logprob's normalizer
      if (row.kind == Kind::kFull) {
        part.best = row.best;
        race_range(x, rg, row, part.best);
      }
      if (p.logprobs) part.sum = sum_exp(x, rg, row.xmax);
  }
}

// Merges the results of pass `pass` over row r's n ranges (in row order) into its state.
template <class T>
void combine_pass(int pass, const SampleParams& p, int64_t r, RowState& row, RangePart* parts, int n) {
  const T* x = logits_row<T>(p, r);
  const RowParams& q = row.q;
  switch (pass) {
    case kScan: {
      RowScan st = parts[0].scan;
      for (int j = 1; j < n; ++j) merge_scan(st, parts[j].scan);
      row.valid = !invalid(st);
      if (!row.valid) return;
      if (row.kind != Kind::kGreedy && sampling_math::greedy_row(q.temperature, st.max)) {
        // x_max / T overflowed: the limit T -> 0. top_k_range keeps no argmax: scan again (this
        // row only, and only then).
        if (row.kind == Kind::kTopK) st = scan_range(x, Range{0, p.V});
        row.kind = Kind::kGreedy;
      }
      if (row.kind == Kind::kGreedy) {
        row.id = st.argmax;
        row.xmax = st.max;
      } else if (row.kind == Kind::kTopK) {
        std::vector<Candidate>& cand = parts[0].cand;
        for (int j = 1; j < n; ++j) cand.insert(cand.end(), parts[j].cand.begin(), parts[j].cand.end());
        if (static_cast<int64_t>(cand.size()) > q.top_k) cut_to_top_k(cand, q.top_k);
        for (const Candidate& c : cand) row.xmax = std::max(row.xmax, static_cast<float>(x[c.index]));
        const float zmax = row.xmax / q.temperature;
        if (q.top_p < 1.f) top_p_on_list(cand, zmax, q.top_p);
        row.id = race_on_list(cand, zmax, q);
      } else {
        row.xmax = st.max;
        row.zmax = st.max / q.temperature;  // division by T > 0 preserves order
        // The max always survives: its key is where every range's race starts.
        row.best.offer(race_keys(Isa::set1(row.zmax), Ru{} + static_cast<uint32_t>(st.argmax), q.seed,
                                 q.stream)[0],
                       st.argmax);
      }
      return;
    }
    case kHistogram:
      for (int j = 1; j < n; ++j)
        for (int b = 0; b < kBins; ++b) {
          parts[0].counts[b] += parts[j].counts[b];
          parts[0].mass[b] += parts[j].mass[b];
        }
      find_boundary_bin(parts[0].counts.data(), parts[0].mass.data(), p.V, row);
      return;
    case kBinTokens: {
      std::vector<Candidate>& cand = parts[0].cand;
      for (int j = 1; j < n; ++j) cand.insert(cand.end(), parts[j].cand.begin(), parts[j].cand.end());
      row.threshold = threshold_in_bin(cand, row);
      return;
    }
    default: {  // kFinish
      if (row.kind == Kind::kFull) {
        for (int j = 0; j < n; ++j) row.best.offer(parts[j].best);
        row.id = row.best.index;
      }
      if (!p.logprobs) return;
      ExactSum sum;
      for (int j = 0; j < n; ++j) sum.add(parts[j].sum);
      // log_softmax of the raw logits at the chosen id
      row.logprob = static_cast<float>(static_cast<float>(x[row.id]) - row.xmax - std::log(sum.value()));
    }
  }
}

// Every row of the batch, each cut into `splits` ranges (1: rows in parallel, each whole).
template <class T>
void sample(const SampleParams& p, int splits) {
  if (splits <= 1) {
    at::parallel_for(0, p.B, 1, [&](int64_t r0, int64_t r1) {
      RangePart& part = scratch().part;
      for (int64_t r = r0; r < r1; ++r) {
        RowState row = start_row(p, r);
        for (int pass = 0; pass < kPasses; ++pass) {
          if (!needs_pass(pass, row, p)) continue;
          run_pass<T>(pass, p, r, row, {0, p.V}, part);
          combine_pass<T>(pass, p, r, row, &part, 1);
        }
        write_row(p, r, row);
      }
    });
    return;
  }
  // Each pass over every range of every row at once, then the rows' combinations (in the
  // calling thread: a few merges of short lists).
  Scratch& s = scratch();
  s.rows.resize(p.B);
  s.parts.resize(p.B * splits);
  for (int64_t r = 0; r < p.B; ++r) s.rows[r] = start_row(p, r);
  for (int pass = 0; pass < kPasses; ++pass) {
    bool any = false;
    for (int64_t r = 0; r < p.B; ++r) any |= needs_pass(pass, s.rows[r], p);
    if (!any) continue;
    for_ranges(p.B, p.V, splits, [&](int64_t r, int j, Range rg) {
      if (needs_pass(pass, s.rows[r], p)) run_pass<T>(pass, p, r, s.rows[r], rg, s.parts[r * splits + j]);
    });
    for (int64_t r = 0; r < p.B; ++r)
      if (needs_pass(pass, s.rows[r], p)) combine_pass<T>(pass, p, r, s.rows[r], &s.parts[r * splits], splits);
  }
  for (int64_t r = 0; r < p.B; ++r) write_row(p, r, s.rows[r]);
}

// ---------------------------------------------------------------------- softmax

template <class T>
LMKERN_INLINE const T* logits_row(const SoftmaxParams& p, int64_t r) {
  return static_cast<const T*>(p.logits) + r * p.logits_row_stride;
}

LMKERN_INLINE float row_temperature(const SoftmaxParams& p, int64_t r) {
  return p.temperatures ? p.temperatures[r] : p.temperature;
}

// The limit T -> 0 of a row without NaN (T == 0, or x_max / T overflows): one-hot at the first
// argmax.
LMKERN_INLINE bool one_hot(float temp, const RowScan& st) {
  return !st.nan && sampling_math::greedy_row(temp, st.max);
}

// First write over a range of row r: exp(z - zmax), or the range's part of the one-hot row.
// Returns the sum of what it wrote.
template <class T>
ExactSum softmax_exp_range(const SoftmaxParams& p, int64_t r, const RowScan& st, Range rg) {
  const T* x = logits_row<T>(p, r);
  float* out = p.probs + r * p.V;
  const float temp = row_temperature(p, r);
  if (one_hot(temp, st)) {
    std::fill(out + rg.begin, out + rg.end, 0.f);
    if (st.argmax >= rg.begin && st.argmax < rg.end) out[st.argmax] = 1.f;
    return {};
  }
  // A NaN logit makes the whole row NaN, as in torch (exp of NaN - anything).
  const R zm = Isa::set1(st.nan ? kNaN : st.max / temp);
  const R tv = Isa::set1(temp);
  return chunked_sum(rg, [&](int64_t i) LMKERN_LAMBDA_INLINE {
    const R e = vexp(load_lanes(x, i, rg.end) / tv - zm);  // missing lanes: exp(-inf) = 0
    if (i + L <= rg.end) Isa::store(out + i, e);
    else Isa::store(out + i, e, static_cast<int>(rg.end - i));
    return e;
  });
}

// Second write: the range times 1 / the row's sum.
inline void softmax_scale_range(const SoftmaxParams& p, int64_t r, float inv_sum, Range rg) {
  float* out = p.probs + r * p.V;
  const R inv = Isa::set1(inv_sum);
  int64_t i = rg.begin;
  for (; i + L <= rg.end; i += L) Isa::store(out + i, Isa::load(out + i) * inv);
  if (i < rg.end) {
    const int w = static_cast<int>(rg.end - i);
    Isa::store(out + i, Isa::load(out + i, w) * inv, w);
  }
}

inline float inverse(const ExactSum& sum) { return static_cast<float>(1.0 / sum.value()); }

// Every row, each cut into `splits` ranges (1: rows in parallel, each whole).
template <class T>
void softmax(const SoftmaxParams& p, int splits) {
  if (splits <= 1) {
    // Rows of ~V elements each: a grain of a few rows keeps small-V batches from over-splitting.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.V, 1));
    at::parallel_for(0, p.B, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const Range all{0, p.V};
        const RowScan st = scan_range(logits_row<T>(p, r), all);
        const ExactSum sum = softmax_exp_range<T>(p, r, st, all);
        if (!one_hot(row_temperature(p, r), st)) softmax_scale_range(p, r, inverse(sum), all);
      }
    });
    return;
  }
  // The same three steps, each over every range at once; a row's ranges meet in between.
  std::vector<RowScan> scans(p.B * splits);
  std::vector<ExactSum> sums(p.B * splits);
  for_ranges(p.B, p.V, splits, [&](int64_t r, int j, Range rg) {
    scans[r * splits + j] = scan_range(logits_row<T>(p, r), rg);
  });
  for (int64_t r = 0; r < p.B; ++r)
    for (int j = 1; j < splits; ++j) merge_scan(scans[r * splits], scans[r * splits + j]);
  for_ranges(p.B, p.V, splits, [&](int64_t r, int j, Range rg) {
    sums[r * splits + j] = softmax_exp_range<T>(p, r, scans[r * splits], rg);
  });
  std::vector<float> inv(p.B);
  for (int64_t r = 0; r < p.B; ++r) {
    for (int j = 1; j < splits; ++j) sums[r * splits].add(sums[r * splits + j]);
    inv[r] = inverse(sums[r * splits]);
  }
  for_ranges(p.B, p.V, splits, [&](int64_t r, int, Range rg) {
    if (!one_hot(row_temperature(p, r), scans[r * splits])) softmax_scale_range(p, r, inv[r], rg);
  });
}
