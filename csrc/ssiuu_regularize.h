// Ssiuu's attribution regularizer folded into the GradDiff gradient: declarations shared by the CPU and
// CUDA implementations and the bindings. Semantics: simu_fast/ops/ssiuu_regularize.py.
#pragma once
#include <ATen/core/Tensor.h>

#include "tensor_lists.h"

namespace simu_fast {

// In place, per index i and element, float32, in this order with one rounding each:
//   d = d; a = phi * d; a_prev = phi_prev * d_prev; delta = a - a_prev;
//   s = squared ? delta : (delta > 0) - (delta < 0);  neg = a < 0 ? 1 : 0;
//   g = g + ((neg * s) * d) * scale,  scale = float(squared ? 2 lam : lam)
// (g rounded to nearest even in its dtype; nothing else is written). grads, params, prob_grads: float32 /
// bfloat16 / float16 (each its own); prev_params has params' dtype, prev_prob_grads prob_grads'; all
// contiguous, same numel per index.
void ssiuu_regularize_cpu(TensorList grads, TensorList params, TensorList prob_grads, TensorList prev_params,
                          TensorList prev_prob_grads, double lam, bool squared);

#ifdef SIMU_FAST_WITH_CUDA
void ssiuu_regularize_cuda(TensorList grads, TensorList params, TensorList prob_grads, TensorList prev_params,
                           TensorList prev_prob_grads, double lam, bool squared);
#endif

}  // namespace simu_fast
