// Framework-free entry points of the LayerNorm/RMSNorm CUDA kernels (csrc/cuda/norm_kernels.cu).
// Plain C++: the only CUDA types are cudaStream_t and cudaError_t. All calls are asynchronous on
// `stream` and act on the current CUDA device; the pointers in the params must live on it.
// num_sms is that device's multiprocessor count (cudaDeviceProp::multiProcessorCount).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "lmkern/norm.h"

namespace lmkern {

// Forward (params as documented in norm.h). M == 0 launches nothing; N == 0 writes NaN
// statistics (the mean of an empty row), as PyTorch's reference does.
cudaError_t norm_fwd_cuda(const NormFwdParams& p, int num_sms, cudaStream_t stream);

// Size in bytes of the device scratch memory norm_bwd_cuda needs for these params on the current
// device (0 when no dweight/dbias is requested and the rows fit the register-cached kernel).
cudaError_t norm_bwd_cuda_workspace_bytes(const NormBwdParams& p, int num_sms, size_t* bytes);

// Backward. workspace: at least norm_bwd_cuda_workspace_bytes bytes of device memory, 16-byte
// aligned, contents irrelevant (nullptr when that size is 0); in use until the work on `stream`
// ends. dweight/dbias are deterministic: per-block partial sums added in a fixed order. M == 0
// sets dweight/dbias to zero.
cudaError_t norm_bwd_cuda(const NormBwdParams& p, void* workspace, size_t workspace_bytes,
                          int num_sms, cudaStream_t stream);

}  // namespace lmkern
