// Masked SophiaG kernels: declarations shared by the CPU and CUDA implementations and the bindings.
// Semantics: simu_fast/ops/sophia_step.py, hessian_ema.py, nonfinite_check.py.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace simu_fast {

using TensorList = std::vector<at::Tensor>;
using IntList = std::vector<int64_t>;

// hessian_beta2 < 0: no Hessian update inside the step. sr_seeds[i] < 0: round to nearest.
// Returns int64 [1] on the parameters' device: selected elements with |m| / (rho_bs * h + eps) < 1.
at::Tensor sophia_step_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList hessians,
                           IntList kinds, TensorList mask_tensors, IntList row_lens, double lr, double decay,
                           double beta1, double hessian_beta2, double rho_bs, double eps, bool maximize,
                           IntList sr_seeds);
void hessian_ema_cpu(TensorList hessians, TensorList grads, IntList kinds, TensorList mask_tensors,
                     IntList row_lens, double beta2);
at::Tensor count_nonfinite_cpu(TensorList grads, IntList kinds, TensorList mask_tensors, IntList row_lens);

#ifdef SIMU_FAST_WITH_CUDA
at::Tensor sophia_step_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList hessians,
                            IntList kinds, TensorList mask_tensors, IntList row_lens, double lr, double decay,
                            double beta1, double hessian_beta2, double rho_bs, double eps, bool maximize,
                            IntList sr_seeds);
void hessian_ema_cuda(TensorList hessians, TensorList grads, IntList kinds, TensorList mask_tensors,
                      IntList row_lens, double beta2);
at::Tensor count_nonfinite_cuda(TensorList grads, IntList kinds, TensorList mask_tensors, IntList row_lens);
#endif

}  // namespace simu_fast
