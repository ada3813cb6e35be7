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

  for (int r = 0; r < R_; ++r) {
    T* o = static_cast<T*>(w.out_row(r));
    float* lse = w.lse_at(r);
    const float l = l_run[r];
    if (l == 0.f) {  // no visible key (NaN l, from NaN scores, takes the other branch)
      for (int d = 0; d < D; ++d) o[d] = static_cast<T>(0.f);
      *lse = -INFINITY;
    } else {
      for (int d = 0; d < D; ++d) o[d] = static_cast<T>(ot[d * ld + r] / l);
      *lse = m_run[r] + std::log(l);
    }
  }
}
