// Masked Hessian EMA of SophiaG on CUDA: h <- beta2 * h + (1 - beta2) * g^2 on the selected elements.
// Semantics: simu_fast/ops/hessian_ema.py; mask layout: simu_fast/ops/update_mask.py.
//
// One multi-tensor launch per grad dtype (masked_launch.cuh); the float32 arithmetic is explicit
// round-to-nearest (mul_rn, add_rn: never contracted into an FMA), in the reference's order.
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "../hessian_ema.h"
#include "masked_launch.cuh"

namespace simu_fast {
namespace {

// TensorMeta, kG / kH, launch, check_lengths, mask_meta, vector_kind (masked_launch.cuh); with_type, kVec,
// Pack, load_pack, store_pack, aligned_for_vec, mul_rn / add_rn, dtype_code, check_tensor, cuda_device
// (multi_tensor.cuh).
using namespace masked_launch;

// ---- element functions: one(o) handles flat element o, four(o) elements o..o+3 ------------------------

template <typename GT>
struct HessianEmaOp {
  static constexpr bool kCounts = false;
  float beta2, one_minus_beta2;

  __device__ float ema(float h, float grad) const {
    return add_rn(mul_rn(h, beta2), mul_rn(mul_rn(grad, grad), one_minus_beta2));
  }
  __device__ uint32_t one(const TensorMeta& t, int64_t o) const {
    const auto* g = reinterpret_cast<const typename GT::T*>(t.ptr[kG]);
    auto* h = reinterpret_cast<float*>(t.ptr[kH]);
    h[o] = ema(h[o], GT::to_float(g[o]));
    return 0;
  }
  __device__ uint32_t four(const TensorMeta& t, int64_t o) const {
    const auto* g = reinterpret_cast<const typename GT::T*>(t.ptr[kG]);
    auto* h = reinterpret_cast<float*>(t.ptr[kH]);
    const Pack<typename GT::T> gp = load_pack(g, o);
    Pack<float> hp = load_pack(h, o);
#pragma unroll
    for (int k = 0; k < kVec; ++k) hp.v[k] = ema(hp.v[k], GT::to_float(gp.v[k]));
    store_pack(h, o, hp);
    return 0;
  }
};

}  // namespace

void hessian_ema_cuda(TensorList hessians, TensorList grads, IntList kinds, TensorList mask_tensors,
                      IntList row_lens, double beta2) {
  constexpr const char* op = "hessian_ema_cuda";
  const size_t n = hessians.size();
  TORCH_CHECK(grads.size() == n, op, ": hessians and grads must have the same length (", n, ")");
  check_lengths(n, kinds, mask_tensors, row_lens, op);
  if (n == 0) return;
  const at::Device device = cuda_device(hessians[0], op);
  const c10::cuda::CUDAGuard guard(device);

  std::vector<TensorMeta> groups[3];  // by grad dtype code
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &h = hessians[i], &g = grads[i];
    const int64_t numel = h.numel();
    check_tensor(h, device, numel, op, "hessian", i);
    check_tensor(g, device, numel, op, "gradient", i);
    TORCH_CHECK(h.scalar_type() == at::kFloat, op, ": hessian ", i, " must be float32");
    const int gc = dtype_code(g.scalar_type(), op, "gradient", i);
    TensorMeta t = mask_meta(numel, kinds[i], mask_tensors[i], row_lens[i], device, op, i);
    if (t.work == 0) continue;
    t.ptr[kG] = reinterpret_cast<int64_t>(g.data_ptr());
    t.ptr[kH] = reinterpret_cast<int64_t>(h.data_ptr());
    t.vec = vector_kind(t) && aligned_for_vec(g) && aligned_for_vec(h);
    groups[gc].push_back(t);
  }

  const float b2 = static_cast<float>(beta2), omb2 = static_cast<float>(1.0 - beta2);
  for (int gc = 0; gc < 3; ++gc) {
    if (groups[gc].empty()) continue;
    with_type(gc, [&](auto g_tag) {
      launch(groups[gc], HessianEmaOp<decltype(g_tag)>{b2, omb2}, nullptr, device);
    });
  }
}

}  // namespace simu_fast
