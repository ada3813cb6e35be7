// Attention backward (FlashAttention-2 style) written once against the SIMD interface of simd.h.
//
// Deliberately without include guard: attention_cpu.cpp compiles it once per instruction set
// through isa_instances.h, right after attention_cpu_kernels.h and in the same namespace (it uses
// simd_math.h's R, L, Ri, vselect, vexp and the forward's rows_to_fp32 and kDPart).
//
// The unit of work is a head group (sequence, kv head): the G query heads that share one key/value
// head, G * Sq rows ordered query-major as in the forward. attention_cpu.cpp runs three passes:
//   1. bwd_pack: each row's q and dO as fp32 rows of dp floats (zero padded to a multiple of 16),
//      its stats (max m, log-sum ls), and delta = rowsum(dO * O) - dlse.
//   2. bwd_key_blocks: a block of kBwdBN keys at a time, with the keys along the vector lanes
//      (its fp32 K as rows, K and V transposed); then every row that sees the block, kBwdCR rows
//      at a time, recomputing the probabilities from the saved stats:
//        S  = Q K^T                 P  = exp((S * scale + bias - m) - ls), 0 where the row sees no key
//      The scores are rounded as the forward rounds them and shifted by m before ls: at scores
//      near float32's min (Hugging Face's masks) lse = m + ls has lost ls, and S * scale + bias
//      is exactly m for the row's top keys only when computed in the forward's order.
//        dP = dO V^T                dS = P * (dP - delta) * scale
//        dV += P^T dO               dK += dS^T Q     (block accumulators, stored when it is done)
//        dQ += dS K                 (into the item's fp32 accumulator, rows x dp)
//      A key block belongs to one item, so dK and dV need no synchronization; a group's key
//      blocks may be split over several items, each with its own dQ accumulator.
//   3. bwd_store_dq: dq = the sum of a group's dQ accumulators, in q's dtype.
// Every product is one micro-kernel, gemm_micro: a register block of C += A B that broadcasts
// scalars of A (any strides, so A may be read transposed) against registers of B's rows: 12
// (AVX-512: 24) accumulators, as many FMAs per step as the forward's micro-kernels.
// Causal: a block is only visited by the rows from the first query that sees its first key (the
// blocks above the diagonal are never touched); per-row key limits mask the rest.

constexpr int kBwdBN = 64;  // keys per block: a multiple of every ISA's lanes
constexpr int kBwdCR = 64;  // rows per chunk
constexpr int kGemmMR = 6;  // broadcast scalars per micro-kernel step
constexpr int kGemmNV = L == 16 ? 4 : 2;  // registers of B per step: 16 registers (32 on AVX-512)

// Floats of per-thread scratch bwd_key_blocks needs for rows of dp floats.
inline int64_t bwd_scratch_floats(int64_t dp) {
  return 6 * kBwdBN * dp + 3 * kBwdCR * kBwdBN + kBwdCR;
}

// C[m][v] = (accumulate ? C[m][v] : 0) + sum_k a[m * a_m + k * a_k] * B[k][v] for MR_ rows m of
// C (row stride ldc) and NV registers v of B's rows (row stride ldb), K terms.
template <int MR_, int NV>
LMKERN_INLINE void gemm_micro(int64_t K, const float* a, int64_t a_m, int64_t a_k, const float* b,
                              int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  R acc[MR_][NV];
  for (int m = 0; m < MR_; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accumulate ? Isa::load(c + m * ldc + v * L) : Isa::zero();
  for (const float* const end = b + K * ldb; b != end; b += ldb, a += a_k) {
    R bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = Isa::load(b + v * L);
    for (int m = 0; m < MR_; ++m) {
      const R x = Isa::set1(a[m * a_m]);
      for (int v = 0; v < NV; ++v) acc[m][v] = Isa::fmadd(x, bv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR_; ++m)
    for (int v = 0; v < NV; ++v) Isa::store(c + m * ldc + v * L, acc[m][v]);
}

// The micro-kernel for a tail of mr < kGemmMR rows.
template <int NV, int M = kGemmMR - 1>
LMKERN_INLINE void gemm_tail(int64_t mr, int64_t K, const float* a, int64_t a_m, int64_t a_k,
                             const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if constexpr (M > 0) {
    if (mr == M) return gemm_micro<M, NV>(K, a, a_m, a_k, b, ldb, c, ldc, accumulate);
    gemm_tail<NV, M - 1>(mr, K, a, a_m, a_k, b, ldb, c, ldc, accumulate);
  }
}

template <int NV>
LMKERN_INLINE void gemm_rows(int64_t M, int64_t K, const float* a, int64_t a_m, int64_t a_k,
                             const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int64_t m = 0;
  for (; m + kGemmMR <= M; m += kGemmMR)
    gemm_micro<kGemmMR, NV>(K, a + m * a_m, a_m, a_k, b, ldb, c + m * ldc, ldc, accumulate);
  if (m < M) gemm_tail<NV>(M - m, K, a + m * a_m, a_m, a_k, b, ldb, c + m * ldc, ldc, accumulate);
}

// C (M rows of NR registers, row stride ldc) = (accumulate ? C : 0) + A B, A[m][k] =
// a[m * a_m + k * a_k] (M x K), B K rows of NR registers (row stride ldb).
inline void gemm(int64_t M, int NR, int64_t K, const float* a, int64_t a_m, int64_t a_k,
                 const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int v = 0;
  for (; v + kGemmNV <= NR; v += kGemmNV)
    gemm_rows<kGemmNV>(M, K, a, a_m, a_k, b + v * L, ldb, c + v * L, ldc, accumulate);
  for (; v < NR; ++v) gemm_rows<1>(M, K, a, a_m, a_k, b + v * L, ldb, c + v * L, ldc, accumulate);
}

// C = A B over K = D head dims, A's rows unit stride: summed in parts of kDPart terms added
// through C, as the forward's qk_micro does (one FMA chain over a long head dim rounds more than
// torch's GEMM).
inline void gemm_over_head_dim(int64_t M, int NR, int64_t D, const float* a, int64_t a_m,
                               const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t d0 = 0; d0 < D; d0 += kDPart)
    gemm(M, NR, std::min(kDPart, D - d0), a + d0, a_m, 1, b + d0 * ldb, ldb, c, ldc, d0 > 0);
}

// Stores D floats of src (readable up to a multiple of L) as a row of T.
template <class T>
LMKERN_INLINE void store_row(const float* src, int64_t D, T* dst) {
  int64_t d = 0;
  for (; d + L <= D; d += L) Isa::store(dst + d, Isa::load(src + d));
  if (d < D) Isa::store(dst + d, Isa::load(src + d), static_cast<int>(D - d));
}

// exp(x) where x may exceed 0 (recomputed scores round a little above the saved max), and, with
// stats that do not belong to the inputs, by far: past vexp's exponent range the answer is inf.
LMKERN_INLINE R vexp_unbounded(R x) {
  return vselect(x > Isa::set1(88.3f), Isa::set1(INFINITY), vexp(x));
}

// Pass 1 over rows [r0, r1) of the group.
template <class T>
void bwd_pack(const AttnBwdView& w, int64_t r0, int64_t r1) {
  const int64_t D = w.D, dp = w.dp;
  for (int64_t r = r0; r < r1; ++r) {
    float* q = w.qp + r * dp;
    float* dout = w.dop + r * dp;
    rows_to_fp32(static_cast<const T*>(w.q_row(r)), 0, 1, D, q, dp);
    rows_to_fp32(static_cast<const T*>(w.row_of(w.dout, r)), 0, 1, D, dout, dp);
    std::fill(q + D, q + dp, 0.f);
    std::fill(dout + D, dout + dp, 0.f);
    const T* o = static_cast<const T*>(w.out_row(r));
    R acc = Isa::zero();
    int64_t d = 0;
    for (; d + L <= D; d += L) acc = Isa::fmadd(Isa::load(dout + d), Isa::load(o + d), acc);
    if (d < D) acc = Isa::fmadd(Isa::load(dout + d), Isa::load(o + d, D - d), acc);
    w.maxes[r] = *w.max_at(r);
    w.log_sums[r] = *w.log_sum_at(r);
    w.deltas[r] = Isa::hsum(acc) - w.dlse_at(r);
  }
}

// The block's nb keys from key j0 in fp32: kf (nb rows of dp floats, zero padded), and kt, vt
// transposed (D rows of kBwdBN keys, zero past nb). vf is room for v's rows.
template <class T>
void pack_key_block(const AttnBwdView& w, int64_t j0, int nb, float* kf, float* vf, float* kt,
                    float* vt) {
  const int64_t D = w.D, dp = w.dp;
  rows_to_fp32(static_cast<const T*>(w.k_row(j0)), w.k.tok, nb, D, kf, dp);
  rows_to_fp32(static_cast<const T*>(w.v_row(j0)), w.v.tok, nb, D, vf, dp);
  for (int j = 0; j < nb; ++j) std::fill(kf + j * dp + D, kf + (j + 1) * dp, 0.f);
  for (int64_t d = 0; d < D; ++d, kt += kBwdBN, vt += kBwdBN) {
    for (int j = 0; j < nb; ++j) {
      kt[j] = kf[j * dp + d];
      vt[j] = vf[j * dp + d];
    }
    std::fill(kt + nb, kt + kBwdBN, 0.f);
    std::fill(vt + nb, vt + kBwdBN, 0.f);
  }
}

// bias(row c0 + r, key j0 + j) at b[r * kBwdBN + j] for the block's nb keys, 0 past them.
inline void gather_bias(const AttnBwdView& w, int64_t c0, int rows, int64_t j0, int nb,
                        float* b) {
  for (int r = 0; r < rows; ++r, b += kBwdBN) {
    const float* src = w.bias_row(c0 + r, j0);
    for (int j = 0; j < nb; ++j) b[j] = src[j * w.b_k];
    std::fill(b + nb, b + kBwdBN, 0.f);
  }
}

// P and dS of a chunk's rows (row stride kBwdBN in s, dp and bias): row r sees the first lim[r]
// keys of the block. P replaces S in s, dS replaces dP in dp; both are exactly 0 on the keys the
// row does not see (whatever S or dP hold there: a masked key's NaN must not leak into dQ).
template <bool kBias>
LMKERN_INLINE void probs_and_dscores(int rows, const float* lim, const float* maxes,
                                     const float* log_sums, const float* delta, float scale,
                                     const float* bias, float* s, float* dp) {
  float lane[L];
  for (int i = 0; i < L; ++i) lane[i] = static_cast<float>(i);
  const R iota = Isa::load(lane);
  const R sc = Isa::set1(scale);
  for (int r = 0; r < rows; ++r, s += kBwdBN, dp += kBwdBN) {
    const R seen = Isa::set1(lim[r]);
    const R m = Isa::set1(maxes[r]);
    const R ls = Isa::set1(log_sums[r]);
    const R dl = Isa::set1(delta[r]);
    for (int j = 0; j < kBwdBN; j += L) {
      R x = Isa::mul(Isa::load(s + j), sc);  // the forward's rounding: scale, then the bias
      if (kBias) x = Isa::add(x, Isa::load(bias + r * kBwdBN + j));
      const Ri visible = Isa::add(iota, Isa::set1(static_cast<float>(j))) < seen;
      const R p = vselect(visible, vexp_unbounded(Isa::sub(Isa::sub(x, m), ls)), Isa::zero());
      const R ds = Isa::mul(p, Isa::mul(Isa::sub(Isa::load(dp + j), dl), sc));
      Isa::store(s + j, p);
      Isa::store(dp + j, vselect(visible, ds, Isa::zero()));
    }
  }
}

// Pass 2: key blocks [kb0, kb1) of the group; dq_acc (nrows x dp) is this item's own.
template <class T>
void bwd_key_blocks(const AttnBwdView& w, int64_t kb0, int64_t kb1, float* dq_acc,
                    float* scratch) {
  constexpr int BN_ = kBwdBN, CR = kBwdCR;
  const int64_t D = w.D, dp = w.dp, nrows = w.nrows;
  const int dp_regs = static_cast<int>(dp / L);
  float* kf = scratch;
  float* vf = kf + BN_ * dp;
  float* kt = vf + BN_ * dp;
  float* vt = kt + BN_ * dp;
  float* dk = vt + BN_ * dp;
  float* dv = dk + BN_ * dp;
  float* s = dv + BN_ * dp;
  float* dps = s + CR * BN_;
  float* bias = dps + CR * BN_;
  float* lim = bias + CR * BN_;

  std::fill(dq_acc, dq_acc + nrows * dp, 0.f);
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t j0 = kb * BN_;
    const int nb = static_cast<int>(std::min<int64_t>(BN_, w.s.Sk - j0));
    pack_key_block<T>(w, j0, nb, kf, vf, kt, vt);
    std::fill(dk, dk + nb * dp, 0.f);
    std::fill(dv, dv + nb * dp, 0.f);
    // Rows are query-major and a query sees at least the keys of the one before: the rows before
    // the first query whose causal limit passes j0 see nothing of this block.
    const int64_t first =
        w.causal ? std::clamp<int64_t>(j0 - w.causal_shift + 1, 0, w.s.Sq) * w.G : 0;
    for (int64_t c0 = first; c0 < nrows; c0 += CR) {
      const int rows = static_cast<int>(std::min<int64_t>(CR, nrows - c0));
      bool any = false;
      for (int r = 0; r < rows; ++r) {
        // max -inf: the row saw no key (its gradients are 0); a NaN max is no such row
        const bool no_key = w.maxes[c0 + r] == -INFINITY;
        const int64_t n = no_key ? 0 : std::clamp<int64_t>(w.visible(c0 + r) - j0, 0, nb);
        lim[r] = static_cast<float>(n);  // small integers: exact as floats
        any |= n > 0;
      }
      if (!any) continue;
      const float* q = w.qp + c0 * dp;
      const float* dout = w.dop + c0 * dp;
      gemm_over_head_dim(rows, BN_ / L, D, q, dp, kt, BN_, s, BN_);       // S
      gemm_over_head_dim(rows, BN_ / L, D, dout, dp, vt, BN_, dps, BN_);  // dP
      if (w.bias) {
        gather_bias(w, c0, rows, j0, nb, bias);
        probs_and_dscores<true>(rows, lim, w.maxes + c0, w.log_sums + c0, w.deltas + c0, w.scale,
                                bias, s, dps);
      } else {
        probs_and_dscores<false>(rows, lim, w.maxes + c0, w.log_sums + c0, w.deltas + c0,
                                 w.scale, nullptr, s, dps);
      }
      gemm(nb, dp_regs, rows, s, 1, BN_, dout, dp, dv, dp, true);                 // dV += P^T dO
      gemm(nb, dp_regs, rows, dps, 1, BN_, q, dp, dk, dp, true);                  // dK += dS^T Q
      gemm(rows, dp_regs, nb, dps, BN_, 1, kf, dp, dq_acc + c0 * dp, dp, true);  // dQ += dS K
    }
    for (int j = 0; j < nb; ++j) {
      store_row(dk + j * dp, D, static_cast<T*>(w.key_of(w.dk, j0 + j)));
      store_row(dv + j * dp, D, static_cast<T*>(w.key_of(w.dv, j0 + j)));
    }
  }
}

// Pass 3 over rows [r0, r1) of the group: the sum of its `splits` dQ accumulators (split_floats
// apart; none when the sequence has no keys) as rows of dq.
template <class T>
void bwd_store_dq(const AttnBwdView& w, int64_t r0, int64_t r1, const float* acc,
                  int64_t splits, int64_t split_floats) {
  const int64_t D = w.D, dp = w.dp;
  for (int64_t r = r0; r < r1; ++r) {
    T* dst = static_cast<T*>(w.row_of(w.dq, r));
    const float* a = acc + r * dp;
    for (int64_t d = 0; d < D; d += L) {
      R x = Isa::zero();
      for (int64_t sp = 0; sp < splits; ++sp) x = Isa::add(x, Isa::load(a + sp * split_floats + d));
      if (d + L <= D)
        Isa::store(dst + d, x);
      else
        Isa::store(dst + d, x, static_cast<int>(D - d));
    }
  }
}
