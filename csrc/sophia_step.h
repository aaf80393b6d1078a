// Masked SophiaG step: declarations shared by the CPU and CUDA implementations and the bindings.
// Semantics: simu_fast/ops/sophia_step.py; mask layout (kinds, mask_tensors, row_lens): update_mask.py.
#pragma once
#include <ATen/core/Tensor.h>

#include "tensor_lists.h"

namespace simu_fast {

// hessian_beta2 < 0: no Hessian update inside the step. sr_seeds[i] < 0: round to nearest.
// Returns int64 [1] on the parameters' device: selected elements with |m| / (rho_bs * h + eps) < 1.
at::Tensor sophia_step_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList hessians,
                           IntList kinds, TensorList mask_tensors, IntList row_lens, double lr, double decay,
                           double beta1, double hessian_beta2, double rho_bs, double eps, bool maximize,
                           IntList sr_seeds);

#ifdef SIMU_FAST_WITH_CUDA
// skip: an empty tensor, or one int64 on the device; non-zero there, the launch changes nothing (no host sync).
at::Tensor sophia_step_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList hessians,
                            IntList kinds, TensorList mask_tensors, IntList row_lens, double lr, double decay,
                            double beta1, double hessian_beta2, double rho_bs, double eps, bool maximize,
                            IntList sr_seeds, const at::Tensor& skip);
#endif

}  // namespace simu_fast
