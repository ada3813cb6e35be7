// CPU implementation of lmkern::sample and lmkern::softmax (schemas in csrc/registration.cpp, the
// math in lmkern/reference/sampling.py). sampling_glue.cpp checks the arguments and allocates;
// the row kernels are in sampling_cpu_kernels.h, compiled once per instruction set.
//
// One row per task (at::parallel_for over rows), no sort of the vocabulary, every pass a stream
// of vector loads over the row (the later passes re-read it from cache), no buffer of V values:
//   1. one pass: validity (NaN / +inf / no finite value), max, first argmax;
//   2. top-k, fused into pass 1: a token becomes a candidate only if its z = x / T reaches the
//      k-th largest z seen so far, so only ~k candidates are ever partially sorted; blocks of
//      8 registers whose max falls short of that bound cost their loads and a vector max;
//   3. top-p: on the top-k candidates directly, or, over the whole vocabulary, a mass histogram
//      on the order-preserving integer image of z (4096 bins) narrows the boundary to one bin,
//      and only that bin is sorted;
//   4. the exponential race (Philox, csrc/include/lmkern/philox.h) over the survivors. Without a
//      candidate list it runs over the row, skipping every register of tokens whose logits are
//      too far below the best key so far for any Gumbel noise to lift them (the noise is
//      bounded, see kGumbelMax): Philox and two logs run for a few tokens, not the vocabulary.
#include "simd.h"  // first: see the note on immintrin.h there

#include <ATen/Parallel.h>
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

constexpr int kBinBits = 12;  // histogram bins: sign, exponent and 3 mantissa bits of z
constexpr int kBins = 1 << kBinBits;

struct Candidate {
  float z;
  int64_t index;
};

// Descending z, ascending index among equal z (the order the reference's top-p walks in is
// irrelevant among ties: they are all kept or all dropped).
inline bool before(const Candidate& a, const Candidate& b) {
  return a.z > b.z || (a.z == b.z && a.index < b.index);
}

// Per-thread buffers, reused across calls (the histogram and the candidates).
struct Scratch {
  std::vector<uint32_t> counts;
  std::vector<uint64_t> mass;  // fixed point, see mass_bits
  std::vector<Candidate> cand;
};

// The sums below are exact integers, so they do not depend on the order of their additions: a
// row's sums come out the same however its tokens are grouped (by register, chunk or thread).

// Fractional bits of the top-p histogram's masses: each token's exp(z - zmax) <= 1 is truncated
// to a multiple of 2^-bits (below the fp32 rounding of the exp itself), as many bits as V such
// terms can hold in 63.
inline int mass_bits(int64_t V) { return __builtin_clzll(static_cast<uint64_t>(V)) - 1; }

// A sum of non-negative floats (the per-chunk sums of exp) in 128-bit fixed point, truncated to
// multiples of 2^-88: exact, and rounded to double once at the end. A NaN part makes it NaN.
struct ExactSum {
  unsigned __int128 fixed = 0;
  bool nan = false;
  void add(float part) {
    if (!(part >= 0.f && part <= 0x1p16f)) {  // a chunk sum is <= 1024 unless NaN
      nan = true;
      return;
    }
    fixed += static_cast<unsigned __int128>(static_cast<double>(part) * 0x1p88);
  }
  void add(const ExactSum& o) {
    fixed += o.fixed;
    nan |= o.nan;
  }
  double value() const { return nan ? kNaN : static_cast<double>(fixed) * 0x1p-88; }
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

}  // namespace
}  // namespace lmkern::cpu

namespace lmkern::cpu {
const char* isa_name();  // norm_cpu.cpp: the instruction set chosen for this CPU

#define LMKERN_ISA_KERNELS "sampling_cpu_kernels.h"
#include "isa_instances.h"

namespace {

// The row kernels of the instruction set isa_name() chose, per logits dtype.
struct Kernels {
  void (*sample[3])(const SampleParams&, int64_t, Scratch&);  // float, Half, BFloat16
  void (*softmax[3])(const SoftmaxParams&, int64_t);
};

#define LMKERN_SAMPLING_KERNELS(ns)                                                         \
  Kernels{{&ns::sample_row<float>, &ns::sample_row<Half>, &ns::sample_row<BFloat16>},      \
          {&ns::softmax_row<float>, &ns::softmax_row<Half>, &ns::softmax_row<BFloat16>}}

const Kernels& kernels() {
  static const Kernels k = LMKERN_CHOSEN_ISA(LMKERN_SAMPLING_KERNELS);
  return k;
}

int dtype_slot(DType d) { return d == DType::Float32 ? 0 : d == DType::Float16 ? 1 : 2; }

std::tuple<at::Tensor, at::Tensor> sample_cpu(
    const at::Tensor& logits, double temperature, int64_t top_k, double top_p, double min_p,
    const std::optional<at::Tensor>& temperatures, const std::optional<at::Tensor>& top_ks,
    const std::optional<at::Tensor>& top_ps, const std::optional<at::Tensor>& min_ps,
    int64_t seed, const std::optional<at::Tensor>& seeds, bool need_logprobs) {
  SampleCall c = prepare_sample(logits, temperature, top_k, top_p, min_p, temperatures, top_ks,
                                top_ps, min_ps, seed, seeds, need_logprobs);
  const SampleParams& p = c.params;
  const auto row = kernels().sample[dtype_slot(p.dtype)];
  at::parallel_for(0, p.B, 1, [&](int64_t begin, int64_t end) {
    Scratch& s = scratch();
    for (int64_t r = begin; r < end; ++r) row(p, r, s);
  });
  return {c.ids, c.logprobs};
}

at::Tensor softmax_cpu(const at::Tensor& logits, double temperature,
                       const std::optional<at::Tensor>& temperatures) {
  SoftmaxCall c = prepare_softmax(logits, temperature, temperatures);
  const SoftmaxParams& p = c.params;
  const auto row = kernels().softmax[dtype_slot(p.dtype)];
  // Rows of ~V elements each: a grain of a few rows keeps small-V batches from over-splitting.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.V, 1));
  at::parallel_for(0, p.B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row(p, r);
  });
  return c.probs;
}

}  // namespace
}  // namespace lmkern::cpu

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("sample", &lmkern::cpu::sample_cpu);
  m.impl("softmax", &lmkern::cpu::softmax_cpu);
}
