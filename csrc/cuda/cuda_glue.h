// What every CUDA glue file (attention_cuda.cpp, norm_cuda.cpp, sampling_cuda.cpp) needs from
// torch: the launch error check, the device check, the current stream and the SM count.
// Only c10/cuda headers on purpose: ATen/cuda/CUDAContext.h pulls in the cuBLAS/cuSPARSE headers,
// which a bare CUDA toolkit does not ship; without it `make glue-check` can compile the glue on a
// machine with nvcc and the CPU torch wheel (whose include tree carries the c10/cuda headers).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <atomic>

namespace lmkern {

// A launcher's return code as a RuntimeError naming the op.
inline void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "lmkern.", op, ": CUDA error: ", cudaGetErrorString(err));
}

// The op's leading tensor `arg` (whose device the op runs on) is a CUDA tensor.
inline void check_cuda_tensor(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "lmkern.", op, ": ", arg, " must be a CUDA tensor, got ", t.device());
}

// The stream torch's kernels on the current device run on, so lmkern's launches order with theirs.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// SMs of the current device (the launchers size persistent and split grids by it), read from the
// driver once per device.
inline int num_sms() {
  static std::atomic<int> cached[C10_COMPILE_TIME_MAX_GPUS];  // zero-initialized: static storage
  const c10::DeviceIndex device = c10::cuda::current_device();
  int sms = cached[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cached[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

}  // namespace lmkern
