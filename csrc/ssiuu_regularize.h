// Ssiuu's attribution regularizer folded into the GradDiff gradient: declarations shared by the CPU and
// CUDA implementations and the bindings. Semantics: simu_fast/ops/ssiuu_regularize.py.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace simu_fast {

using TensorList = std::vector<at::Tensor>;

// In place, per index i and element: a = phi * d; unless first, g += ((([a < 0] * (a - a_prev)) * d) * (2 lam))
// (float32, in that order; g rounded to nearest in its dtype); a_prev = a. grads, params, prob_grads:
// float32 / bfloat16 / float16 (each its own); attr_prev: float32; all contiguous, same numel per index.
void ssiuu_regularize_cpu(TensorList grads, TensorList params, TensorList prob_grads, TensorList attr_prev,
                          double lam, bool first);

#ifdef SIMU_FAST_WITH_CUDA
void ssiuu_regularize_cuda(TensorList grads, TensorList params, TensorList prob_grads, TensorList attr_prev,
                           double lam, bool first);
#endif

}  // namespace simu_fast
