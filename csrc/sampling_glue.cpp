#include "sampling_glue.h"

#include <c10/util/Exception.h>

#include "glue_common.h"

namespace lmkern {
namespace {

void check_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "lmkern.", op, ": logits must be 2-D (batch, vocab), got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) > 0 || logits.size(0) == 0, "lmkern.", op,
                    ": logits must have a non-empty vocabulary dimension");
}

// A per-row parameter as the kernels read it: (B,) contiguous `dtype` on the logits' device.
at::Tensor row_param(const char* op, const char* arg, const std::optional<at::Tensor>& t,
                     const at::Tensor& logits, at::ScalarType dtype) {
  if (!t) return at::Tensor();
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == logits.size(0), "lmkern.", op, ": ", arg,
                    " must have shape (", logits.size(0), ",) (one value per row), got ", t->sizes());
  TORCH_CHECK_VALUE(t->device() == logits.device(), "lmkern.", op, ": ", arg, " is on ",
                    t->device(), " but logits is on ", logits.device());
  if (dtype == at::kLong) {
    TORCH_CHECK_TYPE(!at::isFloatingType(t->scalar_type()) && !at::isComplexType(t->scalar_type()),
                     "lmkern.", op, ": ", arg, " must be an integer tensor, got ", t->scalar_type());
  } else {
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "lmkern.", op, ": ", arg,
                     " must be a floating-point tensor, got ", t->scalar_type());
  }
  return t->to(dtype).contiguous();
}

template <class T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

SampleCall prepare_sample(const at::Tensor& logits, double temperature, int64_t top_k,
                          double top_p, double min_p,
                          const std::optional<at::Tensor>& temperatures,
                          const std::optional<at::Tensor>& top_ks,
                          const std::optional<at::Tensor>& top_ps,
                          const std::optional<at::Tensor>& min_ps, int64_t seed,
                          const std::optional<at::Tensor>& seeds, bool need_logprobs) {
  constexpr const char* op = "sample";
  check_logits(op, logits);
  SampleCall c;
  SampleParams& p = c.params;
  p.dtype = kernel_dtype(op, "logits", logits.scalar_type());
  c.logits = rows_unit_stride(logits);
  c.temperatures = row_param(op, "temperatures", temperatures, logits, at::kFloat);
  c.top_ks = row_param(op, "top_ks", top_ks, logits, at::kLong);
  c.top_ps = row_param(op, "top_ps", top_ps, logits, at::kFloat);
  c.min_ps = row_param(op, "min_ps", min_ps, logits, at::kFloat);
  c.seeds = row_param(op, "seeds", seeds, logits, at::kLong);
  const int64_t B = logits.size(0);
  c.ids = at::empty({B}, logits.options().dtype(at::kLong));
  c.logprobs = at::empty({need_logprobs ? B : 0}, logits.options().dtype(at::kFloat));

  p.logits = c.logits.data_ptr();
  p.logits_row_stride = c.logits.stride(0);
  p.B = B;
  p.V = logits.size(1);
  p.temperature = static_cast<float>(temperature);
  p.top_k = top_k;
  p.top_p = static_cast<float>(top_p);
  p.min_p = static_cast<float>(min_p);
  p.temperatures = ptr_or_null<float>(c.temperatures);
  p.top_ks = ptr_or_null<int64_t>(c.top_ks);
  p.top_ps = ptr_or_null<float>(c.top_ps);
  p.min_ps = ptr_or_null<float>(c.min_ps);
  p.seed = static_cast<uint64_t>(seed);  // the same 64 bits: Python passes seeds >= 2^63 as negative
  p.seeds = ptr_or_null<int64_t>(c.seeds);
  p.ids = c.ids.data_ptr<int64_t>();
  p.logprobs = need_logprobs ? c.logprobs.data_ptr<float>() : nullptr;
  return c;
}

SoftmaxCall prepare_softmax(const at::Tensor& logits, double temperature,
                            const std::optional<at::Tensor>& temperatures) {
  constexpr const char* op = "softmax";
  check_logits(op, logits);
  SoftmaxCall c;
  SoftmaxParams& p = c.params;
  p.dtype = kernel_dtype(op, "logits", logits.scalar_type());
  c.logits = rows_unit_stride(logits);
  c.temperatures = row_param(op, "temperatures", temperatures, logits, at::kFloat);
  c.probs = at::empty(logits.sizes(), logits.options().dtype(at::kFloat));
  p.logits = c.logits.data_ptr();
  p.logits_row_stride = c.logits.stride(0);
  p.B = logits.size(0);
  p.V = logits.size(1);
  p.temperature = static_cast<float>(temperature);
  p.temperatures = ptr_or_null<float>(c.temperatures);
  p.probs = c.probs.data_ptr<float>();
  return c;
}

}  // namespace lmkern
