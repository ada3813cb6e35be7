// The Python module lmkern._C: loading it registers the ops (registration.cpp and the per-device
// TORCH_LIBRARY_IMPL blocks). It also reports how it was built, for `lmkern info`.
// Only pybind11: nothing here touches a tensor, and <torch/extension.h> took a minute to compile.
#include <pybind11/pybind11.h>

namespace lmkern::cpu {
const char* isa_name();  // norm_cpu.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef LMKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("torch_version") = LMKERN_TORCH_VERSION;
  m.def("cpu_isa", &lmkern::cpu::isa_name,
        "Instruction set of the C++ CPU kernels: avx512, avx2 or portable (LMKERN_CPU_ISA caps it)");
}
