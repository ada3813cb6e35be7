// CPU implementation of lmkern::{layer,rms}_norm_{fwd,bwd} (schemas in csrc/registration.cpp).
//
// norm_glue.cpp checks the arguments and allocates the outputs; this file converts the affine
// parameters to fp32, picks the instruction set once at run time and runs the row kernels of
// norm_cpu_kernels.h, compiled here once per instruction set (AVX-512, AVX2, portable).
#include "simd.h"  // first: see the note on immintrin.h there

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "norm_glue.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lmkern::cpu {
namespace {

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with the C++ type of d.
template <class F>
void dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::Float32: return f(Tag<float>{});
    case DType::Float16: return f(Tag<Half>{});
    case DType::BFloat16: return f(Tag<BFloat16>{});
  }
}

// Backward's fixed partition of the rows: `count` blocks of `rows` rows (the last may be short).
struct BwdBlocks {
  int64_t rows, count;
};

// Depends on M and N only, never on the thread count, so dweight/dbias are bitwise reproducible.
// 32 rows per block (summed in order), the blocks summed pairwise: the error stays small however
// large M. Up to the memory cap: each partial buffer holds at most max(2^23, 8 N) floats (32 MiB
// for N <= 2^20); past that, blocks grow beyond 32 rows.
BwdBlocks bwd_blocks(int64_t M, int64_t N) {
  const int64_t max_blocks = std::max<int64_t>(8, (int64_t{1} << 23) / std::max<int64_t>(N, 1));
  const int64_t rows = std::max<int64_t>(32, (M + max_blocks - 1) / max_blocks);
  return {rows, (M + rows - 1) / rows};
}

}  // namespace

// The row kernels, once per instruction set (see isa_instances.h).
#define LMKERN_ISA_KERNELS "norm_cpu_kernels.h"
#include "isa_instances.h"

namespace {

struct Kernels {
  const char* isa;
  decltype(&portable::norm_fwd) fwd;
  decltype(&portable::norm_bwd) bwd;
};

std::string lower_env(const char* name) {
  const char* v = std::getenv(name);
  std::string s = v ? v : "";
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

// The best instruction set this CPU (and OS) supports. LMKERN_CPU_ISA (avx512, avx2, portable),
// else torch's own ATEN_CPU_CAPABILITY (avx512, avx2, default), can cap it: to test every path,
// and to follow a user who keeps torch off AVX-512.
Kernels pick_kernels() {
  std::string cap = lower_env("LMKERN_CPU_ISA");
  if (cap.empty()) cap = lower_env("ATEN_CPU_CAPABILITY");
  const bool allow_avx2 = cap != "portable" && cap != "default";
  const bool allow_avx512 = allow_avx2 && cap != "avx2";
#if LMKERN_X86_SIMD
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                        __builtin_cpu_supports("f16c");
#ifdef LMKERN_EMULATE_AVX512  // test builds: SIMDe stands in for the AVX-512 instructions
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("bmi2");
#else
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2");
#endif
  if (has_avx512 && allow_avx512) return {"avx512", &avx512::norm_fwd, &avx512::norm_bwd};
  if (has_avx2 && allow_avx2) return {"avx2", &avx2::norm_fwd, &avx2::norm_bwd};
#else
  (void)allow_avx512;
#endif
  return {"portable", &portable::norm_fwd, &portable::norm_bwd};
}

const Kernels& kernels() {
  static const Kernels k = pick_kernels();
  return k;
}

// weight + weight_offset (or bias, offset 0) as the fp32 vector the kernels read: the caller's
// own data when it already is that, else converted into buf. Null when the parameter is absent.
const float* affine_fp32(const void* src, DType dtype, int64_t N, float offset,
                         std::vector<float>& buf) {
  if (!src) return nullptr;
  if (dtype == DType::Float32 && offset == 0.f) return static_cast<const float*>(src);
  buf.resize(N);
  dispatch_dtype(dtype, [&](auto tag) {
    using W = typename decltype(tag)::type;
    const W* s = static_cast<const W*>(src);
    for (int64_t j = 0; j < N; ++j) buf[j] = static_cast<float>(s[j]) + offset;
  });
  return buf.data();
}

// Writing fresh memory costs a page fault per 4 KiB page: for a 64 MiB output that is 16K faults,
// which take longer than the normalization itself. Advising transparent huge pages for the output
// (before its first write) cuts them 512-fold, as torch's own allocator does under
// THP_MEM_ALLOC_ENABLE=1. Only whole 2 MiB extents inside the tensor's own buffer are advised; it
// is a hint (errors ignored, no effect where THP is off). LMKERN_CPU_THP=0 turns it off.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = lower_env("LMKERN_CPU_THP") != "0";
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (!enabled || t.nbytes() < 2 * kHuge) return;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (start + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

void run_fwd(const NormFwdParams& p) {
  std::vector<float> wbuf, bbuf;
  const float* w = affine_fp32(p.weight, p.w_dtype, p.N, p.weight_offset, wbuf);
  const float* b = affine_fp32(p.bias, p.w_dtype, p.N, 0.f, bbuf);
  kernels().fwd(p, w, b);
}

// The backward's fp32 partials, kept by the calling thread between calls: fresh memory would cost
// a page fault per 4 KiB page on every call (~1 ms for the 2 MiB of a 4096 x 4096 backward).
// A buffer over 64 MiB is freed after its call rather than kept.
class Scratch {
 public:
  explicit Scratch(size_t n) {
    if (n > cache().size) cache() = {std::unique_ptr<float[]>(new float[n]), n};
    data_ = cache().data.get();
  }
  ~Scratch() {
    if (cache().size > kKeepFloats) cache() = {};
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() const { return data_; }

 private:
  static constexpr size_t kKeepFloats = size_t{16} << 20;  // 64 MiB
  struct Buffer {
    std::unique_ptr<float[]> data;
    size_t size = 0;
  };
  static Buffer& cache() {
    thread_local Buffer b;
    return b;
  }
  float* data_;
};

void run_bwd(const NormBwdParams& p) {
  std::vector<float> wbuf;
  const float* w = affine_fp32(p.weight, p.w_dtype, p.N, p.weight_offset, wbuf);
  const BwdBlocks blk = bwd_blocks(p.M, p.N);
  const size_t part_size = static_cast<size_t>(blk.count * p.N);
  Scratch scratch((p.dweight ? part_size : 0) + (p.dbias ? part_size : 0));
  float* dw_part = p.dweight ? scratch.data() : nullptr;
  float* db_part = p.dbias ? scratch.data() + (p.dweight ? part_size : 0) : nullptr;
  kernels().bwd(p, w, blk, dw_part, db_part);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, double eps,
    double weight_offset) {
  NormFwdCall c = prepare_norm_fwd("layer_norm_fwd", input, weight, bias, residual, eps,
                                   weight_offset, /*is_rms=*/false);
  advise_huge_pages(c.out);
  advise_huge_pages(c.residual_out);
  run_fwd(c.params);
  return {c.out, c.residual_out, c.mean, c.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rms_norm_fwd_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& residual, double eps, double weight_offset) {
  NormFwdCall c = prepare_norm_fwd("rms_norm_fwd", input, weight, std::nullopt, residual, eps,
                                   weight_offset, /*is_rms=*/true);
  advise_huge_pages(c.out);
  advise_huge_pages(c.residual_out);
  run_fwd(c.params);
  return {c.out, c.residual_out, c.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual,
    const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd,
    double weight_offset) {
  NormBwdCall c = prepare_norm_bwd("layer_norm_bwd", grad_out, grad_residual, input, weight, bias,
                                   mean, rstd, weight_offset, /*is_rms=*/false);
  advise_huge_pages(c.dx);
  run_bwd(c.params);
  return {c.dx, c.dweight, c.dbias};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual,
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
    double weight_offset) {
  NormBwdCall c = prepare_norm_bwd("rms_norm_bwd", grad_out, grad_residual, input, weight,
                                   std::nullopt, std::nullopt, rstd, weight_offset,
                                   /*is_rms=*/true);
  advise_huge_pages(c.dx);
  run_bwd(c.params);
  return {c.dx, c.dweight};
}

}  // namespace

// The instruction set the kernels run with ("avx512", "avx2" or "portable"), for diagnostics.
const char* isa_name() { return kernels().isa; }

}  // namespace lmkern::cpu

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("layer_norm_fwd", &lmkern::cpu::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &lmkern::cpu::layer_norm_bwd_cpu);
  m.impl("rms_norm_fwd", &lmkern::cpu::rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd", &lmkern::cpu::rms_norm_bwd_cpu);
}
