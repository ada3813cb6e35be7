// Host side of the sampling CUDA kernels (csrc/include/lmkern/sampling.cuh): argument checks,
// dtype dispatch, the choice between one block per row and a row split over several blocks, the
// workspace layout, and the launches. Framework-free (no torch): CI compiles this file alone with
// nvcc for sm_80 and sm_90a.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "lmkern/launch_util.h"
#include "lmkern/sampling.cuh"
#include "lmkern/sampling_cuda.h"

namespace lmkern {
namespace {

using namespace launch;

using namespace sampling_kernels;

// Split a row over several blocks only when the rows alone cannot fill the GPU (2 * B <= SMs) and
// a row is long enough that streaming it with one block dominates (the extra cost is a few per-row
// barriers per pass, each a round trip through L2).
constexpr int64_t kSplitMinV = 65536;
// Elements per block at least: below this a block's share is too small to hide the barriers.
constexpr int64_t kSplitMinChunk = 8192;
constexpr int64_t kMaxSplits = 32;
// Chunk starts are multiples of this many elements, so every chunk of a row starts at the same
// alignment relative to 16 bytes as the row does (most of each chunk uses 16-byte loads).
constexpr int64_t kChunkAlign = 16;
// Rows are strided over at most this many blocks (gridDim.x limit).
constexpr int64_t kMaxGrid = INT32_MAX;

// Checks shared by both ops: sizes the kernels index with int, element-aligned logits.
bool logits_ok(const void* logits, DType dtype, int64_t B, int64_t V) {
  if (B < 0 || V < 0 || V > INT32_MAX) return false;
  if (B == 0 || V == 0) return true;
  return logits != nullptr && reinterpret_cast<uintptr_t>(logits) % dtype_size(dtype) == 0;
}

// ------------------------------------------------------------------------------------------------
// Sample

// Everything the launch decides, computed identically for the workspace query and the launch.
// Workspace layout (16-byte aligned sections): counters [B] uint32, stats [B][splits] RowStats,
// race [B][splits] RaceBest, histograms [B][kRegions][kRegionBytes].
struct SamplePlan {
  int splits = 1;
  int chunk = 0;
  size_t stats_offset = 0, race_offset = 0, hist_offset = 0;
  size_t bytes = 0;
};

template <typename T>
cudaError_t plan_sample(const SampleParams& p, int num_sms, SamplePlan& plan) {
  plan = SamplePlan{};
  if (p.B == 0 || p.V < kSplitMinV || 2 * p.B > num_sms) return cudaSuccess;
  int device = 0, cooperative = 0, per_sm = 0;
  LMKERN_TRY(cudaGetDevice(&device));
  LMKERN_TRY(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device));
  if (!cooperative) return cudaSuccess;
  // The row's blocks wait for each other: all of them must be resident at once.
  LMKERN_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, sample_kernel<T>, kThreads, 0));
  const int64_t capacity = int64_t(per_sm) * num_sms;
  int64_t splits = std::min({capacity / p.B, ceil_div(p.V, kSplitMinChunk), kMaxSplits});
  if (splits < 2) return cudaSuccess;
  const int64_t chunk = ceil_div(ceil_div(p.V, splits), kChunkAlign) * kChunkAlign;
  splits = ceil_div(p.V, chunk);  // no empty block
  if (splits < 2) return cudaSuccess;
  plan.splits = int(splits);
  plan.chunk = int(chunk);
  const size_t B = size_t(p.B), S = size_t(splits);
  plan.stats_offset = round_up(B * sizeof(uint32_t), 16);
  plan.race_offset = plan.stats_offset + round_up(B * S * sizeof(RowStats), 16);
  plan.hist_offset = plan.race_offset + round_up(B * S * sizeof(RaceBest), 16);
  plan.bytes = plan.hist_offset + B * kRegions * kRegionBytes;
  return cudaSuccess;
}

template <typename T>
cudaError_t sample_impl(const SampleParams& p, int num_sms, size_t* bytes_out, void* workspace,
                        size_t workspace_bytes, cudaStream_t stream) {
  SamplePlan plan;
  LMKERN_TRY(plan_sample<T>(p, num_sms, plan));
  if (bytes_out != nullptr) {
    *bytes_out = plan.bytes;
    return cudaSuccess;
  }
  if (workspace == nullptr && workspace_bytes == 0) {
    plan = SamplePlan{};  // asked for one block per row
  } else if (plan.bytes > 0 && (workspace == nullptr || workspace_bytes < plan.bytes ||
                                !aligned16(workspace))) {
    return cudaErrorInvalidValue;
  }
  SampleWork work;
  work.frac_bits = mass_frac_bits(p.V);
  if (plan.splits == 1) {
    const unsigned grid = unsigned(std::min(p.B, kMaxGrid));
    sample_kernel<T><<<grid, kThreads, 0, stream>>>(p, work);
    return cudaGetLastError();
  }
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  work.splits = plan.splits;
  work.chunk = plan.chunk;
  work.counters = reinterpret_cast<uint32_t*>(ws);
  work.stats = reinterpret_cast<RowStats*>(ws + plan.stats_offset);
  work.race = reinterpret_cast<RaceBest*>(ws + plan.race_offset);
  work.hist = ws + plan.hist_offset;
  // Barrier counters start at zero; the kernel zeroes the histograms itself.
  LMKERN_TRY(cudaMemsetAsync(work.counters, 0, size_t(p.B) * sizeof(uint32_t), stream));
  SampleParams params = p;
  void* args[] = {&params, &work};
  const dim3 grid(unsigned(p.B * plan.splits)), block(kThreads);
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&sample_kernel<T>), grid,
                                     block, args, 0, stream);
}

cudaError_t sample_dispatch(const SampleParams& p, int num_sms, size_t* bytes_out,
                            void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (num_sms <= 0 || !logits_ok(p.logits, p.dtype, p.B, p.V)) return cudaErrorInvalidValue;
  if (p.B > 0 && p.ids == nullptr) return cudaErrorInvalidValue;
  if (p.B == 0) {
    if (bytes_out != nullptr) *bytes_out = 0;
    return cudaSuccess;
  }
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return sample_impl<T>(p, num_sms, bytes_out, workspace, workspace_bytes, stream);
  });
}

// ------------------------------------------------------------------------------------------------
// Softmax

// Blocks a row's length can keep busy (16-byte loads, kUnroll in flight): small rows get small
// blocks rather than mostly idle ones.
int softmax_threads(int64_t V) {
  return V >= 8192 ? kThreads : V >= 2048 ? 256 : V >= 512 ? 128 : 64;
}

}  // namespace

cudaError_t sample_cuda_workspace_bytes(const SampleParams& p, int num_sms, size_t* bytes) {
  if (bytes == nullptr) return cudaErrorInvalidValue;
  *bytes = 0;
  return sample_dispatch(p, num_sms, bytes, nullptr, 0, nullptr);
}

cudaError_t sample_cuda(const SampleParams& p, void* workspace, size_t workspace_bytes,
                        int num_sms, cudaStream_t stream) {
  return sample_dispatch(p, num_sms, nullptr, workspace, workspace_bytes, stream);
}

cudaError_t sample_cuda(const SampleParams& p, int num_sms, cudaStream_t stream) {
  return sample_dispatch(p, num_sms, nullptr, nullptr, 0, stream);
}

cudaError_t softmax_cuda(const SoftmaxParams& p, int num_sms, cudaStream_t stream) {
  if (num_sms <= 0 || !logits_ok(p.logits, p.dtype, p.B, p.V)) return cudaErrorInvalidValue;
  if (p.B == 0 || p.V == 0) return cudaSuccess;
  if (p.probs == nullptr || reinterpret_cast<uintptr_t>(p.probs) % sizeof(float) != 0) {
    return cudaErrorInvalidValue;
  }
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const unsigned grid = unsigned(std::min(p.B, kMaxGrid));
    softmax_kernel<T><<<grid, softmax_threads(p.V), 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace lmkern
