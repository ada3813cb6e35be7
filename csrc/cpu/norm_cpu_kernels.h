// LayerNorm/RMSNorm row kernels, written once against the SIMD interface of simd.h.
//
// Deliberately without include guard: norm_cpu.cpp includes this file once per instruction set,
// inside a namespace that defines `Isa` (Avx512, Avx2 or Portable) and inside the matching
// LMKERN_TARGET region, so every function here is compiled for that instruction set.
//
// Work per row: the row is streamed from memory once; the extra passes (statistics, then the
// normalized output) re-read it from L1/L2. 4096 fp32 elements are 16 KiB.

// Wide vector of 32 fp32 lanes (2 AVX-512, 4 AVX2 or 8 portable registers): the independent
// registers hide FMA latency in the reductions, with the same code for every ISA.
struct V {
  static constexpr int W = 32;
  static constexpr int K = W / Isa::L;
  typename Isa::R r[K];

  LMKERN_INLINE static V splat(float a) {
    V v;
    for (int k = 0; k < K; ++k) v.r[k] = Isa::set1(a);
    return v;
  }
  LMKERN_INLINE static V zero() { return splat(0.f); }
  // Loads/stores the first n <= W elements at p; missing lanes load as 0.
  template <class T>
  LMKERN_INLINE static V load(const T* p, int n) {
    V v;
    for (int k = 0; k < K; ++k) {
      const int m = n - k * Isa::L;
      const T* q = p + k * Isa::L;
      v.r[k] = m >= Isa::L ? Isa::load(q) : m > 0 ? Isa::load(q, m) : Isa::zero();
    }
    return v;
  }
  template <class T>
  LMKERN_INLINE void store(T* p, int n) const {
    for (int k = 0; k < K; ++k) {
      const int m = n - k * Isa::L;
      if (m >= Isa::L) Isa::store(p + k * Isa::L, r[k]);
      else if (m > 0) Isa::store(p + k * Isa::L, r[k], m);
    }
  }
  LMKERN_INLINE V keep(int n) const {  // lanes >= n set to 0
    V v;
    for (int k = 0; k < K; ++k) {
      const int m = n - k * Isa::L;
      v.r[k] = m >= Isa::L ? r[k] : m > 0 ? Isa::keep(r[k], m) : Isa::zero();
    }
    return v;
  }
  LMKERN_INLINE V rounded() const {  // see Isa::rounded
    V v;
    for (int k = 0; k < K; ++k) v.r[k] = Isa::rounded(r[k]);
    return v;
  }
  LMKERN_INLINE float sum() const {
    typename Isa::R s = r[0];
    for (int k = 1; k < K; ++k) s = Isa::add(s, r[k]);
    return Isa::hsum(s);
  }
  template <class Op>
  LMKERN_INLINE static V zip(const V& a, const V& b, Op op) {
    V v;
    for (int k = 0; k < K; ++k) v.r[k] = op(a.r[k], b.r[k]);
    return v;
  }
  LMKERN_INLINE friend V operator+(const V& a, const V& b) {
    return zip(a, b, [](auto x, auto y) LMKERN_LAMBDA_INLINE { return Isa::add(x, y); });
  }
  LMKERN_INLINE friend V operator-(const V& a, const V& b) {
    return zip(a, b, [](auto x, auto y) LMKERN_LAMBDA_INLINE { return Isa::sub(x, y); });
  }
  LMKERN_INLINE friend V operator*(const V& a, const V& b) {
    return zip(a, b, [](auto x, auto y) LMKERN_LAMBDA_INLINE { return Isa::mul(x, y); });
  }
  LMKERN_INLINE friend V fma(const V& a, const V& b, const V& c) {  // a * b + c
    V v;
    for (int k = 0; k < K; ++k) v.r[k] = Isa::fmadd(a.r[k], b.r[k], c.r[k]);
    return v;
  }
};

// Calls f(i, n) for consecutive chunks [i, i + n) of [begin, end), n == V::W but for the last.
template <class F>
LMKERN_INLINE void for_chunks(int64_t begin, int64_t end, F&& f) {
  int64_t i = begin;
  for (; i + V::W <= end; i += V::W) f(i, V::W);
  if (i < end) f(i, static_cast<int>(end - i));
}

// NS row sums at once: chunk(i, n, acc) adds its contributions to acc[0..NS). Lanes accumulate in
// fp32 over 512-element blocks and the block totals are added in double, so the rounding error
// stays at a few fp32 ulps whatever N (rows can be 262144 long); the statistics are stored fp32.
template <int NS, class F>
LMKERN_INLINE void row_sums(int64_t N, double (&total)[NS], F&& chunk) {
  constexpr int64_t kBlock = 512;
  for (int s = 0; s < NS; ++s) total[s] = 0.0;
  for (int64_t b = 0; b < N; b += kBlock) {
    V acc[NS];
    for (int s = 0; s < NS; ++s) acc[s] = V::zero();
    for_chunks(b, std::min(N, b + kBlock),
               [&](int64_t i, int n) LMKERN_LAMBDA_INLINE { chunk(i, n, acc); });
    for (int s = 0; s < NS; ++s) total[s] += acc[s].sum();
  }
}

// ----------------------------------------------------------------------------------- forward
// w, b: weight + weight_offset and bias, converted to fp32 once per call (or null).
template <class T>
void fwd_rows(const NormFwdParams& p, const float* w, const float* b, int64_t row0, int64_t row1) {
  const int64_t N = p.N;
  for (int64_t row = row0; row < row1; ++row) {
    const T* h = static_cast<const T*>(p.x) + row * p.x_row_stride;
    if (p.residual) {
      // h = round(x + residual), stored, then normalized as read back: exactly the unfused result.
      const T* res = static_cast<const T*>(p.residual) + row * p.residual_row_stride;
      T* hout = static_cast<T*>(p.residual_out) + row * N;
      for_chunks(0, N, [&](int64_t i, int n) LMKERN_LAMBDA_INLINE {
        (V::load(h + i, n) + V::load(res + i, n)).store(hout + i, n);
      });
      h = hout;
    }
    double s[1];
    float mean = 0.f, var;
    if (p.is_rms) {
      row_sums(N, s, [&](int64_t i, int n, V* acc) LMKERN_LAMBDA_INLINE {
        const V v = V::load(h + i, n);
        acc[0] = fma(v, v, acc[0]);
      });
      var = static_cast<float>(s[0] / N);  // mean of squares
    } else {
      row_sums(N, s, [&](int64_t i, int n, V* acc) LMKERN_LAMBDA_INLINE {
        acc[0] = acc[0] + V::load(h + i, n);
      });
      mean = static_cast<float>(s[0] / N);
      // Second pass over the cached row: sum((h - mean)^2) does not cancel when |mean| >> std.
      const V vmean = V::splat(mean);
      row_sums(N, s, [&](int64_t i, int n, V* acc) LMKERN_LAMBDA_INLINE {
        V d = V::load(h + i, n) - vmean;
        if (n < V::W) d = d.keep(n);
        acc[0] = fma(d, d, acc[0]);
      });
      var = static_cast<float>(s[0] / N);
      p.mean[row] = mean;
    }
    // NaN/inf in the row propagate through the sums into mean/rstd and the whole output row.
    const float rstd = 1.f / std::sqrt(var + p.eps);
    p.rstd[row] = rstd;

    const V vmean = V::splat(mean), vrstd = V::splat(rstd);
    T* y = static_cast<T*>(p.out) + row * N;
    for_chunks(0, N, [&](int64_t i, int n) LMKERN_LAMBDA_INLINE {
      V v = (V::load(h + i, n) - vmean) * vrstd;
      if (w && b) v = fma(v, V::load(w + i, n), V::load(b + i, n));
      else if (w) v = v * V::load(w + i, n);
      else if (b) v = v + V::load(b + i, n);
      v.store(y + i, n);
    });
  }
}

// ---------------------------------------------------------------------------------- backward
// Rows [row0, row1) with w = weight + weight_offset in fp32 (or null): dx, and the fp32 partials
// dw += sum of dy * xhat and db += sum of dy over these rows, in row order (each may be null).
//   xhat = (x - mean) * rstd, g = dy * w, dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
// Rows go in small groups whose dy and x stay in cache: pass 1 streams each row from memory for
// its two sums; pass 2 then walks the group's rows column chunk by column chunk, so that w and the
// partials are loaded and stored once per group rather than once per row.
template <class T>
void bwd_rows(const NormBwdParams& p, const float* w, int64_t row0, int64_t row1, float* dw,
              float* db) {
  constexpr int kMaxGroup = 8;
  const int64_t N = p.N;
  // Rows per group: their dy and x take <= 64 KiB, about L1 (measured best: 2 rows of 4096 fp32,
  // 4 of bf16). Without partials to update there is nothing to share: one row at a time.
  const int64_t group_bytes = 2 * N * static_cast<int64_t>(sizeof(T));
  const int64_t group =
      (dw || db) ? std::clamp<int64_t>((int64_t{64} << 10) / group_bytes, 1, kMaxGroup) : 1;
  struct Row {
    const T* dy;
    const T* x;
    const T* dres;
    T* dx;
    float mean, rstd, c_g, c_gx;  // c_g = mean(g), c_gx = mean(g * xhat)
  } rows[kMaxGroup];
  for (int64_t g0 = row0; g0 < row1; g0 += group) {
    const int nrows = static_cast<int>(std::min(row1 - g0, group));
    for (int k = 0; k < nrows; ++k) {
      const int64_t row = g0 + k;
      Row& r = rows[k];
      r.dy = static_cast<const T*>(p.dy) + row * p.dy_row_stride;
      r.x = static_cast<const T*>(p.x) + row * p.x_row_stride;
      r.dres = p.dresidual
                   ? static_cast<const T*>(p.dresidual) + row * p.dresidual_row_stride
                   : nullptr;
      r.dx = static_cast<T*>(p.dx) + row * N;
      r.mean = p.is_rms ? 0.f : p.mean[row];
      r.rstd = p.rstd[row];
      // Pass 1 (streams dy and x from memory): sum(g) and sum(g * xhat).
      const V mean = V::splat(r.mean), rstd = V::splat(r.rstd);
      double s[2];
      row_sums(N, s, [&](int64_t i, int n, V* acc) LMKERN_LAMBDA_INLINE {
        const V dyv = V::load(r.dy + i, n);
        const V g = w ? (dyv * V::load(w + i, n)).rounded() : dyv;
        acc[0] = acc[0] + g;
        acc[1] = fma(g, (V::load(r.x + i, n) - mean) * rstd, acc[1]);
      });
      r.c_g = p.is_rms ? 0.f : static_cast<float>(s[0] / N);
      r.c_gx = static_cast<float>(s[1] / N);
    }
    // Pass 2 (the group's dy and x now in cache), column chunk by column chunk.
    for_chunks(0, N, [&](int64_t i, int n) LMKERN_LAMBDA_INLINE {
      const V wv = w ? V::load(w + i, n) : V::zero();
      V aw = dw ? V::load(dw + i, n) : V::zero();
      V ab = db ? V::load(db + i, n) : V::zero();
      for (int k = 0; k < nrows; ++k) {
        const Row& r = rows[k];
        const V rstd = V::splat(r.rstd);
        const V dyv = V::load(r.dy + i, n);
        const V xhat = (V::load(r.x + i, n) - V::splat(r.mean)) * rstd;
        // g exactly as in pass 1 (rounded, not fused into the subtraction): for N == 1 LayerNorm,
        // g - mean(g) must be exactly 0.
        const V g = w ? (dyv * wv).rounded() : dyv;
        V dx = fma(xhat, V::splat(-r.c_gx), g - V::splat(r.c_g)) * rstd;
        if (r.dres) dx = dx + V::load(r.dres + i, n);
        dx.store(r.dx + i, n);
        if (dw) aw = fma(dyv, xhat, aw);
        if (db) ab = ab + dyv;
      }
      if (dw) aw.store(dw + i, n);
      if (db) ab.store(db + i, n);
    });
  }
}

// Sum of part[b * N + i + (0..n)] over blocks b in [b0, b1), pairwise so the rounding error grows
// like log(blocks), in a fixed order: the same result whatever the number of threads.
V sum_blocks(const float* part, int64_t N, int64_t i, int n, int64_t b0, int64_t b1) {
  if (b1 - b0 > 8) {
    const int64_t mid = b0 + (b1 - b0) / 2;
    return sum_blocks(part, N, i, n, b0, mid) + sum_blocks(part, N, i, n, mid, b1);
  }
  V acc = V::zero();
  for (int64_t b = b0; b < b1; ++b) acc = acc + V::load(part + b * N + i, n);
  return acc;
}

template <class T>
void reduce_partials(const float* part, int64_t nblocks, int64_t N, T* dst) {
  at::parallel_for(0, N, 4096, [&](int64_t c0, int64_t c1) {
    for_chunks(c0, c1, [&](int64_t i, int n) LMKERN_LAMBDA_INLINE {
      sum_blocks(part, N, i, n, 0, nblocks).store(dst + i, n);
    });
  });
}

// ------------------------------------------------------------------------------ entry points
inline void norm_fwd(const NormFwdParams& p, const float* w, const float* b) {
  // At least ~16K elements per task: smaller tasks cost more to hand out than to run.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.N, 1));
  dispatch_dtype(p.x_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    at::parallel_for(0, p.M, grain, [&](int64_t r0, int64_t r1) { fwd_rows<T>(p, w, b, r0, r1); });
  });
}

// Rows are split into fixed blocks (BwdBlocks, independent of the thread count); each block
// accumulates dweight/dbias into its own fp32 partial row (dw_part/db_part: blk.count x N),
// summed afterwards in a fixed order.
inline void norm_bwd(const NormBwdParams& p, const float* w, const BwdBlocks& blk, float* dw_part,
                     float* db_part) {
  const int64_t N = p.N;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(blk.rows * N, 1));
  dispatch_dtype(p.x_dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    at::parallel_for(0, blk.count, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float* dw = p.dweight ? dw_part + b * N : nullptr;
        float* db = p.dbias ? db_part + b * N : nullptr;
        if (dw) std::fill(dw, dw + N, 0.f);
        if (db) std::fill(db, db + N, 0.f);
        bwd_rows<T>(p, w, b * blk.rows, std::min(p.M, (b + 1) * blk.rows), dw, db);
      }
    });
  });
  // dweight/dbias = sum of the block partials (zeros when M == 0).
  auto finish = [&](const float* part, void* dst) {
    if (!dst) return;
    dispatch_dtype(p.w_dtype, [&](auto tag) {
      using W = typename decltype(tag)::type;
      reduce_partials(part, blk.count, N, static_cast<W*>(dst));
    });
  };
  finish(dw_part, p.dweight);
  finish(db_part, p.dbias);
}
