// CPU implementation of lmkern::sample and lmkern::softmax (schemas in csrc/registration.cpp, the
// math in lmkern/reference/sampling.py). sampling_glue.cpp checks the arguments and allocates.
//
// One row per task (at::parallel_for over rows), no sort of the vocabulary:
//   1. one pass: validity (NaN / +inf / no finite value), max, first argmax; without top-k,
//      z = x / T is kept in a per-thread buffer (re-read from cache by the later passes);
//   2. top-k, fused into pass 1: a token becomes a candidate only if its z reaches the k-th
//      largest z seen so far, so only ~k candidates are ever partially sorted; blocks of 64
//      tokens whose max falls short of that bound are passed after one pipelined max/validity scan;
//   3. top-p: on the top-k candidates directly, or, over the whole vocabulary, a mass histogram
//      on the order-preserving integer image of z (4096 bins) narrows the boundary to one bin,
//      and only that bin is sorted;
//   4. the exponential race (Philox, csrc/include/lmkern/philox.h) over the survivors. Without a
//      candidate list it runs over the row, skipping every token whose logit is too far below
//      the best key so far for any Gumbel noise to lift it (the noise is bounded, see kGumbelMax):
//      Philox and two logs run for a few tokens, not the whole vocabulary.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "lmkern/philox.h"
#include "sampling_glue.h"

namespace lmkern::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// -log(-log(u)) <= 16.6355 for every u that uniform_open01 can return (u <= 1 - 2^-24); the
// margin covers the rounding of the key's fp32 arithmetic.
constexpr float kGumbelMax = 16.7f;

// fused_top_k screens the row in blocks of this many tokens before looking at any one of them.
constexpr int64_t kScreenBlock = 64;

constexpr int kBinBits = 12;  // histogram bins: sign, exponent and 3 mantissa bits of z
constexpr int kBins = 1 << kBinBits;

// Order-preserving map of floats to unsigned integers (for non-NaN values).
inline uint32_t order_key(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

inline uint32_t bin_of(float z) { return order_key(z) >> (32 - kBinBits); }

template <class T>
struct Tag {
  using type = T;
};

template <class F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::Float32: return f(Tag<float>{});
    case DType::Float16: return f(Tag<c10::Half>{});
    case DType::BFloat16: return f(Tag<c10::BFloat16>{});
  }
}

struct Candidate {
  float z;
  int64_t index;
};

// Descending z, ascending index among equal z (the order the reference's top-p walks in is
// irrelevant among ties: they are all kept or all dropped).
inline bool before(const Candidate& a, const Candidate& b) {
  return a.z > b.z || (a.z == b.z && a.index < b.index);
}

// Per-thread buffers, reused across calls (V floats and a few small arrays per thread).
struct Scratch {
  std::vector<float> z, e;
  std::vector<uint32_t> counts;
  std::vector<double> mass;
  std::vector<Candidate> cand;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// The race winner so far: largest key, smallest index among equal keys.
struct Best {
  float key = -kInf;
  int64_t index = -1;
  void offer(float k, int64_t i) {
    if (index < 0 || k > key || (k == key && i < index)) {
      key = k;
      index = i;
    }
  }
};

inline float race_key(float z, uint64_t seed, int64_t i, uint32_t stream) {
  const float u = uniform_open01(philox_first_word(seed, static_cast<uint32_t>(i), stream));
  return z - std::log(-std::log(u));
}

// Top-k fused into the first read of the row: validity, max, z = x / T, and the candidates.
// A token is kept as a candidate only if z >= the k-th largest z seen so far (a running bound
// refreshed with nth_element whenever the buffer fills), so after the first few thousand tokens
// almost every token costs a compare. Leaves exactly the tokens with z >= t_k in s.cand.
// Returns false for an invalid row.
template <class T>
bool fused_top_k(const T* x, int64_t V, float temp, int64_t k, Scratch& s) {
  const size_t cap = static_cast<size_t>(std::max<int64_t>(4 * k, 4096));
  s.cand.clear();
  s.cand.reserve(cap);
  float bound = -kInf, vmax = -kInf;
  bool bad = false;
  auto shrink = [&] {
    std::nth_element(s.cand.begin(), s.cand.begin() + (k - 1), s.cand.end(), before);
    bound = s.cand[k - 1].z;
    s.cand.erase(std::remove_if(s.cand.begin(), s.cand.end(),
                                [bound](const Candidate& c) { return c.z < bound; }),
                 s.cand.end());
  };
  size_t limit = cap;
  for (int64_t i0 = 0; i0 < V; i0 += kScreenBlock) {
    const int64_t n = std::min<int64_t>(kScreenBlock, V - i0);
    // Screen the block on the raw logits first: validity and its max, four independent
    // accumulators so that the loop pipelines. Only a block whose largest z reaches the bound is
    // walked token by token (z = v / T is monotone in v for T > 0: its max z is bmax / T exactly);
    // once the bound has risen, that is a few blocks of the vocabulary.
    float m[4] = {-kInf, -kInf, -kInf, -kInf};
    bool block_bad = false;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      for (int u = 0; u < 4; ++u) {
        const float v = static_cast<float>(x[i0 + j + u]);
        block_bad |= (v != v) | (v == kInf);
        m[u] = v > m[u] ? v : m[u];
      }
    }
    for (; j < n; ++j) {
      const float v = static_cast<float>(x[i0 + j]);
      block_bad |= (v != v) | (v == kInf);
      m[0] = v > m[0] ? v : m[0];
    }
    const float bmax = std::max(std::max(m[0], m[1]), std::max(m[2], m[3]));
    bad |= block_bad;
    vmax = std::max(vmax, bmax);
    if (!(bmax / temp >= bound)) continue;
    for (int64_t i = i0; i < i0 + n; ++i) {
      const float z = static_cast<float>(x[i]) / temp;
      if (z >= bound) {
        s.cand.push_back({z, i});
        if (s.cand.size() >= limit) {
          shrink();
          // Many tokens tied at the bound stay: grow rather than re-select every push.
          limit = std::max(cap, 2 * s.cand.size());
        }
      }
    }
  }
  if (bad || vmax == -kInf) return false;
  if (static_cast<int64_t>(s.cand.size()) > k) shrink();
  return true;
}

// Top-p on a candidate list holding every token still in play: keeps z >= t_p, t_p the z of the
// first token (descending) where the inclusive cumulative probability reaches p.
void top_p_on_list(float zmax, float p, Scratch& s) {
  std::sort(s.cand.begin(), s.cand.end(), before);
  double total = 0;
  for (const Candidate& c : s.cand) total += std::exp(c.z - zmax);
  float cum = 0.f;
  float t_p = s.cand.back().z;  // rounding may leave the total just under p: keep everything
  for (const Candidate& c : s.cand) {
    cum += static_cast<float>(std::exp(c.z - zmax) / total);
    if (cum >= p) {
      t_p = c.z;
      break;
    }
  }
  s.cand.erase(std::remove_if(s.cand.begin(), s.cand.end(),
                              [t_p](const Candidate& c) { return c.z < t_p; }),
               s.cand.end());
}

// Top-p over the whole row (no top-k): returns t_p. A mass histogram finds the bin where the
// cumulative probability, summed from the top bin down, reaches p; only that bin is sorted.
float top_p_threshold(const float* z, int64_t V, float zmax, float p, Scratch& s) {
  s.counts.assign(kBins, 0);
  s.mass.assign(kBins, 0.0);
  s.e.resize(V);
  double total = 0;
  for (int64_t i = 0; i < V; ++i) {
    const float e = std::exp(z[i] - zmax);
    s.e[i] = e;
    const uint32_t b = bin_of(z[i]);
    s.mass[b] += e;
    ++s.counts[b];
    total += e;
  }
  double cum = 0;  // probability of the bins above `bin`
  uint32_t bin = kBins - 1;
  for (; bin > 0; --bin) {
    const double m = s.mass[bin] / total;
    if (s.counts[bin] && cum + m >= p) break;
    cum += m;
  }
  s.cand.clear();
  for (int64_t i = 0; i < V; ++i)
    if (bin_of(z[i]) == bin) s.cand.push_back({z[i], i});
  if (s.cand.empty()) return -kInf;
  std::sort(s.cand.begin(), s.cand.end(), before);
  for (const Candidate& c : s.cand) {
    cum += s.e[c.index] / total;
    if (cum >= p) return c.z;
  }
  return s.cand.back().z;
}

struct RowParams {
  float temperature;
  int64_t top_k;
  float top_p, min_p;
  uint64_t seed;
  uint32_t stream;
};

RowParams row_params(const SampleParams& p, int64_t r) {
  RowParams q;
  q.temperature = p.temperatures ? p.temperatures[r] : p.temperature;
  q.top_k = p.top_ks ? p.top_ks[r] : p.top_k;
  q.top_p = p.top_ps ? p.top_ps[r] : p.top_p;
  q.min_p = p.min_ps ? p.min_ps[r] : p.min_p;
  q.seed = p.seeds ? static_cast<uint64_t>(p.seeds[r]) : p.seed;
  q.stream = p.seeds ? 0u : static_cast<uint32_t>(r);
  return q;
}

// Every path but top-k (no filter, top-p and/or min-p over the whole row, greedy): returns the id
// (-1 for an invalid row) and the raw max in xmax_out.
template <class T>
int64_t sample_row_full(const T* x, int64_t V, const RowParams& q, Scratch& s, float& xmax_out) {
  // Pass 1: validity, max and first argmax of the raw logits.
  float xmax = -kInf;
  int64_t imax = 0;
  bool bad = false;
  for (int64_t i = 0; i < V; ++i) {
    const float v = static_cast<float>(x[i]);
    bad |= (v != v) | (v == kInf);
    if (v > xmax) {
      xmax = v;
      imax = i;
    }
  }
  xmax_out = xmax;
  if (bad || xmax == -kInf) return -1;
  if (q.temperature == 0.f) return imax;  // greedy

  const float temp = q.temperature;
  s.z.resize(V);
  float* z = s.z.data();
  for (int64_t i = 0; i < V; ++i) z[i] = static_cast<float>(x[i]) / temp;
  const float zmax = xmax / temp;  // division by T > 0 preserves order
  const bool m_active = q.min_p > 0.f;
  const float threshold = q.top_p < 1.f ? top_p_threshold(z, V, zmax, q.top_p, s) : -kInf;
  Best best;
  best.offer(race_key(zmax, q.seed, imax, q.stream), imax);  // the max always survives
  for (int64_t i = 0; i < V; ++i) {
    const float zi = z[i];
    // The margin scales with |z| so that fp32 rounding of the key cannot defeat the bound.
    if (zi < threshold || zi + kGumbelMax + std::fabs(zi) * 1e-6f < best.key) continue;
    if (m_active && std::exp(zi - zmax) < q.min_p) continue;
    best.offer(race_key(zi, q.seed, i, q.stream), i);
  }
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
      Best best;
      for (const Candidate& c : s.cand)
        if (!(q.min_p > 0.f && std::exp(c.z - zmax) < q.min_p))
          best.offer(race_key(c.z, q.seed, c.index, q.stream), c.index);
      id = best.index;
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
  double sum = 0;  // log_softmax of the raw logits at the chosen id
  for (int64_t i = 0; i < V; ++i) sum += std::exp(static_cast<float>(x[i]) - xmax);
  p.logprobs[r] = static_cast<float>(static_cast<float>(x[id]) - xmax - std::log(sum));
}

template <class T>
void softmax_row(const SoftmaxParams& p, int64_t r) {
  const T* x = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
  float* out = p.probs + r * p.V;
  const int64_t V = p.V;
  const float T_r = p.temperatures ? p.temperatures[r] : p.temperature;
  float xmax = -kInf;
  int64_t imax = 0;
  bool nan = false;
  for (int64_t i = 0; i < V; ++i) {
    const float v = static_cast<float>(x[i]);
    nan |= v != v;
    if (v > xmax) {
      xmax = v;
      imax = i;
    }
  }
  if (T_r == 0.f && !nan) {  // the limit T -> 0: one-hot at the first argmax
    std::fill(out, out + V, 0.f);
    out[imax] = 1.f;
    return;
  }
  const float zmax = nan ? kNaN : xmax / T_r;
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) {
    out[i] = std::exp(static_cast<float>(x[i]) / T_r - zmax);
    sum += out[i];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < V; ++i) out[i] *= inv;
}

std::tuple<at::Tensor, at::Tensor> sample_cpu(
    const at::Tensor& logits, double temperature, int64_t top_k, double top_p, double min_p,
    const std::optional<at::Tensor>& temperatures, const std::optional<at::Tensor>& top_ks,
    const std::optional<at::Tensor>& top_ps, const std::optional<at::Tensor>& min_ps,
    int64_t seed, const std::optional<at::Tensor>& seeds, bool need_logprobs) {
  SampleCall c = prepare_sample(logits, temperature, top_k, top_p, min_p, temperatures, top_ks,
                                top_ps, min_ps, seed, seeds, need_logprobs);
  const SampleParams& p = c.params;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    at::parallel_for(0, p.B, 1, [&](int64_t begin, int64_t end) {
      Scratch& s = scratch();
      for (int64_t r = begin; r < end; ++r) sample_row<T>(p, r, s);
    });
  });
  return {c.ids, c.logprobs};
}

at::Tensor softmax_cpu(const at::Tensor& logits, double temperature,
                       const std::optional<at::Tensor>& temperatures) {
  SoftmaxCall c = prepare_softmax(logits, temperature, temperatures);
  const SoftmaxParams& p = c.params;
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Rows of ~V elements each: a grain of a few rows keeps small-V batches from over-splitting.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.V, 1));
    at::parallel_for(0, p.B, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) softmax_row<T>(p, r);
    });
  });
  return c.probs;
}

}  // namespace
}  // namespace lmkern::cpu

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("sample", &lmkern::cpu::sample_cpu);
  m.impl("softmax", &lmkern::cpu::softmax_cpu);
}
