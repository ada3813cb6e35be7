// CPU implementation of lmkern::attention_fwd and lmkern::attention_bwd (schemas in
// csrc/registration.cpp, the math in lmkern/reference/attention.py): FlashAttention-2 style,
// fp32 throughout, never an Sq x Sk matrix in memory. This file checks the arguments (one
// resolve_problem for both ops), resolves dense / packed / seqused_k inputs into sequences,
// cuts the work into items and hands them to the threads:
//   forward: items of (sequence, kv head, block of query rows), attention_cpu_kernels.h;
//   backward: three passes over head groups (sequence, kv head), attention_cpu_bwd_kernels.h.
// Both headers are compiled once per instruction set; kernel() picks the set at run time.
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

// A (batch, token, head, dim) tensor with unit stride in dim, strides in elements. Packed inputs
// have no batch dim (batch stride 0) and number their tokens across sequences.
struct Operand {
  char* base;
  int64_t batch, tok, head, elt;

  void* at(int64_t b, int64_t t, int64_t h) const {
    return base + (b * batch + t * tok + h * head) * elt;
  }
};

// One sequence: its batch index (dense) or first packed tokens (packed), and its lengths (the
// key length already limited by seqused_k).
struct Seq {
  int64_t b, q0, k0, Sq, Sk;
};

// Everything a work item needs: (sequence, kv head, rows [row0, row0 + rows) of that head
// group's query-major (query, head-in-group) rows).
struct AttnItemView {
  Operand q, k, v, out, lse;  // lse (B, Hq, Sq) or (Hq, total): its tokens are the queries
  // The forward's stats, laid out like lse: each row's max score and log of its sum of
  // exp(score - max), from which the backward recomputes P (see attention_cpu_bwd_kernels.h).
  Operand row_max, row_log_sum;
  const float* bias;
  int64_t b_batch, b_head, b_q, b_k;  // bias strides
  int64_t G;                          // query heads per kv head
  bool causal;
  int64_t causal_shift;  // key j visible to query i iff j < i + causal_shift (causal only)
  float scale;
  int D;
  int64_t ld;  // row stride of the transposed per-item buffers

  // Per item.
  Seq s;
  int64_t hkv, row0;
  int rows;
  int nh = 1;  // kv heads hkv, hkv + 1, ... (few-row items only; every other item has one)

  int64_t query(int64_t r) const { return (row0 + r) / G; }
  int64_t head(int64_t r) const { return hkv * G + (row0 + r) % G; }
  int64_t visible(int64_t r) const {
    if (!causal) return s.Sk;
    return std::clamp<int64_t>(query(r) + causal_shift, 0, s.Sk);
  }
  // Row r's vector in a (batch, token, head, dim) tensor laid out like q.
  void* row_of(const Operand& t, int64_t r) const { return t.at(s.b, s.q0 + query(r), head(r)); }
  // Key j's vector in a tensor laid out like k.
  void* key_of(const Operand& t, int64_t j) const { return t.at(s.b, s.k0 + j, hkv); }
  const void* q_row(int64_t r) const { return row_of(q, r); }
  const void* k_row(int64_t j) const { return key_of(k, j); }
  const void* v_row(int64_t j) const { return key_of(v, j); }
  void* out_row(int64_t r) const { return row_of(out, r); }
  float* lse_at(int64_t r) const { return static_cast<float*>(row_of(lse, r)); }
  float* max_at(int64_t r) const { return static_cast<float*>(row_of(row_max, r)); }
  float* log_sum_at(int64_t r) const { return static_cast<float*>(row_of(row_log_sum, r)); }
  // bias(row r, key j0 + j) = bias_row(r, j0)[j * b_k]
  const float* bias_row(int64_t r, int64_t j0) const {
    return bias + s.b * b_batch + head(r) * b_head + query(r) * b_q + j0 * b_k;
  }

  // st[j * ld_st + (r - r0)] += bias(row r, key j0 + j) for the item's rows in [r0, r0 + lanes).
  void add_bias(float* st, int ld_st, int r0, int lanes, int64_t j0, int nb) const {
    for (int r = r0; r < std::min(r0 + lanes, rows); ++r) {
      const float* br = bias_row(r, j0);
      for (int j = 0; j < nb; ++j) st[j * ld_st + (r - r0)] += br[j * b_k];
    }
  }
};

// The backward's view of one head group (sequence, kv head): all of its G * Sq rows (row0 = 0),
// the gradients flowing in, the gradient tensors it writes and the group's rows packed by the
// first pass (attention_cpu_bwd_kernels.h).
struct AttnBwdView : AttnItemView {
  Operand dout;                // grad_out, laid out like q
  Operand dlse;                // grad_lse, laid out like lse; base null without one
  Operand dq, dk, dv;          // the gradients (dq like q, dk and dv like k)
  int64_t nrows;               // G * Sq
  int64_t dp;                  // row stride of the packed fp32 rows: D rounded up to 16
  float *qp, *dop;             // nrows x dp: q and grad_out rows in fp32, zero padded
  float *maxes, *log_sums;     // nrows: the rows' stats (row_max, row_log_sum)
  float* deltas;               // nrows: rowsum(dO * O) - dlse

  float dlse_at(int64_t r) const {
    return dlse.base ? *static_cast<const float*>(row_of(dlse, r)) : 0.f;
  }
};

}  // namespace

// The forward and backward kernels, once per instruction set (see isa_instances.h).
#define LMKERN_ISA_KERNELS "attention_cpu_kernels.h"
#define LMKERN_ISA_KERNELS_MORE "attention_cpu_bwd_kernels.h"
#include "isa_instances.h"

namespace {

// Floats of per-thread scratch for forward items of up to `ld` rows (see run_item).
int64_t scratch_floats(int D, int64_t ld, int bn, int cw) {
  return 2 * ld + 2 * D * ld + 2 * bn * D + bn * cw + 3 * ld;
}

// One instruction set's kernels, each per dtype (float, Half, BFloat16).
struct Kernel {
  int bn, cw;                                   // forward: keys per block, rows per chunk
  bool (*few_rows_item)(int rows, int64_t D);   // forward: whether an item runs run_few,
  int64_t (*few_scratch)(int64_t D);            //   with this much scratch,
  int64_t (*few_max_slots)(int64_t D);          //   rows x heads at most
  int bwd_bn;                                   // backward: keys per block
  int64_t (*bwd_scratch)(int64_t dp);           // backward: per-thread scratch floats
  void (*run[3])(const AttnItemView&, float*);  // forward item
  void (*run_few[3])(const AttnItemView&, float*);
  // The backward's passes: 1 (rows of a group), 2 (key blocks of a group), 3 (rows of a group).
  void (*bwd_pack[3])(const AttnBwdView&, int64_t, int64_t);
  void (*bwd_keys[3])(const AttnBwdView&, int64_t, int64_t, float*, float*);
  void (*bwd_dq[3])(const AttnBwdView&, int64_t, int64_t, const float*, int64_t, int64_t);
};

#define LMKERN_PER_DTYPE(f) {&f<float>, &f<Half>, &f<BFloat16>}
#define LMKERN_ATTN_KERNEL(ns)                                                          \
  Kernel{ns::BN, ns::CW, &ns::few_rows_item, &ns::few_scratch_floats,                  \
         &ns::few_max_slots, ns::kBwdBN,                                                \
         &ns::bwd_scratch_floats, LMKERN_PER_DTYPE(ns::run_item),                       \
         LMKERN_PER_DTYPE(ns::run_item_few), LMKERN_PER_DTYPE(ns::bwd_pack),            \
         LMKERN_PER_DTYPE(ns::bwd_key_blocks), LMKERN_PER_DTYPE(ns::bwd_store_dq)}

const Kernel& kernel() {
  static const Kernel k = LMKERN_CHOSEN_ISA(LMKERN_ATTN_KERNEL);
  return k;
}

int dtype_index(at::ScalarType dt) { return dt == at::kFloat ? 0 : dt == at::kHalf ? 1 : 2; }

// Per-thread scratch, kept between calls (fresh memory costs a page fault per 4 KiB page).
float* thread_scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Runs fn(i) for i in [0, n) on the intra-op threads, handing the items out one at a time in
// order (sort them longest first and the threads finish together).
template <class Fn>
void for_each_item(int64_t n, const Fn& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) fn(i);
  });
}

void check_qkv(const char* op, const at::Tensor& t, const char* name, const at::Tensor& q,
               int64_t dims, const char* layout) {
  TORCH_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == dims, op, name, " must be ", dims, "-D ", layout, ", got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, name, " must have q's dtype ",
              q.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, name,
              " must have stride 1 in its last (head) dim, got strides ", t.strides());
}

// The int32 host values of a 1-D index tensor of length n.
std::vector<int64_t> int32_values(const char* op, const at::Tensor& t, const char* name,
                                  int64_t n) {
  TORCH_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kInt, op, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, name, " must have shape (", n, ",), got ",
              t.sizes());
  const at::Tensor c = t.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  return std::vector<int64_t>(p, p + n);
}

void check_cu_seqlens(const char* op, const std::vector<int64_t>& cu, const char* name,
                      int64_t total) {
  TORCH_CHECK(cu[0] == 0, op, name, " must start at 0, got ", cu[0]);
  for (size_t b = 1; b < cu.size(); ++b)
    TORCH_CHECK(cu[b] >= cu[b - 1], op, name, " must be non-decreasing, got ", cu[b - 1],
                " then ", cu[b]);
  TORCH_CHECK(cu.back() == total, op, name, " must end at the number of packed rows ", total,
              ", got ", cu.back());
}

// A (batch, token, head, dim) view of a q/k/v-like tensor: dense (B, S, H, D) or packed
// (total, H, D).
Operand operand(const at::Tensor& t, bool packed) {
  char* p = static_cast<char*>(t.data_ptr());
  if (packed) return {p, 0, t.stride(0), t.stride(1), t.element_size()};
  return {p, t.stride(0), t.stride(1), t.stride(2), t.element_size()};
}

// The same view of an lse-like tensor: dense (B, Hq, Sq) or packed (Hq, total).
Operand lse_operand(const at::Tensor& t, bool packed) {
  char* p = static_cast<char*>(t.data_ptr());
  if (packed) return {p, 0, t.stride(1), t.stride(0), t.element_size()};
  return {p, t.stride(0), t.stride(2), t.stride(1), t.element_size()};
}

// What both ops share: the checked q/k/v/bias/cu_seqlens/seqused_k, resolved into sequences,
// and the view fields that follow from them.
struct Problem {
  bool packed;
  int64_t Hkv;
  std::vector<int64_t> lse_shape;  // (B, Hq, Sq), or (Hq, total_q) when packed
  std::vector<int64_t> stats_shape;  // (2,) + lse_shape
  std::vector<Seq> seqs;
  AttnItemView base;  // q, k, v, bias, G, causal, scale, D (out and lse left to the op)
};

Problem resolve_problem(const char* op, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& cu_seqlens_q,
                        const std::optional<at::Tensor>& cu_seqlens_k,
                        const std::optional<at::Tensor>& seqused_k, bool causal, double scale) {
  TORCH_CHECK(q.device().is_cpu(), op, "q must be a CPU tensor, got ", q.device());
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              "q must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), op,
              "cu_seqlens_q and cu_seqlens_k must be given together");
  Problem p;
  p.packed = cu_seqlens_q.has_value();
  const int64_t dims = p.packed ? 3 : 4;
  const char* layout = p.packed ? "(total, heads, head_dim)" : "(batch, seqlen, heads, head_dim)";
  check_qkv(op, q, "q", q, dims, layout);
  check_qkv(op, k, "k", q, dims, layout);
  check_qkv(op, v, "v", q, dims, layout);
  const int64_t Hq = q.size(-2), Hkv = k.size(-2), D = q.size(-1);
  TORCH_CHECK(k.size(-1) == D, op, "k must have q's head_dim ", D, ", got ", k.size(-1));
  TORCH_CHECK(v.size(-1) == D, op, "v must have q's head_dim ", D, ", got ", v.size(-1));
  TORCH_CHECK(v.sizes() == k.sizes(), op, "v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, "k's number of heads (", Hkv,
              ") must divide q's (", Hq, ")");
  TORCH_CHECK(D <= 4096, op, "q's head_dim must be at most 4096, got ", D);
  p.Hkv = Hkv;

  AttnItemView& w = p.base;
  w = AttnItemView{};
  if (p.packed) {
    TORCH_CHECK(!bias.has_value(), op, "bias is only supported with dense (4-D) inputs");
    TORCH_CHECK(!seqused_k.has_value(), op, "seqused_k is only supported with dense inputs");
    const int64_t n = cu_seqlens_q->dim() == 1 ? cu_seqlens_q->size(0) : -1;
    TORCH_CHECK(n >= 1, op, "cu_seqlens_q must have shape (batch + 1,), got ",
                cu_seqlens_q->sizes());
    const std::vector<int64_t> cq = int32_values(op, *cu_seqlens_q, "cu_seqlens_q", n);
    const std::vector<int64_t> ck = int32_values(op, *cu_seqlens_k, "cu_seqlens_k", n);
    check_cu_seqlens(op, cq, "cu_seqlens_q", q.size(0));
    check_cu_seqlens(op, ck, "cu_seqlens_k", k.size(0));
    p.lse_shape = {Hq, q.size(0)};
    for (int64_t b = 0; b + 1 < n; ++b)
      p.seqs.push_back({0, cq[b], ck[b], cq[b + 1] - cq[b], ck[b + 1] - ck[b]});
  } else {
    const int64_t B = q.size(0), Sq = q.size(1), Sk = k.size(1);
    TORCH_CHECK(k.size(0) == B, op, "k must have q's batch size ", B, ", got ", k.size(0));
    std::vector<int64_t> used(B, Sk);
    if (seqused_k.has_value()) {
      used = int32_values(op, *seqused_k, "seqused_k", B);
      for (int64_t u : used)
        TORCH_CHECK(u >= 0 && u <= Sk, op, "seqused_k values must lie in [0, ", Sk,
                    "] (k's seqlen), got ", u);
    }
    if (bias.has_value()) {
      const at::Tensor& bt = *bias;
      TORCH_CHECK(bt.device().is_cpu(), op, "bias must be a CPU tensor, got ", bt.device());
      TORCH_CHECK(bt.scalar_type() == at::kFloat, op, "bias must be float32, got ",
                  bt.scalar_type());
      TORCH_CHECK(bt.dim() == 4 && bt.size(0) == B && bt.size(1) == Hq && bt.size(2) == Sq &&
                      bt.size(3) == Sk,
                  op, "bias must have shape (batch, q heads, q seqlen, k seqlen) = (", B, ", ",
                  Hq, ", ", Sq, ", ", Sk, "), got ", bt.sizes());
      w.bias = bt.data_ptr<float>();
      w.b_batch = bt.stride(0);
      w.b_head = bt.stride(1);
      w.b_q = bt.stride(2);
      w.b_k = bt.stride(3);
    }
    p.lse_shape = {B, Hq, Sq};
    for (int64_t b = 0; b < B; ++b) p.seqs.push_back({b, 0, 0, Sq, used[b]});
  }
  p.stats_shape = p.lse_shape;
  p.stats_shape.insert(p.stats_shape.begin(), 2);
  w.q = operand(q, p.packed);
  w.k = operand(k, p.packed);
  w.v = operand(v, p.packed);
  w.G = Hq / Hkv;
  w.causal = causal;
  w.scale = static_cast<float>(scale);
  w.D = static_cast<int>(D);
  return p;
}

int64_t causal_shift(const Seq& s, bool causal_top_left) {
  return causal_top_left ? 1 : s.Sk - s.Sq + 1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    // Bounds only: every length is taken from the tensors themselves.
    int64_t /*max_seqlen_q*/, int64_t /*max_seqlen_k*/, bool causal, bool causal_top_left,
    double scale) {
  const Problem p = resolve_problem("lmkern.attention_fwd: ", q, k, v, bias, cu_seqlens_q,
                                    cu_seqlens_k, seqused_k, causal, scale);
  const Kernel& kern = kernel();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(p.lse_shape, q.options().dtype(at::kFloat));
  at::Tensor stats = at::empty(p.stats_shape, q.options().dtype(at::kFloat));
  AttnItemView base = p.base;
  base.out = operand(out, p.packed);
  base.lse = lse_operand(lse, p.packed);
  base.row_max = lse_operand(stats[0], p.packed);
  base.row_log_sum = lse_operand(stats[1], p.packed);
  const int64_t D = base.D;

  // Rows per item: large enough that converting a key/value block is amortized over many
  // rows, small enough for the per-item buffers to stay in L2 and for the threads to get several
  // items each.
  const int64_t threads = at::get_num_threads();
  int64_t total_rows = 0;
  for (const Seq& s : p.seqs) total_rows += s.Sq * base.G * p.Hkv;
  int64_t bm = D <= 128 ? 128 : 64;
  while (bm > kern.cw && total_rows / bm < 4 * threads) bm /= 2;
  // Transposed buffers: ld a multiple of 16 floats plus 16, so that walking a column of them
  // (stride ld) spreads over the L1 sets.
  base.ld = (bm + 15) / 16 * 16 + 16;

  struct Item {
    int32_t seq, hkv;
    int64_t row0, cost;
    int rows, nh;
  };
  // A sequence of few rows per kv head (decode) whose heads lie side by side within a token
  // ((B, S, H, D) K and V) gets items of several heads (run_item_few): a head's own rows lie H * D
  // apart, and one head per item would read one row per page. Enough items stay for the threads.
  const auto interleaved = [](const Operand& t) { return std::abs(t.head) < std::abs(t.tok); };
  const bool heads_side_by_side = p.Hkv > 1 && interleaved(base.k) && interleaved(base.v);
  const int64_t seqs = static_cast<int64_t>(p.seqs.size());
  const int64_t items_per_seq = seqs > 0 ? (2 * threads + seqs - 1) / seqs : 1;  // >= 1
  const int64_t heads_per_item = std::max<int64_t>(1, p.Hkv / items_per_seq);
  std::vector<Item> items;
  for (size_t b = 0; b < p.seqs.size(); ++b) {
    const Seq& s = p.seqs[b];
    const int64_t shift = causal_shift(s, causal_top_left);
    const int64_t nrows = s.Sq * base.G;
    const bool few = nrows > 0 && nrows <= bm && kern.few_rows_item(static_cast<int>(nrows), D);
    const int64_t nh = few && heads_side_by_side
                           ? std::max<int64_t>(1, std::min(heads_per_item, kern.few_max_slots(D) / nrows))
                           : 1;
    for (int64_t h = 0; h < p.Hkv; h += nh)
      for (int64_t r0 = 0; r0 < nrows; r0 += bm) {
        const int rows = static_cast<int>(std::min(bm, nrows - r0));
        const int heads = static_cast<int>(std::min(nh, p.Hkv - h));
        const int64_t last_q = (r0 + rows - 1) / base.G;
        const int64_t keys = causal ? std::clamp<int64_t>(last_q + shift, 0, s.Sk) : s.Sk;
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h), r0,
                         heads * rows * (keys + D), rows, heads});
      }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });

  const int dt = dtype_index(q.scalar_type());
  const int64_t nscratch =
      std::max(scratch_floats(base.D, base.ld, kern.bn, kern.cw), kern.few_scratch(base.D));
  for_each_item(static_cast<int64_t>(items.size()), [&](int64_t i) {
    AttnItemView w = base;
    const Item& it = items[i];
    w.s = p.seqs[it.seq];
    w.hkv = it.hkv;
    w.row0 = it.row0;
    w.rows = it.rows;
    w.nh = it.nh;
    w.causal_shift = causal_shift(w.s, causal_top_left);
    (kern.few_rows_item(it.rows, D) ? kern.run_few[dt] : kern.run[dt])(  // true when it.nh > 1
        w, thread_scratch(nscratch));
  });
  return {out, lse, stats};
}

// out and grad_out: q's shape and dtype, any strides with unit stride in the head dim.
void check_like_q(const char* op, const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.sizes() == q.sizes(), op, name, " must have q's shape ", q.sizes(), ", got ",
              t.sizes());
  check_qkv(op, t, name, q, q.dim(), "like q");
}

// stats and grad_lse: float32 in the shape attention_fwd returns them, any strides.
void check_stats(const char* op, const at::Tensor& t, const char* name,
                 const std::vector<int64_t>& shape) {
  TORCH_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, name, " must have shape ",
              at::IntArrayRef(shape), " (attention_fwd's ", name, "), got ", t.sizes());
}

struct BlockRange {
  int64_t b0, b1, cost;
};

// Blocks [0, n) cut into `parts` (<= n) consecutive ranges of about equal total cost(b), each of
// at least one block.
template <class Cost>
std::vector<BlockRange> cut_at_equal_cost(int64_t n, int64_t parts, const Cost& cost) {
  int64_t total = 0;
  for (int64_t b = 0; b < n; ++b) total += cost(b);
  std::vector<BlockRange> ranges;
  int64_t b = 0, done = 0;
  for (int64_t i = 0; i < parts; ++i) {
    const int64_t b0 = b, end = n - (parts - 1 - i);  // a block left for each later range
    int64_t c = 0;
    do {
      c += cost(b++);
    } while (b < end && (i == parts - 1 || (done + c) * parts < total * (i + 1)));
    ranges.push_back({b0, b, c});
    done += c;
  }
  return ranges;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& stats,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    int64_t /*max_seqlen_q*/, int64_t /*max_seqlen_k*/, bool causal, bool causal_top_left,
    double scale) {
  constexpr const char* op = "lmkern.attention_bwd: ";
  const Problem p = resolve_problem(op, q, k, v, bias, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                    causal, scale);
  check_like_q(op, out, "out", q);
  check_like_q(op, grad_out, "grad_out", q);
  check_stats(op, stats, "stats", p.stats_shape);
  if (grad_lse.has_value()) check_stats(op, *grad_lse, "grad_lse", p.lse_shape);

  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {  // no queries, no keys or no head dims: no products
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  // Keys past seqused_k are never read: their gradient is 0.
  for (const Seq& s : p.seqs)
    if (!p.packed && s.Sk < k.size(1)) {
      dk[s.b].narrow(0, s.Sk, k.size(1) - s.Sk).zero_();
      dv[s.b].narrow(0, s.Sk, k.size(1) - s.Sk).zero_();
    }

  const Kernel& kern = kernel();
  const int di = dtype_index(q.scalar_type());
  AttnBwdView base{};
  static_cast<AttnItemView&>(base) = p.base;
  base.out = operand(out, p.packed);
  base.row_max = lse_operand(stats[0], p.packed);
  base.row_log_sum = lse_operand(stats[1], p.packed);
  base.dout = operand(grad_out, p.packed);
  if (grad_lse.has_value()) base.dlse = lse_operand(*grad_lse, p.packed);
  base.dq = operand(dq, p.packed);
  base.dk = operand(dk, p.packed);
  base.dv = operand(dv, p.packed);
  base.dp = (base.D + 15) / 16 * 16;
  const int64_t dp = base.dp;
  const int64_t threads = at::get_num_threads();

  // Head groups (sequence, kv head), each split into items over its key blocks: one split per
  // group when there are enough groups to share out, else more, each accumulating dq in its own
  // fp32 buffer (at most `threads` of them per group: the memory of per-thread accumulators).
  // Causal blocks near the end are seen by fewer rows: splits are cut at equal cost.
  struct Group {
    AttnBwdView w;
    int64_t row0, acc0, splits;
  };
  struct KeyItem {
    int64_t group, split, kb0, kb1, cost;
  };
  std::vector<Group> groups;
  int64_t total_rows = 0;
  for (const Seq& s : p.seqs)
    for (int64_t h = 0; h < p.Hkv; ++h) {
      AttnBwdView w = base;
      w.s = s;
      w.hkv = h;
      w.row0 = 0;
      w.nrows = s.Sq * w.G;
      w.causal_shift = causal_shift(s, causal_top_left);
      groups.push_back({w, total_rows, 0, 0});
      total_rows += w.nrows;
    }
  const int64_t ngroups = static_cast<int64_t>(groups.size());
  const int64_t want_splits =
      std::clamp<int64_t>((4 * threads + ngroups - 1) / std::max<int64_t>(ngroups, 1), 1,
                          threads);
  std::vector<KeyItem> items;
  int64_t acc_floats = 0;
  const int64_t bn = kern.bwd_bn;
  for (int64_t g = 0; g < ngroups; ++g) {
    Group& gr = groups[g];
    const AttnBwdView& w = gr.w;
    const int64_t nkb = (w.s.Sk + bn - 1) / bn;
    // Rows that see key block kb: from the first query whose causal limit passes its first key.
    auto block_cost = [&](int64_t kb) {
      const int64_t first = causal ? std::clamp<int64_t>(kb * bn - w.causal_shift + 1, 0, w.s.Sq)
                                   : 0;
      return (w.s.Sq - first) * w.G + 1;
    };
    const std::vector<BlockRange> ranges =
        cut_at_equal_cost(nkb, std::min(want_splits, nkb), block_cost);
    gr.splits = static_cast<int64_t>(ranges.size());
    for (int64_t sp = 0; sp < gr.splits; ++sp)
      items.push_back({g, sp, ranges[sp].b0, ranges[sp].b1, ranges[sp].cost});
    gr.acc0 = acc_floats;
    acc_floats += gr.splits * w.nrows * dp;
  }
  // fp32 buffers shared by the passes: packed rows, their stats and delta, dq accumulators.
  const at::TensorOptions f32 = q.options().dtype(at::kFloat);
  at::Tensor packed_rows = at::empty({2 * total_rows * dp}, f32);
  at::Tensor row_stats = at::empty({3 * total_rows}, f32);
  at::Tensor dq_acc = at::empty({acc_floats}, f32);
  for (Group& gr : groups) {
    gr.w.qp = packed_rows.data_ptr<float>() + gr.row0 * dp;
    gr.w.dop = gr.w.qp + total_rows * dp;
    gr.w.maxes = row_stats.data_ptr<float>() + gr.row0;
    gr.w.log_sums = gr.w.maxes + total_rows;
    gr.w.deltas = gr.w.log_sums + total_rows;
  }

  // Passes 1 and 3 go over spans of rows of each group.
  constexpr int64_t kSpan = 256;
  std::vector<std::pair<int64_t, int64_t>> spans;  // (group, first row)
  for (int64_t g = 0; g < ngroups; ++g)
    for (int64_t r0 = 0; r0 < groups[g].w.nrows; r0 += kSpan) spans.push_back({g, r0});
  const auto for_each_span = [&](const auto& fn) {
    for_each_item(static_cast<int64_t>(spans.size()), [&](int64_t i) {
      const Group& gr = groups[spans[i].first];
      fn(gr, spans[i].second, std::min(spans[i].second + kSpan, gr.w.nrows));
    });
  };

  for_each_span([&](const Group& gr, int64_t r0, int64_t r1) { kern.bwd_pack[di](gr.w, r0, r1); });

  std::stable_sort(items.begin(), items.end(),
                   [](const KeyItem& a, const KeyItem& b) { return a.cost > b.cost; });
  const int64_t nscratch = kern.bwd_scratch(dp);
  float* acc_base = dq_acc.data_ptr<float>();
  for_each_item(static_cast<int64_t>(items.size()), [&](int64_t i) {
    const KeyItem& it = items[i];
    const Group& gr = groups[it.group];
    float* acc = acc_base + gr.acc0 + it.split * gr.w.nrows * dp;
    kern.bwd_keys[di](gr.w, it.kb0, it.kb1, acc, thread_scratch(nscratch));
  });

  for_each_span([&](const Group& gr, int64_t r0, int64_t r1) {
    kern.bwd_dq[di](gr.w, r0, r1, acc_base + gr.acc0, gr.splits, gr.w.nrows * dp);
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace lmkern::cpu

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("attention_fwd", &lmkern::cpu::attention_fwd_cpu);
  m.impl("attention_bwd", &lmkern::cpu::attention_bwd_cpu);
}
