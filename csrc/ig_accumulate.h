// Integrated-gradients accumulation: declarations and argument checks shared by the CPU and CUDA
// implementations and the bindings. Semantics: simu_fast/ops/ig_accumulate.py.
//
//   out[k] += sum over r < R, t < S:  weight[r] * mask[r, t] * act[r, t, k] * grad[r, t, k]
//
// out: float32 [F] contiguous (accumulated in place); act, grad: [R, S, F] contiguous, one dtype among
// float32 / bfloat16 / float16; weight: float32 [R]; mask: uint8 [R, S] contiguous. Accumulation is
// float32. Positions whose scale weight[r] * mask[r, t] is 0 are skipped without reading act or grad.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace simu_fast {

// The shape and dtype checks of both implementations (`op` starts the error messages); each adds its own
// device checks.
inline void check_ig_accumulate_args(const at::Tensor& out, const at::Tensor& act, const at::Tensor& grad,
                                     const at::Tensor& weight, const at::Tensor& mask, const char* op) {
  TORCH_CHECK(act.dim() == 3, op, ": act must be [rows, seq, F], got ", act.sizes());
  TORCH_CHECK(grad.sizes() == act.sizes(), op, ": grad ", grad.sizes(), " does not match act ", act.sizes());
  TORCH_CHECK(grad.scalar_type() == act.scalar_type(), op, ": act and grad dtypes differ (", act.scalar_type(),
              ", ", grad.scalar_type(), ")");
  const int64_t R = act.size(0), S = act.size(1), F = act.size(2);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 1 && out.size(0) == F, op,
              ": out must be float32 [", F, "]");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 && weight.size(0) == R, op,
              ": weight must be float32 [", R, "]");
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.dim() == 2 && mask.size(0) == R && mask.size(1) == S, op,
              ": mask must be uint8 [", R, ", ", S, "]");
}

void ig_accumulate_cpu(at::Tensor out, at::Tensor act, at::Tensor grad, at::Tensor weight, at::Tensor mask);

#ifdef SIMU_FAST_WITH_CUDA
void ig_accumulate_cuda(at::Tensor out, at::Tensor act, at::Tensor grad, at::Tensor weight, at::Tensor mask);
#endif

}  // namespace simu_fast
