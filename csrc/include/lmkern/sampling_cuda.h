// Framework-free entry points of the sampling CUDA kernels (csrc/cuda/sampling_kernels.cu).
// Plain C++: the only CUDA types are cudaStream_t and cudaError_t. All calls are asynchronous on
// `stream` and act on the current CUDA device; the pointers in the params must live on it.
// num_sms is that device's multiprocessor count (cudaDeviceProp::multiProcessorCount).
// Limits: V < 2^31 and logits aligned to their element size (cudaErrorInvalidValue otherwise).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "lmkern/sampling.h"

namespace lmkern {

// Size in bytes of the device scratch memory sample_cuda may use for these params on the current
// device: 0 when every row gets one block; for few long rows (2 * B <= num_sms, V >= 65536), the
// rows are split over several co-resident blocks (a cooperative launch) that exchange partial
// statistics and histograms through the workspace: B * (4 + splits * 24 + 6 * 24 KiB) bytes
// (about 144 KiB per row, splits <= 32).
cudaError_t sample_cuda_workspace_bytes(const SampleParams& p, int num_sms, size_t* bytes);

// ids (and logprobs, if set) for every row, as documented in sampling.h. workspace: at least
// sample_cuda_workspace_bytes bytes of device memory, 16-byte aligned, contents irrelevant
// (nullptr when that size is 0); in use until the work on `stream` ends. workspace == nullptr
// with workspace_bytes == 0 asks for the one-block-per-row kernel whatever the shape; any other
// workspace smaller than needed or misaligned is cudaErrorInvalidValue. B == 0 launches nothing.
cudaError_t sample_cuda(const SampleParams& p, void* workspace, size_t workspace_bytes,
                        int num_sms, cudaStream_t stream);

// sample_cuda(p, nullptr, 0, num_sms, stream): one block per row, no workspace.
cudaError_t sample_cuda(const SampleParams& p, int num_sms, cudaStream_t stream);

// probs = softmax(logits / T) as documented in sampling.h; one block per row.
cudaError_t softmax_cuda(const SoftmaxParams& p, int num_sms, cudaStream_t stream);

}  // namespace lmkern
