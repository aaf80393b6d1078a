// The list arguments of the multi-tensor ops (sophia_step.h, hessian_ema.h, nonfinite_check.h,
// ssiuu_regularize.h): one entry per tensor.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace simu_fast {

using TensorList = std::vector<at::Tensor>;
using IntList = std::vector<int64_t>;

}  // namespace simu_fast
