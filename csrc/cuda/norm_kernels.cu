// Host side of the LayerNorm/RMSNorm CUDA kernels (csrc/include/lmkern/norm.cuh): dtype dispatch,
// the choice of kernel, block shape and grid, and the launches. Framework-free (no torch): CI
// compiles this file alone with nvcc for sm_80 and sm_90a.
#include <algorithm>
#include <cstdint>

#include "lmkern/launch_util.h"
#include "lmkern/norm.cuh"
#include "lmkern/norm_cuda.h"

namespace lmkern {
namespace {

using namespace launch;

using namespace norm_kernels;

// Block size aimed at by the register-cached kernels: groups of tpr threads, one row per group,
// are packed into blocks of about this many threads so that small rows do not make tiny blocks.
constexpr int kFwdBlockThreads = 256;
// Backward blocks hold one fp32 dweight/dbias accumulator per row group in shared memory; bigger
// blocks keep more rows in flight per block (and so fewer blocks, fewer partials to add).
constexpr int kBwdBlockThreads = 512;
// Grid caps. A grid-stride loop with at most this many blocks per SM never limits occupancy
// (no GPU keeps more than 32 blocks resident per SM) while bounding the grid for huge M.
constexpr int64_t kMaxBlocksPerSm = 32;
// Backward partial rows cost n_acc * N * 8 bytes each (written, then read by finalize): beyond
// one block per SM, a block must process at least this many rows.
constexpr int64_t kBwdMinRowsPerBlock = 16;
// Blocks per SM aimed at by norm_bwd_apply_kernel (256 threads, few registers).
constexpr int64_t kApplyBlocksPerSm = 8;
// Resident blocks per SM of the looped kernels (one row each): few enough that the rows they
// re-read stay in L2 (2 x 132 rows of 128 KiB = 33 MiB of H100's 50 MiB), enough to overlap one
// block's reductions with another's loads.
constexpr int64_t kLoopBlocksPerSm = 2;
// norm_bwd_looped_kernel indexes columns with int.
constexpr int64_t kMaxLoopedBwdN = int64_t(1) << 24;
// Static shared memory of the rows kernels (red[2][32]) plus slack, subtracted from the opt-in
// limit when sizing the dynamic accumulators.
constexpr size_t kStaticSmemReserve = 1024;
constexpr size_t kDefaultSmemLimit = 48 * 1024;  // above this, a kernel must opt in

// A row stride in elements allows 16-byte accesses when every row start stays 16-byte aligned
// (a single row never moves).
bool stride_ok(int64_t stride, int64_t rows, int vec) { return rows <= 1 || stride % vec == 0; }

// ------------------------------------------------------------------------------------------------
// Block shape of the register-cached kernels for rows of nvec vectors (nv == 0: none fits).
struct RowShape {
  int nv = 0;       // vectors per thread (template parameter NV)
  int tpr = 0;      // threads per row
  int threads = 0;  // block size, a multiple of tpr
};

RowShape row_shape(int64_t nvec, int max_nv, int max_tpr, int block_threads) {
  RowShape s;
  if (nvec <= 32 * 4) {
    // At most a warp per row: a power-of-two lane group, shuffle-only reductions.
    s.nv = nvec <= 32 ? 1 : nvec <= 64 ? 2 : 4;
    const int64_t per_row = std::max<int64_t>(1, ceil_div(nvec, s.nv));
    s.tpr = 1;
    while (s.tpr < per_row) s.tpr *= 2;
    s.threads = block_threads;
    return s;
  }
  // Whole warps per row; more vectors per thread as rows grow (more loads in flight per thread),
  // up to max_nv vectors and max_tpr threads per row.
  s.nv = nvec <= 512 ? 2 : nvec <= 2048 ? 4 : 8;
  s.nv = std::min(s.nv, max_nv);
  const int64_t tpr = ceil_div(ceil_div(nvec, s.nv), 32) * 32;
  if (tpr > max_tpr) return RowShape{};
  s.tpr = int(tpr);
  s.threads = std::max(1, block_threads / s.tpr) * s.tpr;
  return s;
}

// Calls f(Tag<T>, Tag<W>) for the supported (x dtype, weight dtype) pairs: W is T or float.
template <typename F>
cudaError_t dispatch_dtypes(DType x, DType w, F&& f) {
  switch (x) {
    case DType::Float32:
      if (w == DType::Float32) return f(Tag<float>{}, Tag<float>{});
      break;
    case DType::Float16:
      if (w == DType::Float16) return f(Tag<__half>{}, Tag<__half>{});
      if (w == DType::Float32) return f(Tag<__half>{}, Tag<float>{});
      break;
    case DType::BFloat16:
      if (w == DType::BFloat16) return f(Tag<__nv_bfloat16>{}, Tag<__nv_bfloat16>{});
      if (w == DType::Float32) return f(Tag<__nv_bfloat16>{}, Tag<float>{});
      break;
  }
  return cudaErrorInvalidValue;
}

// ------------------------------------------------------------------------------------------------
// Forward

template <typename T>
bool fwd_vectorizable(const NormFwdParams& p) {
  constexpr int V = 16 / sizeof(T);
  return p.N % V == 0 && aligned16(p.x) && stride_ok(p.x_row_stride, p.M, V) &&
         aligned16(p.out) && aligned16(p.weight) && aligned16(p.bias) &&
         (p.residual == nullptr || (aligned16(p.residual) && aligned16(p.residual_out) &&
                                    stride_ok(p.residual_row_stride, p.M, V)));
}

template <typename T, typename W, bool IS_RMS, int VEC>
cudaError_t launch_fwd(const NormFwdParams& p, int num_sms, cudaStream_t stream) {
  const int64_t nvec = ceil_div(p.N, VEC);
  const int64_t max_grid = int64_t(num_sms) * kMaxBlocksPerSm;
  const RowShape s = row_shape(nvec, 4, kFwdMaxThreads, kFwdBlockThreads);
  if (s.nv > 0) {
    const int rows_per_block = s.threads / s.tpr;
    const unsigned grid = unsigned(std::min(ceil_div(p.M, rows_per_block), max_grid));
    switch (s.nv) {
      case 1: norm_fwd_rows_kernel<T, W, IS_RMS, VEC, 1><<<grid, s.threads, 0, stream>>>(p, s.tpr); break;
      case 2: norm_fwd_rows_kernel<T, W, IS_RMS, VEC, 2><<<grid, s.threads, 0, stream>>>(p, s.tpr); break;
      case 4: norm_fwd_rows_kernel<T, W, IS_RMS, VEC, 4><<<grid, s.threads, 0, stream>>>(p, s.tpr); break;
      default: return cudaErrorInvalidConfiguration;
    }
  } else {
    const unsigned grid = unsigned(std::min(p.M, int64_t(num_sms) * kLoopBlocksPerSm));
    norm_fwd_looped_kernel<T, W, IS_RMS, VEC><<<grid, kLoopThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------------
// Backward

template <typename T>
bool bwd_vectorizable(const NormBwdParams& p) {
  constexpr int V = 16 / sizeof(T);
  return p.N % V == 0 && aligned16(p.dy) && stride_ok(p.dy_row_stride, p.M, V) &&
         aligned16(p.x) && stride_ok(p.x_row_stride, p.M, V) && aligned16(p.dx) &&
         aligned16(p.weight) &&
         (p.dresidual == nullptr ||
          (aligned16(p.dresidual) && stride_ok(p.dresidual_row_stride, p.M, V)));
}

// Everything the backward launch decides, computed identically for the workspace query and the
// launch. Workspace layout: partials [n_acc][num_partials][N] fp32 (dweight first, then dbias),
// then (two-pass path only) row_sums [M] float2 at row_sums_offset.
enum class BwdPath { Rows, Looped, TwoPass };

struct BwdPlan {
  BwdPath path = BwdPath::TwoPass;
  RowShape shape;            // Rows
  size_t smem = 0;           // Rows, Looped: dynamic shared memory (the accumulators)
  int64_t grid = 0;          // Rows, Looped: gridDim.x; TwoPass: gridDim.y of the apply kernel
  int64_t grid_cols = 0;     // TwoPass: gridDim.x of the apply kernel
  int n_acc = 0;             // accumulated arrays: dweight and/or dbias
  int64_t num_partials = 0;  // partial rows per accumulated array
  size_t row_sums_offset = 0;
  size_t bytes = 0;
};

using BwdRowsKernel = void (*)(NormBwdParams, int, float*);
using BwdLoopedKernel = void (*)(NormBwdParams, float*);

template <typename T, typename W, bool IS_RMS, int VEC>
BwdRowsKernel bwd_rows_kernel(int nv) {
  switch (nv) {
    case 1: return norm_bwd_rows_kernel<T, W, IS_RMS, VEC, 1>;
    case 2: return norm_bwd_rows_kernel<T, W, IS_RMS, VEC, 2>;
    case 4: return norm_bwd_rows_kernel<T, W, IS_RMS, VEC, 4>;
    default: return nullptr;
  }
}

// Resident blocks per SM of `kernel` with `threads` threads and `smem` bytes of dynamic shared
// memory (0: it cannot run), after opting in to more than the default shared memory if needed.
// The opt-in is always to smem_limit, the same value for every call on a device: opting in to
// `smem` itself would let a concurrent call (another host thread) with a smaller N lower the
// limit between this call's opt-in and its launch, which would then fail.
template <typename Kernel>
cudaError_t blocks_per_sm(Kernel kernel, int threads, size_t smem, size_t smem_limit, int* per_sm) {
  if (smem > kDefaultSmemLimit) {
    LMKERN_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(smem_limit)));
  }
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, threads, smem);
}

template <typename T, typename W, bool IS_RMS, int VEC>
cudaError_t plan_bwd(const NormBwdParams& p, int num_sms, BwdPlan& plan) {
  plan = BwdPlan{};
  plan.n_acc = int(p.dweight != nullptr) + int(!IS_RMS && p.dbias != nullptr);
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  const int64_t nvec = ceil_div(p.N, VEC);
  int device = 0, smem_optin = 0;
  LMKERN_TRY(cudaGetDevice(&device));
  LMKERN_TRY(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t smem_limit =
      size_t(smem_optin) > kStaticSmemReserve ? size_t(smem_optin) - kStaticSmemReserve : 0;
  const size_t acc_row_bytes = size_t(plan.n_acc) * size_t(p.N) * sizeof(float);
  // Beyond one block per SM, a block must process kBwdMinRowsPerBlock rows: each block adds
  // n_acc * N * 8 bytes of partials traffic (written here, read by finalize).
  const int64_t partial_cap = std::max<int64_t>(num_sms, ceil_div(p.M, kBwdMinRowsPerBlock));

  // 1. Rows cached in registers.
  RowShape s = row_shape(nvec, 4, kBwdMaxThreads, kBwdBlockThreads);
  if (s.nv > 0) {
    int groups = s.threads / s.tpr;
    while (groups > 1 && size_t(groups) * acc_row_bytes > smem_limit) groups /= 2;
    s.threads = groups * s.tpr;
    const size_t smem = size_t(groups) * acc_row_bytes;
    if (smem <= smem_limit) {
      const BwdRowsKernel kernel = bwd_rows_kernel<T, W, IS_RMS, VEC>(s.nv);
      if (kernel == nullptr) return cudaErrorInvalidConfiguration;
      int per_sm = 0;
      LMKERN_TRY(blocks_per_sm(kernel, s.threads, smem, smem_limit, &per_sm));
      if (per_sm > 0) {
        plan.path = BwdPath::Rows;
        plan.shape = s;
        plan.smem = smem;
        plan.grid = std::min({ceil_div(p.M, groups), int64_t(num_sms) * per_sm, partial_cap});
        plan.num_partials = plan.grid;
        plan.bytes = size_t(plan.n_acc) * size_t(plan.num_partials) * size_t(p.N) * sizeof(float);
        return cudaSuccess;
      }
    }
  }

  // 2. One row per block, read twice (from L2 the second time), accumulators in shared memory.
  if (acc_row_bytes <= smem_limit && p.N <= kMaxLoopedBwdN) {
    const BwdLoopedKernel kernel = norm_bwd_looped_kernel<T, W, IS_RMS, VEC>;
    int per_sm = 0;
    LMKERN_TRY(blocks_per_sm(kernel, kLoopThreads, acc_row_bytes, smem_limit, &per_sm));
    if (per_sm > 0) {
      plan.path = BwdPath::Looped;
      plan.smem = acc_row_bytes;
      plan.grid = std::min({p.M, int64_t(num_sms) * std::min<int64_t>(per_sm, kLoopBlocksPerSm),
                            partial_cap});
      plan.num_partials = plan.grid;
      plan.bytes = size_t(plan.n_acc) * size_t(plan.num_partials) * size_t(p.N) * sizeof(float);
      return cudaSuccess;
    }
  }

  // 3. Any N: row sums, then dx and register partials over column tiles.
  plan.path = BwdPath::TwoPass;
  plan.grid_cols = ceil_div(nvec, kApplyThreads);
  const int64_t max_row_blocks = std::min<int64_t>(ceil_div(p.M, kApplyRows), 65535);
  plan.grid = std::max<int64_t>(
      1, std::min(ceil_div(int64_t(num_sms) * kApplyBlocksPerSm, plan.grid_cols), max_row_blocks));
  plan.num_partials = plan.grid;
  const size_t partial_bytes =
      size_t(plan.n_acc) * size_t(plan.num_partials) * size_t(p.N) * sizeof(float);
  plan.row_sums_offset = round_up(partial_bytes, 16);
  plan.bytes = plan.row_sums_offset + size_t(p.M) * sizeof(float2);
  return cudaSuccess;
}

template <typename T, typename W, bool IS_RMS, int VEC>
cudaError_t launch_bwd(const NormBwdParams& p, const BwdPlan& plan, void* workspace,
                       int num_sms, cudaStream_t stream) {
  float* partials = static_cast<float*>(workspace);
  switch (plan.path) {
    case BwdPath::Rows: {
      const BwdRowsKernel kernel = bwd_rows_kernel<T, W, IS_RMS, VEC>(plan.shape.nv);
      kernel<<<unsigned(plan.grid), plan.shape.threads, plan.smem, stream>>>(p, plan.shape.tpr,
                                                                              partials);
      LMKERN_TRY(cudaGetLastError());
      break;
    }
    case BwdPath::Looped:
      norm_bwd_looped_kernel<T, W, IS_RMS, VEC>
          <<<unsigned(plan.grid), kLoopThreads, plan.smem, stream>>>(p, partials);
      LMKERN_TRY(cudaGetLastError());
      break;
    case BwdPath::TwoPass: {
      float2* row_sums =
          reinterpret_cast<float2*>(static_cast<char*>(workspace) + plan.row_sums_offset);
      const unsigned grid = unsigned(std::min(p.M, int64_t(num_sms) * kMaxBlocksPerSm));
      norm_bwd_row_sums_kernel<T, W, IS_RMS, VEC><<<grid, kLoopThreads, 0, stream>>>(p, row_sums);
      LMKERN_TRY(cudaGetLastError());
      const dim3 apply_grid(unsigned(plan.grid_cols), unsigned(plan.grid));
      norm_bwd_apply_kernel<T, W, IS_RMS, VEC>
          <<<apply_grid, kApplyThreads, 0, stream>>>(p, row_sums, partials);
      LMKERN_TRY(cudaGetLastError());
      break;
    }
  }
  if (plan.n_acc > 0) {
    W* dweight = static_cast<W*>(p.dweight);
    W* dbias = IS_RMS ? nullptr : static_cast<W*>(p.dbias);
    W* out0 = dweight != nullptr ? dweight : dbias;
    W* out1 = dweight != nullptr ? dbias : nullptr;
    const dim3 grid(unsigned(ceil_div(p.N, 32)), unsigned(plan.n_acc));
    norm_bwd_finalize_kernel<W><<<grid, dim3(32, kFinalizeLanes), 0, stream>>>(
        partials, plan.num_partials, p.N, out0, out1);
    LMKERN_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

// The backward for one instantiation: with bytes_out, only reports the workspace size; else
// checks the workspace and launches.
template <typename T, typename W, bool IS_RMS, int VEC>
cudaError_t bwd_impl(const NormBwdParams& p, int num_sms, size_t* bytes_out, void* workspace,
                     size_t workspace_bytes, cudaStream_t stream) {
  BwdPlan plan;
  LMKERN_TRY((plan_bwd<T, W, IS_RMS, VEC>(p, num_sms, plan)));
  if (bytes_out != nullptr) {
    *bytes_out = plan.bytes;
    return cudaSuccess;
  }
  if (workspace_bytes < plan.bytes || (plan.bytes > 0 && (workspace == nullptr || !aligned16(workspace)))) {
    return cudaErrorInvalidValue;
  }
  return launch_bwd<T, W, IS_RMS, VEC>(p, plan, workspace, num_sms, stream);
}

cudaError_t bwd_dispatch(const NormBwdParams& p, int num_sms, size_t* bytes_out, void* workspace,
                         size_t workspace_bytes, cudaStream_t stream) {
  return dispatch_dtypes(p.x_dtype, p.w_dtype, [&](auto xt, auto wt) {
    using T = typename decltype(xt)::type;
    using W = typename decltype(wt)::type;
    constexpr int V = 16 / sizeof(T);
    const bool vec = bwd_vectorizable<T>(p);
    if (p.is_rms) {
      return vec ? bwd_impl<T, W, true, V>(p, num_sms, bytes_out, workspace, workspace_bytes, stream)
                 : bwd_impl<T, W, true, 1>(p, num_sms, bytes_out, workspace, workspace_bytes, stream);
    }
    return vec ? bwd_impl<T, W, false, V>(p, num_sms, bytes_out, workspace, workspace_bytes, stream)
               : bwd_impl<T, W, false, 1>(p, num_sms, bytes_out, workspace, workspace_bytes, stream);
  });
}

}  // namespace

cudaError_t norm_fwd_cuda(const NormFwdParams& p, int num_sms, cudaStream_t stream) {
  if (p.M < 0 || p.N < 0 || num_sms <= 0) return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;
  return dispatch_dtypes(p.x_dtype, p.w_dtype, [&](auto xt, auto wt) {
    using T = typename decltype(xt)::type;
    using W = typename decltype(wt)::type;
    constexpr int V = 16 / sizeof(T);
    const bool vec = fwd_vectorizable<T>(p);
    if (p.is_rms) {
      return vec ? launch_fwd<T, W, true, V>(p, num_sms, stream)
                 : launch_fwd<T, W, true, 1>(p, num_sms, stream);
    }
    return vec ? launch_fwd<T, W, false, V>(p, num_sms, stream)
               : launch_fwd<T, W, false, 1>(p, num_sms, stream);
  });
}

cudaError_t norm_bwd_cuda_workspace_bytes(const NormBwdParams& p, int num_sms, size_t* bytes) {
  if (bytes == nullptr || p.M < 0 || p.N < 0 || num_sms <= 0) return cudaErrorInvalidValue;
  *bytes = 0;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  return bwd_dispatch(p, num_sms, bytes, nullptr, 0, nullptr);
}

cudaError_t norm_bwd_cuda(const NormBwdParams& p, void* workspace, size_t workspace_bytes,
                          int num_sms, cudaStream_t stream) {
  if (p.M < 0 || p.N < 0 || num_sms <= 0) return cudaErrorInvalidValue;
  if (p.N == 0) return cudaSuccess;  // every output is empty
  if (p.M == 0) {
    // Sums over no rows: zero (all-zero bits are +0 in every float format).
    const size_t bytes = size_t(p.N) * dtype_size(p.w_dtype);
    if (p.dweight != nullptr) LMKERN_TRY(cudaMemsetAsync(p.dweight, 0, bytes, stream));
    if (!p.is_rms && p.dbias != nullptr) LMKERN_TRY(cudaMemsetAsync(p.dbias, 0, bytes, stream));
    return cudaSuccess;
  }
  return bwd_dispatch(p, num_sms, nullptr, workspace, workspace_bytes, stream);
}

}  // namespace lmkern
