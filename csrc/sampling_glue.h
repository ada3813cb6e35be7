// Torch-side checks and output allocation shared by the CPU and CUDA implementations of
// lmkern::sample and lmkern::softmax: each device file only runs its kernel on the prepared params.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "lmkern/sampling.h"

namespace lmkern {

// A checked sample call: params points into the tensors held here (per-row parameters converted
// to contiguous fp32/int64 on the logits' device, logits with element stride 1).
struct SampleCall {
  SampleParams params;
  at::Tensor logits, temperatures, top_ks, top_ps, min_ps, seeds;
  at::Tensor ids, logprobs;
};

struct SoftmaxCall {
  SoftmaxParams params;
  at::Tensor logits, temperatures;
  at::Tensor probs;
};

SampleCall prepare_sample(const at::Tensor& logits, double temperature, int64_t top_k,
                          double top_p, double min_p,
                          const std::optional<at::Tensor>& temperatures,
                          const std::optional<at::Tensor>& top_ks,
                          const std::optional<at::Tensor>& top_ps,
                          const std::optional<at::Tensor>& min_ps, int64_t seed,
                          const std::optional<at::Tensor>& seeds, bool need_logprobs);

SoftmaxCall prepare_softmax(const at::Tensor& logits, double temperature,
                            const std::optional<at::Tensor>& temperatures);

}  // namespace lmkern
