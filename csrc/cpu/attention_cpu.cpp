// CPU implementation of lmkern::attention_fwd (schema in csrc/registration.cpp, the math in
// lmkern/reference/attention.py): FlashAttention-2 style tiled online softmax in fp32, never an
// Sq x Sk matrix in memory. This file checks the arguments, resolves dense / packed / seqused_k
// inputs into per-sequence offsets, cuts the work into items of (sequence, kv head, block of
// query rows) and hands them to the threads; attention_cpu_kernels.h, compiled once per
// instruction set, runs an item.
#include "simd.h"  // first: see the note on immintrin.h there

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace lmkern::cpu {

const char* isa_name();  // norm_cpu.cpp: the instruction set chosen for this CPU

namespace {

// One sequence's view of the inputs: element offsets of its first token in q/k/v/out/lse and
// its lengths (the key length already limited by seqused_k).
struct Seq {
  int64_t q, k, v, out, lse, bias, Sq, Sk;
};

// Everything a work item needs: (sequence, kv head, rows [row0, row0 + rows) of that head
// group's query-major (query, head-in-group) rows).
struct AttnItemView {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse_base;
  const float* bias;
  int64_t q_tok, q_head, k_tok, k_head, v_tok, v_head, out_tok, out_head, lse_head;
  int64_t b_head, b_q, b_k;  // bias strides (its batch offset is in Seq)
  int64_t elt;               // element size of q/k/v/out in bytes
  int64_t G;                 // query heads per kv head
  bool causal;
  int64_t causal_shift;  // key j visible to query i iff j < i + causal_shift (causal only)
  float scale;
  int D;
  int64_t ld;  // row stride of the transposed per-item buffers

  // Per item.
  Seq s;
  int64_t hkv, row0;
  int rows;

  int64_t query(int r) const { return (row0 + r) / G; }
  int64_t head(int r) const { return hkv * G + (row0 + r) % G; }
  int64_t visible(int r) const {
    if (!causal) return s.Sk;
    return std::clamp<int64_t>(query(r) + causal_shift, 0, s.Sk);
  }
  const void* q_row(int r) const {
    return static_cast<const char*>(q) +
           (s.q + query(r) * q_tok + head(r) * q_head) * elt;
  }
  const void* k_row(int64_t j) const {
    return static_cast<const char*>(k) + (s.k + j * k_tok + hkv * k_head) * elt;
  }
  const void* v_row(int64_t j) const {
    return static_cast<const char*>(v) + (s.v + j * v_tok + hkv * v_head) * elt;
  }
  void* out_row(int r) const {
    return static_cast<char*>(out) + (s.out + query(r) * out_tok + head(r) * out_head) * elt;
  }
  float* lse_at(int r) const { return lse_base + s.lse + head(r) * lse_head + query(r); }

  // st[j * ld_st + (r - r0)] += bias(row r, key j0 + j) for the item's rows in [r0, r0 + lanes).
  void add_bias(float* st, int ld_st, int r0, int lanes, int64_t j0, int nb) const {
    for (int r = r0; r < std::min(r0 + lanes, rows); ++r) {
      const float* br = bias + s.bias + head(r) * b_head + query(r) * b_q + j0 * b_k;
      for (int j = 0; j < nb; ++j) st[j * ld_st + (r - r0)] += br[j * b_k];
    }
  }
};

}  // namespace

#if LMKERN_X86_SIMD
LMKERN_TARGET_BEGIN(LMKERN_AVX512_ISA)
namespace {
namespace avx512 {
using Isa = Avx512;
#include "attention_cpu_kernels.h"
}  // namespace avx512
}  // namespace
LMKERN_TARGET_END

LMKERN_TARGET_BEGIN(LMKERN_AVX2_ISA)
namespace {
namespace avx2 {
using Isa = Avx2;
#include "attention_cpu_kernels.h"
}  // namespace avx2
}  // namespace
LMKERN_TARGET_END
#endif

namespace {
namespace portable {
using Isa = Portable;
#include "attention_cpu_kernels.h"
}  // namespace portable
}  // namespace

namespace {

constexpr const char* kOp = "lmkern.attention_fwd: ";

// Floats of per-thread scratch for items of up to `ld` rows (see run_item).
int64_t scratch_floats(int D, int64_t ld, int bn, int cw) {
  return 2 * ld + 2 * D * ld + 2 * bn * D + bn * cw + 3 * ld;
}

struct Kernel {
  int bn, cw;
  void (*run[3])(const AttnItemView&, float*);  // float, Half, BFloat16
};

#define LMKERN_ATTN_KERNEL(ns)                                                   \
  Kernel{ns::BN, ns::CW, {&ns::run_item<float>, &ns::run_item<Half>, &ns::run_item<BFloat16>}}

const Kernel& kernel() {
  static const Kernel k = [] {
    const std::string isa = isa_name();
#if LMKERN_X86_SIMD
    if (isa == "avx512") return LMKERN_ATTN_KERNEL(avx512);
    if (isa == "avx2") return LMKERN_ATTN_KERNEL(avx2);
#endif
    return LMKERN_ATTN_KERNEL(portable);
  }();
  return k;
}

// Per-thread scratch, kept between calls (fresh memory costs a page fault per 4 KiB page).
float* thread_scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

void check_qkv(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t dims,
               const char* layout) {
  TORCH_CHECK(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dims, kOp, name, " must be ", dims, "-D ", layout, ", got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), kOp, name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, kOp, name,
              " must have stride 1 in its last (head) dim, got strides ", t.strides());
}

// The int32 host values of a 1-D index tensor of length n.
std::vector<int64_t> int32_values(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, kOp, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, kOp, name, " must have shape (", n,
              ",), got ", t.sizes());
  const at::Tensor c = t.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  return std::vector<int64_t>(p, p + n);
}

void check_cu_seqlens(const std::vector<int64_t>& cu, const char* name, int64_t total) {
  TORCH_CHECK(cu[0] == 0, kOp, name, " must start at 0, got ", cu[0]);
  for (size_t b = 1; b < cu.size(); ++b)
    TORCH_CHECK(cu[b] >= cu[b - 1], kOp, name, " must be non-decreasing, got ", cu[b - 1],
                " then ", cu[b]);
  TORCH_CHECK(cu.back() == total, kOp, name, " must end at the number of packed rows ", total,
              ", got ", cu.back());
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    // Bounds only: every length is taken from the tensors themselves.
    int64_t /*max_seqlen_q*/, int64_t /*max_seqlen_k*/, bool causal, bool causal_top_left,
    double scale) {
  TORCH_CHECK(q.device().is_cpu(), kOp, "q must be a CPU tensor, got ", q.device());
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, kOp,
              "q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), kOp,
              "cu_seqlens_q and cu_seqlens_k must be given together");
  const bool packed = cu_seqlens_q.has_value();
  const int64_t dims = packed ? 3 : 4;
  const char* layout = packed ? "(total, heads, head_dim)" : "(batch, seqlen, heads, head_dim)";
  check_qkv(q, "q", q, dims, layout);
  check_qkv(k, "k", q, dims, layout);
  check_qkv(v, "v", q, dims, layout);
  const int64_t Hq = q.size(-2), Hkv = k.size(-2), D = q.size(-1);
  TORCH_CHECK(k.size(-1) == D, kOp, "k must have q's head_dim ", D, ", got ", k.size(-1));
  TORCH_CHECK(v.size(-1) == D, kOp, "v must have q's head_dim ", D, ", got ", v.size(-1));
  TORCH_CHECK(v.sizes() == k.sizes(), kOp, "v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, kOp, "k's number of heads (", Hkv,
              ") must divide q's (", Hq, ")");
  TORCH_CHECK(D <= 4096, kOp, "q's head_dim must be at most 4096, got ", D);

  std::vector<Seq> seqs;
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse;
  const int64_t out_tok = Hq * D;
  if (packed) {
    TORCH_CHECK(!bias.has_value(), kOp, "bias is only supported with dense (4-D) inputs");
    TORCH_CHECK(!seqused_k.has_value(), kOp, "seqused_k is only supported with dense inputs");
    const int64_t n = cu_seqlens_q->dim() == 1 ? cu_seqlens_q->size(0) : -1;
    TORCH_CHECK(n >= 1, kOp, "cu_seqlens_q must have shape (batch + 1,), got ",
                cu_seqlens_q->sizes());
    const std::vector<int64_t> cq = int32_values(*cu_seqlens_q, "cu_seqlens_q", n);
    const std::vector<int64_t> ck = int32_values(*cu_seqlens_k, "cu_seqlens_k", n);
    check_cu_seqlens(cq, "cu_seqlens_q", q.size(0));
    check_cu_seqlens(ck, "cu_seqlens_k", k.size(0));
    lse = at::empty({Hq, q.size(0)}, q.options().dtype(at::kFloat));
    for (int64_t b = 0; b + 1 < n; ++b)
      seqs.push_back({cq[b] * q.stride(0), ck[b] * k.stride(0), ck[b] * v.stride(0),
                      cq[b] * out_tok, cq[b], 0, cq[b + 1] - cq[b], ck[b + 1] - ck[b]});
  } else {
    const int64_t B = q.size(0), Sq = q.size(1), Sk = k.size(1);
    TORCH_CHECK(k.size(0) == B, kOp, "k must have q's batch size ", B, ", got ", k.size(0));
    std::vector<int64_t> used(B, Sk);
    if (seqused_k.has_value()) {
      used = int32_values(*seqused_k, "seqused_k", B);
      for (int64_t u : used)
        TORCH_CHECK(u >= 0 && u <= Sk, kOp, "seqused_k values must lie in [0, ", Sk,
                    "] (k's seqlen), got ", u);
    }
    if (bias.has_value()) {
      const at::Tensor& bt = *bias;
      TORCH_CHECK(bt.device().is_cpu(), kOp, "bias must be a CPU tensor, got ", bt.device());
      TORCH_CHECK(bt.scalar_type() == at::kFloat, kOp, "bias must be float32, got ",
                  bt.scalar_type());
      TORCH_CHECK(bt.dim() == 4 && bt.size(0) == B && bt.size(1) == Hq && bt.size(2) == Sq &&
                      bt.size(3) == Sk,
                  kOp, "bias must have shape (batch, q heads, q seqlen, k seqlen) = (", B, ", ",
                  Hq, ", ", Sq, ", ", Sk, "), got ", bt.sizes());
    }
    lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));
    const int64_t bias_b = bias.has_value() ? bias->stride(0) : 0;
    for (int64_t b = 0; b < B; ++b)
      seqs.push_back({b * q.stride(0), b * k.stride(0), b * v.stride(0), b * Sq * out_tok,
                      b * Hq * Sq, b * bias_b, Sq, used[b]});
  }

  const Kernel& kern = kernel();
  AttnItemView base{};
  base.q = q.data_ptr();
  base.k = k.data_ptr();
  base.v = v.data_ptr();
  base.out = out.data_ptr();
  base.lse_base = lse.data_ptr<float>();
  base.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int tok_dim = packed ? 0 : 1;
  base.q_tok = q.stride(tok_dim);
  base.q_head = q.stride(tok_dim + 1);
  base.k_tok = k.stride(tok_dim);
  base.k_head = k.stride(tok_dim + 1);
  base.v_tok = v.stride(tok_dim);
  base.v_head = v.stride(tok_dim + 1);
  base.out_tok = out_tok;
  base.out_head = D;
  base.lse_head = packed ? q.size(0) : q.size(1);
  if (bias.has_value()) {
    base.b_head = bias->stride(1);
    base.b_q = bias->stride(2);
    base.b_k = bias->stride(3);
  }
  base.elt = q.element_size();
  base.G = Hq / Hkv;
  base.causal = causal;
  base.scale = static_cast<float>(scale);
  base.D = static_cast<int>(D);

  // Rows per item: large enough that converting a key/value block is amortized over many
  // rows, small enough for the per-item buffers to stay in L2 and for the threads to get several
  // items each.
  const int64_t threads = at::get_num_threads();
  int64_t total_rows = 0;
  for (const Seq& s : seqs) total_rows += s.Sq * base.G * Hkv;
  int64_t bm = D <= 128 ? 128 : 64;
  while (bm > kern.cw && total_rows / bm < 4 * threads) bm /= 2;
  // Transposed buffers: ld a multiple of 16 floats plus 16, so that walking a column of them
  // (stride ld) spreads over the L1 sets.
  base.ld = (bm + 15) / 16 * 16 + 16;

  struct Item {
    int32_t seq, hkv;
    int64_t row0, cost;
    int rows;
  };
  std::vector<Item> items;
  for (size_t b = 0; b < seqs.size(); ++b) {
    const Seq& s = seqs[b];
    const int64_t shift = causal_top_left ? 1 : s.Sk - s.Sq + 1;
    const int64_t nrows = s.Sq * base.G;
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t r0 = 0; r0 < nrows; r0 += bm) {
        const int rows = static_cast<int>(std::min(bm, nrows - r0));
        const int64_t last_q = (r0 + rows - 1) / base.G;
        const int64_t keys = causal ? std::clamp<int64_t>(last_q + shift, 0, s.Sk) : s.Sk;
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h), r0,
                         rows * (keys + D), rows});
      }
  }
  // Longest first, then handed out one at a time: the threads finish together.
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });

  const int di = dt == at::kFloat ? 0 : dt == at::kHalf ? 1 : 2;
  const int64_t nscratch = scratch_floats(base.D, base.ld, kern.bn, kern.cw);
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  at::parallel_for(0, std::min(threads, n_items), 1, [&](int64_t, int64_t) {
    float* scratch = thread_scratch(nscratch);
    for (int64_t i = next++; i < n_items; i = next++) {
      AttnItemView w = base;
      const Item& it = items[i];
      w.s = seqs[it.seq];
      w.hkv = it.hkv;
      w.row0 = it.row0;
      w.rows = it.rows;
      w.causal_shift = causal_top_left ? 1 : w.s.Sk - w.s.Sq + 1;
      kern.run[di](w, scratch);
    }
  });
  return {out, lse};
}

}  // namespace
}  // namespace lmkern::cpu

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("attention_fwd", &lmkern::cpu::attention_fwd_cpu);
}
