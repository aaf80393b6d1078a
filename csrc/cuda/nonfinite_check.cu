// Masked non-finite check on CUDA: counts the inf / NaN selected elements of each gradient (exponent bits
// all ones, on the raw bits). Semantics: simu_fast/ops/nonfinite_check.py; mask layout:
// simu_fast/ops/update_mask.py.
//
// One multi-tensor launch per grad dtype (masked_launch.cuh); tensor i's count goes to out[i].
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "../nonfinite_check.h"
#include "masked_launch.cuh"

namespace simu_fast {
namespace {

// TensorMeta, kG, launch, check_lengths, mask_meta, vector_kind (masked_launch.cuh); F32 / BF16 / F16
// (nonfinite), with_type, kVec, Pack, load_pack, aligned_for_vec, dtype_code, check_tensor, cuda_device
// (multi_tensor.cuh).
using namespace masked_launch;

// ---- element functions: one(o) handles flat element o, four(o) elements o..o+3 ------------------------

template <typename GT>
struct NonfiniteOp {
  static constexpr bool kCounts = true;

  __device__ uint32_t one(const TensorMeta& t, int64_t o) const {
    return GT::nonfinite(reinterpret_cast<const typename GT::T*>(t.ptr[kG])[o]);
  }
  __device__ uint32_t four(const TensorMeta& t, int64_t o) const {
    const Pack<typename GT::T> gp = load_pack(reinterpret_cast<const typename GT::T*>(t.ptr[kG]), o);
    uint32_t c = 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) c += GT::nonfinite(gp.v[k]);
    return c;
  }
};

}  // namespace

at::Tensor count_nonfinite_cuda(TensorList grads, IntList kinds, TensorList mask_tensors, IntList row_lens) {
  constexpr const char* op = "count_nonfinite_cuda";
  const size_t n = grads.size();
  check_lengths(n, kinds, mask_tensors, row_lens, op);
  if (n == 0) return at::zeros({0}, at::TensorOptions().dtype(at::kLong));
  const at::Device device = cuda_device(grads[0], op);
  const c10::cuda::CUDAGuard guard(device);

  std::vector<TensorMeta> groups[3];  // by grad dtype code
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    check_tensor(g, device, g.numel(), op, "gradient", i);
    const int gc = dtype_code(g.scalar_type(), op, "gradient", i);
    TensorMeta t = mask_meta(g.numel(), kinds[i], mask_tensors[i], row_lens[i], device, op, i);
    if (t.work == 0) continue;
    t.ptr[kG] = reinterpret_cast<int64_t>(g.data_ptr());
    t.slot = static_cast<int64_t>(i);
    t.vec = vector_kind(t) && aligned_for_vec(g);
    groups[gc].push_back(t);
  }

  at::Tensor out = at::zeros({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kLong).device(device));
  auto* counts = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  for (int gc = 0; gc < 3; ++gc) {
    if (groups[gc].empty()) continue;
    with_type(gc, [&](auto g_tag) { launch(groups[gc], NonfiniteOp<decltype(g_tag)>{}, counts, device); });
  }
  return out;
}

}  // namespace simu_fast
