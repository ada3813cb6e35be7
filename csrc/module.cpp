// The Python module lmkern._C: loading it registers the ops (registration.cpp and the per-device
// TORCH_LIBRARY_IMPL blocks). It also reports how it was built, for `lmkern info`.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef LMKERN_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("torch_version") = LMKERN_TORCH_VERSION;
}
