// CPU implementation of lmkern::sample and lmkern::softmax (schemas in csrc/registration.cpp, the
// math in lmkern/reference/sampling.py). sampling_glue.cpp checks the arguments and allocates;
// the passes are in sampling_cpu_kernels.h, compiled once per instruction set.
//
// No sort of the vocabulary, every pass a stream of vector loads over the row (the later passes
// re-read it from cache), no buffer of V values:
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
//
// Rows run in parallel, one per task. When the batch leaves threads idle (B = 1 in generation)
// and rows are long, each row is instead cut into contiguous token ranges (row_splits), each
// pass runs on every range of every row at once, and a row's range results are combined before
// its next pass: maxima and first argmaxes; per-range top-k lists (each holds its range's share
// of the row's top-k set) merged and cut again; histograms added; race winners compared by the
// same (largest key, smallest index) rule, each token's key depending only on its own index.
// Every sum is exact (ExactSum, mass_bits), so the split gives the same ids and logprobs, bit for
// bit, as one range per row: the unsplit path is the same code with one range.
#include "simd.h"  // first: see the note on immintrin.h there

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "lmkern/philox.h"
#include "lmkern/sampling_math.h"  // greedy_row
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

// Sums of exp run in fp32 lanes within chunks of this many tokens (chunked_sum); split ranges
// start at multiples of it, so that a split row has the same chunks.
constexpr int64_t kSumChunk = 1024;

// The fewest tokens a range of a split row gets: smaller shares do not pay for the passes' thread
// hand-offs, the combinations and the waiting worker threads (measured through lmkern.sample on
// 2 cores, B = 1, fp32): 16K for rows that take several passes (no filter, top-p or min-p over the
// row, logprobs, softmax: V = 32768 breaks even, 65536 gains 35%), 96K for rows whose only pass
// is the first (top-k, greedy), which streams at memory speed (V = 128256 in two ranges loses
// 10 us of 60, V = 256000 gains 20 of 120).
constexpr int64_t kMinRangeTokens = 16384;
constexpr int64_t kMinRangeTokensOnePass = 98304;

struct Candidate {
  float z;
  int64_t index;
};

// Descending z, ascending index among equal z (the order the reference's top-p walks in is
// irrelevant among ties: they are all kept or all dropped).
inline bool before(const Candidate& a, const Candidate& b) {
  return a.z > b.z || (a.z == b.z && a.index < b.index);
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
  void offer(const Best& o) {
    if (o.index >= 0) offer(o.key, o.index);
  }
};

// The sums below are exact integers, so they do not depend on the order of their additions: a
// row's sums come out the same however its tokens are grouped (by register, chunk or range).

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

// Tokens [begin, end) of a row.
struct Range {
  int64_t begin, end;
};

// Range j of a row of V tokens cut into n (n <= the number of kSumChunk chunks): whole chunks,
// as even as they go.
inline Range range_of(int64_t V, int n, int j) {
  const int64_t chunks = (V + kSumChunk - 1) / kSumChunk;
  return {chunks * j / n * kSumChunk, std::min(V, chunks * (j + 1) / n * kSumChunk)};
}

// How many ranges each row is cut into: 1 (rows in parallel) unless there are at least twice as
// many threads as rows (fewer would leave the same threads idle) and the rows are long.
// LMKERN_CPU_SAMPLE_SPLITS=n forces n (tests; 1: never split), read each call (a getenv).
int row_splits(int64_t B, int64_t V, int64_t min_range_tokens = kMinRangeTokens) {
  int64_t n = 1;
  const char* env = std::getenv("LMKERN_CPU_SAMPLE_SPLITS");
  if (env && *env) n = std::atoll(env);
  else if (B > 0) n = std::min<int64_t>(at::get_num_threads() / B, V / min_range_tokens);
  const int64_t chunks = (V + kSumChunk - 1) / kSumChunk;
  return static_cast<int>(std::clamp<int64_t>(n, 1, std::max<int64_t>(chunks, 1)));
}

// fn(r, j, range j of row r) for every range of every row (n per row), spread over the threads.
template <class F>
void for_ranges(int64_t B, int64_t V, int n, F&& fn) {
  at::parallel_for(0, B * n, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int j = static_cast<int>(t % n);
      fn(t / n, j, range_of(V, n, j));
    }
  });
}

struct RowScan {
  float max;       // largest non-NaN logit (+inf if any, -inf if none)
  int64_t argmax;  // its first index
  bool nan;        // any NaN
};

// a and the scan of the range after a's.
inline void merge_scan(RowScan& a, const RowScan& b) {
  a.nan |= b.nan;
  if (b.max > a.max) {  // strict: the earlier range keeps ties
    a.max = b.max;
    a.argmax = b.argmax;
  }
}

inline bool invalid(const RowScan& s) { return s.nan || s.max == kInf || s.max == -kInf; }

// Top-p on a candidate list holding every token still in play: keeps z >= t_p, t_p the z of the
// first token (descending) where the inclusive cumulative probability reaches p.
void top_p_on_list(std::vector<Candidate>& cand, float zmax, float p) {
  std::sort(cand.begin(), cand.end(), before);
  double total = 0;
  for (const Candidate& c : cand) total += std::exp(c.z - zmax);
  float cum = 0.f;
  float t_p = cand.back().z;  // rounding may leave the total just under p: keep everything
  for (const Candidate& c : cand) {
    cum += static_cast<float>(std::exp(c.z - zmax) / total);
    if (cum >= p) {
      t_p = c.z;
      break;
    }
  }
  cand.erase(std::remove_if(cand.begin(), cand.end(), [t_p](const Candidate& c) { return c.z < t_p; }),
             cand.end());
}

// Keeps the k largest z of a list of more than k (and every token tied with the k-th); returns
// the k-th largest z.
float cut_to_top_k(std::vector<Candidate>& cand, int64_t k) {
  std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), before);
  const float bound = cand[k - 1].z;
  cand.erase(std::remove_if(cand.begin(), cand.end(), [bound](const Candidate& c) { return c.z < bound; }),
             cand.end());
  return bound;
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

// ------------------------------------------------------------------ the sampler's passes
// A row goes through the passes in this order, each over every range of the row (one range when
// it is not split), then combine_pass merges the ranges' results into the row's state.
enum Pass { kScan, kHistogram, kBinTokens, kFinish, kPasses };

enum class Kind : uint8_t {
  kGreedy,  // temperature 0, or x_max / T overflows (sampling_math.h greedy_row): the first argmax
  kTopK,    // top-k (then top-p, min-p) on a candidate list from the first pass
  kFull,    // everything else: top-p and min-p over the whole row, the race over the row
};

// What the passes found so far in one row.
struct RowState {
  RowParams q;
  Kind kind;
  bool valid = false;
  float xmax = -kInf, zmax = -kInf;  // raw and scaled max
  int64_t id = -1;
  float logprob = kNaN;
  Best best;                 // kFull: the race's starting point, the max token
  uint32_t bin = 0;          // top-p over the row: its boundary bin,
  double cum = 0, total = 0; // the probability above that bin, and the row's total mass
  float threshold = -kInf;   // z >= threshold survives top-p
};

// One pass's result over one range (the whole row when it is not split). Buffers keep their
// capacity across calls.
struct RangePart {
  RowScan scan;
  std::vector<Candidate> cand;  // kScan: the range's top-k list; kBinTokens: the bin's tokens
  std::vector<uint32_t> counts;  // kHistogram, kBins each
  std::vector<uint64_t> mass;    // fixed point, see mass_bits
  Best best;
  ExactSum sum;
};

RowState start_row(const SampleParams& p, int64_t r) {
  RowState row;
  row.q = row_params(p, r);
  row.kind = row.q.temperature == 0.f                        ? Kind::kGreedy
             : row.q.top_k > 0 && row.q.top_k < p.V ? Kind::kTopK
                                                             : Kind::kFull;
  return row;
}

bool needs_pass(int pass, const RowState& row, const SampleParams& p) {
  switch (pass) {
    case kScan: return true;
    case kHistogram:
    case kBinTokens: return row.valid && row.kind == Kind::kFull && row.q.top_p < 1.f;
    default: return row.valid && (row.kind == Kind::kFull || p.logprobs);
  }
}

// The top-p boundary bin from the row's summed histogram: the first bin, from the top, where
// the cumulative probability reaches p.
void find_boundary_bin(const uint32_t* counts, const uint64_t* mass, int64_t V, RowState& row) {
  const int bits = mass_bits(V);
  uint64_t total = 0;
  for (int b = 0; b < kBins; ++b) total += mass[b];
  row.total = std::ldexp(static_cast<double>(total), -bits);
  double cum = 0;  // probability of the bins above `bin`
  uint32_t bin = kBins - 1;
  for (; bin > 0; --bin) {
    const double m = std::ldexp(static_cast<double>(mass[bin]), -bits) / row.total;
    if (counts[bin] && cum + m >= row.q.top_p) break;
    cum += m;
  }
  row.bin = bin;
  row.cum = cum;
}

void write_row(const SampleParams& p, int64_t r, const RowState& row) {
  p.ids[r] = row.valid ? row.id : -1;
  if (p.logprobs) p.logprobs[r] = row.valid && row.id >= 0 ? row.logprob : kNaN;
}

// Per-thread buffers, reused across calls.
struct Scratch {
  RangePart part;                // rows in parallel: the one range of the row at hand
  std::vector<RowState> rows;    // split rows: every row's state
  std::vector<RangePart> parts;  // and every range's result, row by row
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

}  // namespace
}  // namespace lmkern::cpu

namespace lmkern::cpu {
const char* isa_name();  // norm_cpu.cpp: the instruction set chosen for this CPU

#define LMKERN_ISA_KERNELS "sampling_cpu_kernels.h"
#include "isa_instances.h"

namespace {

// The entry points of the instruction set isa_name() chose, per logits dtype.
struct Kernels {
  void (*sample[3])(const SampleParams&, int);  // float, Half, BFloat16
  void (*softmax[3])(const SoftmaxParams&, int);
};

#define LMKERN_SAMPLING_KERNELS(ns)                                              \
  Kernels{{&ns::sample<float>, &ns::sample<Half>, &ns::sample<BFloat16>},       \
          {&ns::softmax<float>, &ns::softmax<Half>, &ns::softmax<BFloat16>}}

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
  bool one_pass = !p.logprobs;  // every row greedy or top-k (see kMinRangeTokensOnePass)
  for (int64_t r = 0; r < p.B && one_pass; ++r) one_pass = start_row(p, r).kind != Kind::kFull;
  kernels().sample[dtype_slot(p.dtype)](
      p, row_splits(p.B, p.V, one_pass ? kMinRangeTokensOnePass : kMinRangeTokens));
  return {c.ids, c.logprobs};
}

at::Tensor softmax_cpu(const at::Tensor& logits, double temperature,
                       const std::optional<at::Tensor>& temperatures) {
  SoftmaxCall c = prepare_softmax(logits, temperature, temperatures);
  const SoftmaxParams& p = c.params;
  kernels().softmax[dtype_slot(p.dtype)](p, row_splits(p.B, p.V));
  return c.probs;
}

}  // namespace
}  // namespace lmkern::cpu

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("sample", &lmkern::cpu::sample_cpu);
  m.impl("softmax", &lmkern::cpu::softmax_cpu);
}
