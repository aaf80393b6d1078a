// Integrated-gradients accumulation: declarations shared by the CPU and CUDA implementations and the
// bindings. Semantics: simu_fast/ops/ig_accumulate.py.
//
//   out[k] += sum over r < R, t < S:  weight[r] * mask[r, t] * act[r, t, k] * grad[r, t, k]
//
// out: float32 [F] contiguous (accumulated in place); act, grad: [R, S, F] contiguous, one dtype among
// float32 / bfloat16 / float16; weight: float32 [R]; mask: uint8 [R, S] contiguous. Accumulation is
// float32. Positions whose scale weight[r] * mask[r, t] is 0 are skipped without reading act or grad.
#pragma once
#include <ATen/core/Tensor.h>

namespace simu_fast {

void ig_accumulate_cpu(at::Tensor out, at::Tensor act, at::Tensor grad, at::Tensor weight, at::Tensor mask);

#ifdef SIMU_FAST_WITH_CUDA
void ig_accumulate_cuda(at::Tensor out, at::Tensor act, at::Tensor grad, at::Tensor weight, at::Tensor mask);
#endif

}  // namespace simu_fast
