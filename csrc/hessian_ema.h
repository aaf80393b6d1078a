// Masked Hessian EMA of SophiaG: declarations shared by the CPU and CUDA implementations and the bindings.
// Semantics: simu_fast/ops/hessian_ema.py; mask layout (kinds, mask_tensors, row_lens): update_mask.py.
#pragma once
#include "tensor_lists.h"

namespace simu_fast {

// In place on the selected elements: h <- beta2 * h + (1 - beta2) * g^2 (h float32).
void hessian_ema_cpu(TensorList hessians, TensorList grads, IntList kinds, TensorList mask_tensors,
                     IntList row_lens, double beta2);

#ifdef SIMU_FAST_WITH_CUDA
void hessian_ema_cuda(TensorList hessians, TensorList grads, IntList kinds, TensorList mask_tensors,
                      IntList row_lens, double beta2);
#endif

}  // namespace simu_fast
