// CUDA implementations of lmkern::sample and lmkern::softmax: the shared checks and allocation
// (prepare_sample / prepare_softmax, csrc/sampling_glue.cpp), then the framework-free launchers
// (csrc/cuda/sampling_kernels.cu) on the current stream of the logits' device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cuda_glue.h"
#include "lmkern/sampling_cuda.h"
#include "sampling_glue.h"

namespace lmkern {
namespace {

std::tuple<at::Tensor, at::Tensor> sample_op(
    const at::Tensor& logits, double temperature, int64_t top_k, double top_p, double min_p,
    const std::optional<at::Tensor>& temperatures, const std::optional<at::Tensor>& top_ks,
    const std::optional<at::Tensor>& top_ps, const std::optional<at::Tensor>& min_ps,
    int64_t seed, const std::optional<at::Tensor>& seeds, bool need_logprobs) {
  constexpr const char* op = "sample";
  check_cuda_tensor(op, "logits", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  SampleCall c = prepare_sample(logits, temperature, top_k, top_p, min_p, temperatures, top_ks,
                                top_ps, min_ps, seed, seeds, need_logprobs);
  // Few long rows are split over several blocks, which meet in a scratch buffer (O(B), see
  // sampling_cuda.h). It comes from the caching allocator on the current stream, so freeing it
  // when this function returns is safe: later work on the stream runs after the kernel.
  const int sms = num_sms();
  size_t bytes = 0;
  check_cuda(sample_cuda_workspace_bytes(c.params, sms, &bytes), op);
  at::Tensor workspace;
  if (bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes)}, c.logits.options().dtype(at::kByte));
  }
  check_cuda(sample_cuda(c.params, bytes > 0 ? workspace.data_ptr() : nullptr, bytes, sms,
                         current_stream()),
             op);
  return {c.ids, c.logprobs};
}

at::Tensor softmax_op(const at::Tensor& logits, double temperature,
                      const std::optional<at::Tensor>& temperatures) {
  constexpr const char* op = "softmax";
  check_cuda_tensor(op, "logits", logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  SoftmaxCall c = prepare_softmax(logits, temperature, temperatures);
  check_cuda(softmax_cuda(c.params, num_sms(), current_stream()), op);
  return c.probs;
}

}  // namespace
}  // namespace lmkern

TORCH_LIBRARY_IMPL(lmkern, CUDA, m) {
  m.impl("sample", &lmkern::sample_op);
  m.impl("softmax", &lmkern::softmax_op);
}
