// Attention forward (tiled online softmax) written once against the SIMD interface of simd.h.
//
// Deliberately without include guard: attention_cpu.cpp compiles it once per instruction set
// through isa_instances.h (Isa and simd_math.h's R, L, Ri, vselect, vmax, vexp in scope).
//
// Layout: query rows run along the vector lanes. A work item is up to BM rows of one
// (sequence, kv head); with GQA its rows are the (query, head of the group) pairs, query-major,
// so every key/value tile is converted once for the whole group. Per item:
//   Qt  (D x ld)   the item's queries, transposed to fp32, packed once
//   Ot  (D x ld)   the fp32 output accumulator, transposed the same way
// and per key block of BN keys (converted to contiguous fp32 Kf, Vf: strided rows, e.g. 4 KiB
// apart in (B, S, H, D), would alias to a few L1 sets), per chunk of CW rows:
//   St  (nb x CW)  = Kf . Qt[:, chunk] * scale (+ bias), the scores, keys by rows
//   online softmax down each lane (max, rescale factor, exp, sum): no horizontal reductions
//   Ot[:, chunk]   = Ot * alpha + Vf^T . St
// With lanes along rows, both micro-GEMMs broadcast a scalar of Kf/Vf and load vectors of
// Qt/St: 6 x 2 (or 12 x 1) registers of accumulators, 12 FMAs per 8 (13) loads.
// Causal: a chunk only visits the keys its last row can see (never a block fully above the
// diagonal); keys past a row's limit inside that range are masked to -inf.

constexpr int BN = 64;     // keys per block
constexpr int CW = 2 * L;  // rows per chunk: two registers per micro-GEMM row
// Broadcast operands (keys, or output dims) per micro-GEMM step for NV registers of rows:
// 12 accumulators either way, enough independent FMA chains to cover the FMA latency.
template <int NV>
constexpr int kMR = NV == 1 ? 12 : 6;

// Asks for n rows of `bytes` bytes (row stride ld) to be fetched into the cache: rows far apart
// (a KV cache with many heads) each start on a new page, which the hardware prefetchers do not
// cross, so without this a decode step waits on every row.
template <class T>
LMKERN_INLINE void prefetch_rows(const T* src, int64_t ld, int n, int64_t bytes) {
  for (int j = 0; j < n; ++j, src += ld)
    for (int64_t b = 0; b < bytes; b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(src) + b);
}

// Converts n rows of D elements (row stride ld_src) to fp32 rows of D (row stride ld_dst).
template <class T>
LMKERN_INLINE void rows_to_fp32(const T* src, int64_t ld_src, int n, int64_t D, float* dst,
                                int64_t ld_dst) {
  for (int j = 0; j < n; ++j, src += ld_src, dst += ld_dst) {
    int64_t d = 0;
    for (; d + L <= D; d += L) Isa::store(dst + d, Isa::load(src + d));
    if (d < D) Isa::store(dst + d, Isa::load(src + d, D - d), D - d);
  }
}

// St[j][lanes] = scale * sum_d K[j][d] Qt[d][lanes] for MR_ keys j (row stride ldk), NV
// registers of lanes. The dot products are summed in parts of kDPart terms, added through St: one
// FMA chain over a long head dim (256) would round several times more than torch's GEMM does.
// (Pointers walk the loops: the build's -fwrapv keeps int index arithmetic in 32 bits, which
// would cost a sign extension per access.)
constexpr int64_t kDPart = 64;
template <int MR_, int NV>
LMKERN_INLINE void qk_micro(const float* kf, int64_t ldk, int64_t D, const float* qt,
                            int64_t ldq, float* st, float scale) {
  const float* k[MR_];
  for (int m = 0; m < MR_; ++m) k[m] = kf + m * ldk;
  for (int64_t d0 = 0; d0 < D; d0 += kDPart) {
    R acc[MR_][NV];
    for (int m = 0; m < MR_; ++m)
      for (int v = 0; v < NV; ++v) acc[m][v] = Isa::zero();
    for (const float* const end = k[0] + std::min(kDPart, D - d0); k[0] != end; qt += ldq) {
      R b[NV];
      for (int v = 0; v < NV; ++v) b[v] = Isa::load(qt + v * L);
      for (int m = 0; m < MR_; ++m) {
        const R a = Isa::set1(*k[m]++);
        for (int v = 0; v < NV; ++v) acc[m][v] = Isa::fmadd(a, b[v], acc[m][v]);
      }
    }
    const bool last = d0 + kDPart >= D;
    for (int m = 0; m < MR_; ++m)
      for (int v = 0; v < NV; ++v) {
        float* p = st + m * CW + v * L;
        R x = d0 == 0 ? acc[m][v] : Isa::add(Isa::load(p), acc[m][v]);
        Isa::store(p, last ? Isa::mul(x, Isa::set1(scale)) : x);
      }
  }
  if (D == 0)  // no terms: every score is 0
    for (int m = 0; m < MR_; ++m)
      for (int v = 0; v < NV; ++v) Isa::store(st + m * CW + v * L, Isa::zero());
}

// Ot[d][lanes] = Ot[d][lanes] * alpha[lanes] + sum_j V[j][d] St[j][lanes] for MR_ dims d
// (V's row stride ldv).
template <int MR_, int NV>
LMKERN_INLINE void pv_micro(const float* vf, int64_t ldv, int nb, const float* st, float* ot,
                            int64_t ldo, const R* alpha) {
  R acc[MR_][NV];
  for (int m = 0; m < MR_; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = Isa::mul(Isa::load(ot + m * ldo + v * L), alpha[v]);
  for (const float* const end = st + static_cast<int64_t>(nb) * CW; st != end; st += CW, vf += ldv) {
    R b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Isa::load(st + v * L);
    for (int m = 0; m < MR_; ++m) {
      const R a = Isa::set1(vf[m]);
      for (int v = 0; v < NV; ++v) acc[m][v] = Isa::fmadd(a, b[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR_; ++m)
    for (int v = 0; v < NV; ++v) Isa::store(ot + m * ldo + v * L, acc[m][v]);
}

// The micro-kernels for a tail of mr < kMR<NV> operands.
template <int NV, int M = kMR<NV> - 1>
LMKERN_INLINE void qk_tail(int mr, const float* kf, int64_t ldk, int64_t D, const float* qt,
                           int64_t ldq, float* st, float scale) {
  if constexpr (M > 0) {
    if (mr == M) return qk_micro<M, NV>(kf, ldk, D, qt, ldq, st, scale);
    qk_tail<NV, M - 1>(mr, kf, ldk, D, qt, ldq, st, scale);
  }
}
template <int NV, int M = kMR<NV> - 1>
LMKERN_INLINE void pv_tail(int mr, const float* vf, int64_t ldv, int nb, const float* st,
                           float* ot, int64_t ldo, const R* alpha) {
  if constexpr (M > 0) {
    if (mr == M) return pv_micro<M, NV>(vf, ldv, nb, st, ot, ldo, alpha);
    pv_tail<NV, M - 1>(mr, vf, ldv, nb, st, ot, ldo, alpha);
  }
}

// One chunk of NV registers of rows against nb keys of the current block (nb >= 1), whose
// fp32 keys and values are rows of kf and vf (row strides ldk, ldv).
// lim: per lane, how many keys of this block the row may see (masking applies iff `masked`).
template <int NV>
LMKERN_INLINE void chunk_step(const AttnItemView& w, int nb, bool masked, const float* lim,
                              const float* kf, int64_t ldk, const float* vf, int64_t ldv,
                              float* st, const float* qt, float* ot, float* m_run, float* l_run,
                              int64_t j0, int r0) {
  constexpr int MR = kMR<NV>;
  const int64_t D = w.D;
  const int64_t ld = w.ld;
  int j = 0;
  for (; j + MR <= nb; j += MR)
    qk_micro<MR, NV>(kf + j * ldk, ldk, D, qt, ld, st + j * CW, w.scale);
  if (j < nb) qk_tail<NV>(nb - j, kf + j * ldk, ldk, D, qt, ld, st + j * CW, w.scale);
  if (w.bias) w.add_bias(st, CW, r0, NV * L, j0, nb);

  R alpha[NV];
  for (int v = 0; v < NV; ++v) {
    float* s = st + v * L;
    const R m_old = Isa::load(m_run + v * L);
    R mx = m_old;
    if (masked) {
      const R lv = Isa::load(lim + v * L);
      const R ninf = Isa::set1(-INFINITY);
      for (int64_t jj = 0; jj < nb; ++jj) {
        const R x = vselect(Isa::set1(static_cast<float>(jj)) < lv, Isa::load(s + jj * CW), ninf);
        Isa::store(s + jj * CW, x);
        mx = vmax(x, mx);
      }
    } else {
      for (int64_t jj = 0; jj < nb; ++jj) mx = vmax(Isa::load(s + jj * CW), mx);
    }
    // A lane that has seen only masked keys keeps m = -inf; it exponentiates against 0 so that
    // its p and l stay exactly 0 (and alpha = exp(-inf) = 0 keeps its accumulator at 0).
    const R m_use = vselect(mx == Isa::set1(-INFINITY), Isa::zero(), mx);
    alpha[v] = vexp(Isa::sub(m_old, m_use));
    R sum = Isa::zero();
    for (int64_t jj = 0; jj < nb; ++jj) {
      const R p = vexp(Isa::sub(Isa::load(s + jj * CW), m_use));
      Isa::store(s + jj * CW, p);
      sum = Isa::add(sum, p);
    }
    Isa::store(l_run + v * L, Isa::fmadd(Isa::load(l_run + v * L), alpha[v], sum));
    Isa::store(m_run + v * L, mx);
  }

  int64_t d = 0;
  for (; d + MR <= D; d += MR) pv_micro<MR, NV>(vf + d, ldv, nb, st, ot + d * ld, ld, alpha);
  if (d < D) pv_tail<NV>(D - d, vf + d, ldv, nb, st, ot + d * ld, ld, alpha);
}

// Writes row r's output, acc[d * stride] / l for d < D, its lse and its stats (max m, log l);
// zeros, -inf and (-inf, 0) when the row saw no key (then m is -inf already). A NaN l, from NaN
// scores, takes the other branch and makes the max NaN too (NaN scores do not raise m, which
// may still be -inf, the backward's mark of a row without keys).
template <class T>
LMKERN_INLINE void store_row(const AttnItemView& w, int r, const float* acc, int64_t stride,
                             float m, float l) {
  T* o = static_cast<T*>(w.out_row(r));
  const bool seen = l != 0.f;
  for (int d = 0; d < w.D; ++d) o[d] = static_cast<T>(seen ? acc[d * stride] / l : 0.f);
  const float log_sum = seen ? std::log(l) : 0.f;
  *w.lse_at(r) = seen ? m + log_sum : -INFINITY;
  *w.max_at(r) = std::isnan(l) ? l : m;
  *w.log_sum_at(r) = log_sum;
}

// Runs one work item; scratch holds scratch_floats(...) floats (attention_cpu.cpp).
template <class T>
void run_item(const AttnItemView& w, float* scratch) {
  const int D = w.D, R_ = w.rows;
  const int64_t ld = w.ld;
  int64_t* nvis = reinterpret_cast<int64_t*>(scratch);  // keys visible to each row
  float* qt = scratch + 2 * ld;
  float* ot = qt + D * ld;
  float* kf = ot + D * ld;
  float* vf = kf + BN * D;
  float* st = vf + BN * D;
  float* m_run = st + BN * CW;
  float* l_run = m_run + ld;
  float* lim = l_run + ld;

  const int Rl = (R_ + L - 1) / L * L;  // lanes touched
  for (int r = 0; r < Rl; ++r) {
    nvis[r] = w.visible(std::min(r, R_ - 1));
    m_run[r] = -INFINITY;
    l_run[r] = 0.f;
  }
  std::fill(ot, ot + D * ld, 0.f);
  for (int r = 0; r < Rl; ++r) {
    if (r < R_) {
      const T* q = static_cast<const T*>(w.q_row(r));
      for (int d = 0; d < D; ++d) qt[d * ld + r] = static_cast<float>(q[d]);
    } else {
      for (int d = 0; d < D; ++d) qt[d * ld + r] = 0.f;
    }
  }

  // Rows are query-major, so the last row sees the most keys.
  const int64_t keys = nvis[R_ - 1];
  for (int64_t j0 = 0; j0 < keys; j0 += BN) {
    const int nb = static_cast<int>(std::min<int64_t>(BN, keys - j0));
    const T* k = static_cast<const T*>(w.k_row(j0));
    const T* v = static_cast<const T*>(w.v_row(j0));
    // The next block is fetched while this one is computed.
    const int ahead = static_cast<int>(std::clamp<int64_t>(keys - j0 - nb, 0, BN));
    prefetch_rows(k + nb * w.k.tok, w.k.tok, ahead, D * static_cast<int64_t>(sizeof(T)));
    prefetch_rows(v + nb * w.v.tok, w.v.tok, ahead, D * static_cast<int64_t>(sizeof(T)));
    rows_to_fp32(k, w.k.tok, nb, D, kf, D);
    rows_to_fp32(v, w.v.tok, nb, D, vf, D);
    for (int c0 = 0; c0 < Rl; c0 += CW) {
      const int lanes = std::min(CW, Rl - c0);
      const int last = std::min(c0 + lanes, R_) - 1;
      const int64_t see_last = nvis[last] - j0;
      if (see_last <= 0) continue;  // the whole chunk is above the diagonal here
      const int nbc = static_cast<int>(std::min<int64_t>(nb, see_last));
      const bool masked = nvis[c0] - j0 < nbc;
      if (masked)
        for (int r = c0; r < c0 + lanes; ++r)  // small integers: exact as floats
          lim[r] = static_cast<float>(std::clamp<int64_t>(nvis[r] - j0, 0, BN));
      if (lanes > L)
        chunk_step<2>(w, nbc, masked, lim + c0, kf, D, vf, D, st, qt + c0, ot + c0,
                      m_run + c0, l_run + c0, j0, c0);
      else
        chunk_step<1>(w, nbc, masked, lim + c0, kf, D, vf, D, st, qt + c0, ot + c0,
                      m_run + c0, l_run + c0, j0, c0);
    }
  }

  for (int r = 0; r < R_; ++r) store_row<T>(w, r, ot + r, ld, m_run[r], l_run[r]);
}

// ----------------------------------------------------------------------------- few-row items
//
// An item of a few rows (decode: one query against the cache, times the heads of its group)
// would fill only `rows` of run_item's CW lanes. These items run with the lanes along the head
// dim instead: per key block, for each row, the scores are dot products over D (kFewKeys keys at
// a time, then one horizontal sum each), the online softmax runs down the block's keys, and the
// output accumulator (one fp32 row of D) takes p_j * v_j key by key. Keys and values are read
// straight from their tensors (no conversion buffer); the rows of a group share each block
// while it is in cache. An item may cover several kv heads (w.nh): where the heads of a token
// lie side by side ((B, S, H, D) caches), a block of keys is then one stretch of memory read in
// order, instead of one head's rows, each on its own page.

constexpr int kFewRows = L;              // the most rows an item of run_item_few may have
constexpr int kFewKeys = 8;              // keys per dot-product step: independent FMA chains
constexpr int kFewRegs = 4;              // registers of output dims per pass over a block's values
constexpr int kFewChunk = kFewRegs * L;
constexpr int64_t kFewBlockBytes = 32768;  // a block's keys and values

// Whether an item of `rows` rows on head dim D runs run_item_few. The cost of run_item_few grows
// with the rows, run_item's does not (up to a chunk of CW lanes); measured on AVX2 (2-core EPYC,
// 1024 keys) they break even near L rows at D = 64 and near L / 2 at D = 128, where one row of
// run_item_few costs twice as much.
constexpr bool few_rows_item(int rows, int64_t D) {
  return rows <= (D <= 64 ? kFewRows : kFewRows / 2);
}

// Floats of one fp32 query or accumulator row of run_item_few: D rounded up to whole registers.
constexpr int64_t few_row_floats(int64_t D) { return (D + L - 1) / L * L; }

// The most (head, row) pairs an item of run_item_few may hold on head dim D: their fp32 query and
// accumulator rows stay within 128 KiB (at least kFewRows of them).
constexpr int64_t few_max_slots(int64_t D) {
  const int64_t dp = few_row_floats(D);
  return std::max<int64_t>(kFewRows, std::min<int64_t>(64, 16384 / std::max<int64_t>(dp, 1)));
}

// Floats of per-thread scratch for run_item_few on head dim D.
constexpr int64_t few_scratch_floats(int64_t D) {
  const int64_t dp = few_row_floats(D), slots = few_max_slots(D);
  return 2 * slots * dp + (BN + L) + 2 * slots;
}

// s[i] = scale * dot(q, key i) for NK keys (row stride ldk), D terms; q holds D floats padded
// with zeros to a whole register.
template <int NK, class T>
LMKERN_INLINE void few_dots(const float* q, const T* k, int64_t ldk, int64_t D, float* s,
                            float scale) {
  R acc[NK];
  for (int i = 0; i < NK; ++i) acc[i] = Isa::zero();
  int64_t d = 0;
  for (; d + L <= D; d += L) {
    const R qv = Isa::load(q + d);
    for (int i = 0; i < NK; ++i) acc[i] = Isa::fmadd(qv, Isa::load(k + i * ldk + d), acc[i]);
  }
  if (d < D) {
    const R qv = Isa::load(q + d);
    const int n = static_cast<int>(D - d);
    for (int i = 0; i < NK; ++i) acc[i] = Isa::fmadd(qv, Isa::load(k + i * ldk + d, n), acc[i]);
  }
  for (int i = 0; i < NK; ++i) s[i] = Isa::hsum(acc[i]) * scale;
}

// acc[0, n) = acc * alpha + sum_{j < nb} p[j] * V_j[0, n), n <= kFewChunk in NR registers (the
// last one partial unless FULL); V_j at v + j * ldv.
template <int NR, bool FULL, class T>
LMKERN_INLINE void few_pv(const T* v, int64_t ldv, int nb, const float* p, float* acc, int n,
                          float alpha) {
  const int tail = n - (NR - 1) * L;
  R a[NR];
  const R al = Isa::set1(alpha);
  for (int r = 0; r < NR; ++r) a[r] = Isa::mul(Isa::load(acc + r * L), al);
  for (int j = 0; j < nb; ++j, v += ldv) {
    const R pj = Isa::set1(p[j]);
    for (int r = 0; r < NR - 1; ++r) a[r] = Isa::fmadd(pj, Isa::load(v + r * L), a[r]);
    const R last = FULL ? Isa::load(v + (NR - 1) * L) : Isa::load(v + (NR - 1) * L, tail);
    a[NR - 1] = Isa::fmadd(pj, last, a[NR - 1]);
  }
  for (int r = 0; r < NR; ++r) Isa::store(acc + r * L, a[r]);  // acc is padded: whole registers
}

template <class T>
LMKERN_INLINE void few_pv_chunk(const T* v, int64_t ldv, int nb, const float* p, float* acc,
                                int n, float alpha) {
  const bool full = n % L == 0;
  switch ((n + L - 1) / L) {
    case 1: return full ? few_pv<1, true>(v, ldv, nb, p, acc, n, alpha)
                        : few_pv<1, false>(v, ldv, nb, p, acc, n, alpha);
    case 2: return full ? few_pv<2, true>(v, ldv, nb, p, acc, n, alpha)
                        : few_pv<2, false>(v, ldv, nb, p, acc, n, alpha);
    case 3: return full ? few_pv<3, true>(v, ldv, nb, p, acc, n, alpha)
                        : few_pv<3, false>(v, ldv, nb, p, acc, n, alpha);
    default: return full ? few_pv<4, true>(v, ldv, nb, p, acc, n, alpha)
                         : few_pv<4, false>(v, ldv, nb, p, acc, n, alpha);
  }
  static_assert(kFewRegs == 4, "few_pv_chunk covers 1 to 4 registers");
}

// Runs one item of at most kFewRows rows in each of its w.nh kv heads (rows x nh <=
// few_max_slots(D)); scratch holds few_scratch_floats(D) floats.
template <class T>
void run_item_few(const AttnItemView& w, float* scratch) {
  const int D = w.D, rows = w.rows, nh = w.nh, slots = rows * nh;
  const int64_t dp = few_row_floats(D);
  float* qf = scratch;               // slots x dp: the queries in fp32, zero padded
  float* acc = qf + slots * dp;      // slots x dp: the output accumulators
  float* s = acc + slots * dp;       // BN + L: one row's scores (then p) for a block
  float* m_run = s + BN + L;         // slots
  float* l_run = m_run + slots;      // slots
  int64_t nvis[kFewRows];            // keys visible to each row: the same in every head
  AttnItemView wh = w;               // w, at head w.hkv + h (slot h * rows + r)

  for (int r = 0; r < rows; ++r) nvis[r] = w.visible(r);
  for (int h = 0; h < nh; ++h) {
    wh.hkv = w.hkv + h;
    for (int r = 0; r < rows; ++r) {
      const int64_t i = h * rows + r;
      m_run[i] = -INFINITY;
      l_run[i] = 0.f;
      const T* q = static_cast<const T*>(wh.q_row(r));
      for (int d = 0; d < D; ++d) qf[i * dp + d] = static_cast<float>(q[d]);
      std::fill(qf + i * dp + D, qf + (i + 1) * dp, 0.f);
      std::fill(acc + i * dp, acc + (i + 1) * dp, 0.f);
    }
  }

  const int64_t keys = *std::max_element(nvis, nvis + rows);
  const int64_t ldk = w.k.tok, ldv = w.v.tok;
  // Keys per block: the block's keys and values (read once per row) fit in L1.
  const int64_t key_bytes = 2 * nh * std::max(D, 1) * static_cast<int64_t>(sizeof(T));
  const int bn = static_cast<int>(std::clamp<int64_t>(kFewBlockBytes / key_bytes / 8 * 8, 8, BN));
  // The next block is fetched while this one is computed: per key, the item's heads (the span
  // from its first head's row to its last's; a prefetch never faults).
  const int64_t span_k = ((nh - 1) * std::abs(w.k.head) + D) * static_cast<int64_t>(sizeof(T));
  const int64_t span_v = ((nh - 1) * std::abs(w.v.head) + D) * static_cast<int64_t>(sizeof(T));
  for (int64_t j0 = 0; j0 < keys; j0 += bn) {
    const int nb = static_cast<int>(std::min<int64_t>(bn, keys - j0));
    const int ahead = static_cast<int>(std::clamp<int64_t>(keys - j0 - nb, 0, bn));
    wh.hkv = w.hkv + (w.k.head >= 0 ? 0 : nh - 1);  // the head whose row starts the span
    prefetch_rows(static_cast<const T*>(wh.k_row(j0 + nb)), ldk, ahead, span_k);
    wh.hkv = w.hkv + (w.v.head >= 0 ? 0 : nh - 1);
    prefetch_rows(static_cast<const T*>(wh.v_row(j0 + nb)), ldv, ahead, span_v);
    for (int h = 0; h < nh; ++h) {
      wh.hkv = w.hkv + h;
      const T* k = static_cast<const T*>(wh.k_row(j0));
      const T* v = static_cast<const T*>(wh.v_row(j0));
      for (int r = 0; r < rows; ++r) {
        const int64_t i = h * rows + r;
        const int nbr = static_cast<int>(std::clamp<int64_t>(nvis[r] - j0, 0, nb));
        if (nbr == 0) continue;  // causal: this row sees none of the block
        const float* q = qf + i * dp;
        int j = 0;
        for (; j + kFewKeys <= nbr; j += kFewKeys)
          few_dots<kFewKeys>(q, k + j * ldk, ldk, D, s + j, w.scale);
        if (j + 4 <= nbr) {
          few_dots<4>(q, k + j * ldk, ldk, D, s + j, w.scale);
          j += 4;
        }
        if (j + 2 <= nbr) {
          few_dots<2>(q, k + j * ldk, ldk, D, s + j, w.scale);
          j += 2;
        }
        if (j < nbr) few_dots<1>(q, k + j * ldk, ldk, D, s + j, w.scale);
        if (w.bias) {
          const float* br = wh.bias_row(r, j0);
          for (int jj = 0; jj < nbr; ++jj) s[jj] += br[jj * w.b_k];
        }
        // Pad to whole registers with -inf: exp gives 0 there.
        const int nbp = (nbr + L - 1) / L * L;
        std::fill(s + nbr, s + nbp, -INFINITY);

        // Online softmax, as in chunk_step (NaN scores do not raise the max; they reach the sum).
        R mx = Isa::set1(m_run[i]);
        for (int jj = 0; jj < nbp; jj += L) mx = vmax(Isa::load(s + jj), mx);
        float mlanes[L];
        Isa::store(mlanes, mx);
        float m_new = mlanes[0];
        for (int t = 1; t < L; ++t) m_new = mlanes[t] > m_new ? mlanes[t] : m_new;
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = std::exp(m_run[i] - m_use);
        R sum = Isa::zero();
        const R mu = Isa::set1(m_use);
        for (int jj = 0; jj < nbp; jj += L) {
          const R p = vexp(Isa::sub(Isa::load(s + jj), mu));
          Isa::store(s + jj, p);
          sum = Isa::add(sum, p);
        }
        l_run[i] = l_run[i] * alpha + Isa::hsum(sum);
        m_run[i] = m_new;

        float* a = acc + i * dp;
        for (int d0 = 0; d0 < D; d0 += kFewChunk)
          few_pv_chunk(v + d0, ldv, nbr, s, a + d0, std::min(kFewChunk, D - d0), alpha);
      }
    }
  }

  for (int h = 0; h < nh; ++h) {
    wh.hkv = w.hkv + h;
    for (int r = 0; r < rows; ++r) {
      const int64_t i = h * rows + r;
      store_row<T>(wh, r, acc + i * dp, 1, m_run[i], l_run[i]);
    }
  }
}
