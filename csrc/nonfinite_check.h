// Masked non-finite check of the gradients: declarations shared by the CPU and CUDA implementations and the
// bindings. Semantics: simu_fast/ops/nonfinite_check.py; mask layout (kinds, mask_tensors, row_lens):
// update_mask.py.
#pragma once
#include <ATen/core/Tensor.h>

#include "tensor_lists.h"

namespace simu_fast {

// Returns int64 [len(grads)] on the gradients' device: the inf / NaN selected elements of each gradient.
at::Tensor count_nonfinite_cpu(TensorList grads, IntList kinds, TensorList mask_tensors, IntList row_lens);

#ifdef SIMU_FAST_WITH_CUDA
at::Tensor count_nonfinite_cuda(TensorList grads, IntList kinds, TensorList mask_tensors, IntList row_lens);
#endif

}  // namespace simu_fast
