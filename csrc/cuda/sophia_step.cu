// Masked SophiaG step on CUDA. Semantics: simu_fast/ops/sophia_step.py; mask layout:
// simu_fast/ops/update_mask.py.
//
// One multi-tensor launch per (param dtype, grad dtype) group (masked_launch.cuh): SophiaOp's element
// functions update p, m (and h) of the selected elements and count those whose update was not clipped.
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <type_traits>

#include "../sophia_step.h"
#include "../update_mask.h"
#include "masked_launch.cuh"

namespace simu_fast {
namespace {

// TensorMeta, kP / kG / kM / kH, launch, check_lengths, mask_meta, vector_kind (masked_launch.cuh); F32 /
// BF16 / F16, with_type, kVec, Pack, load_pack, store_pack, aligned_for_vec, mul_rn / add_rn / sub_rn /
// div_rn, dtype_code, check_tensor, cuda_device (multi_tensor.cuh).
using namespace masked_launch;

template <typename PT>
__device__ __forceinline__ typename PT::T store_param(float v, int64_t o, int64_t seed) {
  if constexpr (std::is_same_v<PT, BF16>) {
    if (seed >= 0) return bf16_bits_stochastic(v, static_cast<uint64_t>(o), static_cast<uint32_t>(seed));
  }
  return PT::from_float(v);
}

// ---- IEEE float32 arithmetic --------------------------------------------------------------------------
// The step must match the eager float32 reference (one rounding per torch op) exactly: mul_rn, add_rn,
// sub_rn, div_rn (multi_tensor.cuh) are explicit round-to-nearest PTX that no compiler flag rewrites.

// Sign-bit operations on the bits, so denormals are not flushed.
__device__ __forceinline__ float neg_bits(float x) { return __uint_as_float(__float_as_uint(x) ^ 0x80000000u); }
__device__ __forceinline__ float abs_bits(float x) { return __uint_as_float(__float_as_uint(x) & 0x7FFFFFFFu); }
// torch.sign: -1, 0 or 1; 0 for +-0 and NaN.
__device__ __forceinline__ float sign_of(float x) {
  const uint32_t b = __float_as_uint(x), mag = b & 0x7FFFFFFFu;
  if (mag == 0u || mag > 0x7F800000u) return 0.f;
  return (b >> 31) ? -1.f : 1.f;
}

struct StepScalars {
  float lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, rho_bs, eps;
  bool maximize, update_h;
};

// One element of the step, in the reference's order of operations. Returns 1 when q < 1 (not clipped).
__device__ __forceinline__ uint32_t sophia_element(float& p, float grad, float& m, float& h, const StepScalars& s) {
  const float g = s.maximize ? neg_bits(grad) : grad;
  if (s.update_h) h = add_rn(mul_rn(h, s.beta2), mul_rn(mul_rn(g, g), s.one_minus_beta2));
  p = mul_rn(p, s.decay);
  m = add_rn(mul_rn(m, s.beta1), mul_rn(g, s.one_minus_beta1));
  const float q = div_rn(abs_bits(m), add_rn(mul_rn(h, s.rho_bs), s.eps));
  const float clipped = q > 1.f ? 1.f : q;  // a NaN q passes through, as in torch.clamp
  p = sub_rn(p, mul_rn(mul_rn(sign_of(m), clipped), s.lr));
  return q < 1.f ? 1u : 0u;
}

// ---- element functions: one(o) handles flat element o, four(o) elements o..o+3 ------------------------

template <typename PT, typename GT>
struct SophiaOp {
  static constexpr bool kCounts = true;
  StepScalars s;

  __device__ uint32_t one(const TensorMeta& t, int64_t o) const {
    auto* p = reinterpret_cast<typename PT::T*>(t.ptr[kP]);
    const auto* g = reinterpret_cast<const typename GT::T*>(t.ptr[kG]);
    auto* m = reinterpret_cast<float*>(t.ptr[kM]);
    auto* h = reinterpret_cast<float*>(t.ptr[kH]);
    float pv = PT::to_float(p[o]), mv = m[o], hv = h[o];
    const uint32_t c = sophia_element(pv, GT::to_float(g[o]), mv, hv, s);
    p[o] = store_param<PT>(pv, o, t.seed);
    m[o] = mv;
    if (s.update_h) h[o] = hv;
    return c;
  }

  __device__ uint32_t four(const TensorMeta& t, int64_t o) const {
    auto* p = reinterpret_cast<typename PT::T*>(t.ptr[kP]);
    const auto* g = reinterpret_cast<const typename GT::T*>(t.ptr[kG]);
    auto* m = reinterpret_cast<float*>(t.ptr[kM]);
    auto* h = reinterpret_cast<float*>(t.ptr[kH]);
    Pack<typename PT::T> pp = load_pack(p, o);
    const Pack<typename GT::T> gp = load_pack(g, o);
    Pack<float> mp = load_pack(m, o), hp = load_pack(h, o);
    uint32_t c = 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      float pv = PT::to_float(pp.v[k]);
      c += sophia_element(pv, GT::to_float(gp.v[k]), mp.v[k], hp.v[k], s);
      pp.v[k] = store_param<PT>(pv, o + k, t.seed);
    }
    store_pack(p, o, pp);
    store_pack(m, o, mp);
    if (s.update_h) store_pack(h, o, hp);
    return c;
  }
};

}  // namespace

at::Tensor sophia_step_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList hessians,
                            IntList kinds, TensorList mask_tensors, IntList row_lens, double lr, double decay,
                            double beta1, double hessian_beta2, double rho_bs, double eps, bool maximize,
                            IntList sr_seeds, const at::Tensor& skip) {
  constexpr const char* op = "sophia_step_cuda";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && hessians.size() == n && sr_seeds.size() == n, op,
              ": params, grads, exp_avgs, hessians and sr_seeds must have the same length (", n, ")");
  check_lengths(n, kinds, mask_tensors, row_lens, op);
  if (n == 0) return at::zeros({1}, at::TensorOptions().dtype(at::kLong));
  const at::Device device = cuda_device(params[0], op);
  const c10::cuda::CUDAGuard guard(device);

  // Scalars converted once, as the reference does (Python doubles -> float32 tensor ops).
  const bool update_h = hessian_beta2 >= 0.0;
  const StepScalars s{static_cast<float>(lr),
                      static_cast<float>(decay),
                      static_cast<float>(beta1),
                      static_cast<float>(1.0 - beta1),
                      static_cast<float>(update_h ? hessian_beta2 : 0.0),
                      static_cast<float>(update_h ? 1.0 - hessian_beta2 : 0.0),
                      static_cast<float>(rho_bs),
                      static_cast<float>(eps),
                      maximize,
                      update_h};

  std::vector<TensorMeta> groups[9];  // by param dtype code * 3 + grad dtype code
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &h = hessians[i];
    const int64_t numel = p.numel();
    check_tensor(p, device, numel, op, "parameter", i);
    check_tensor(g, device, numel, op, "gradient", i);
    check_tensor(m, device, numel, op, "exp_avg", i);
    check_tensor(h, device, numel, op, "hessian", i);
    TORCH_CHECK(m.scalar_type() == at::kFloat && h.scalar_type() == at::kFloat, op, ": exp_avg and hessian ", i,
                " must be float32");
    const int pc = dtype_code(p.scalar_type(), op, "parameter", i);
    const int gc = dtype_code(g.scalar_type(), op, "gradient", i);
    TensorMeta t = mask_meta(numel, kinds[i], mask_tensors[i], row_lens[i], device, op, i);
    if (t.work == 0) continue;
    t.ptr[kP] = reinterpret_cast<int64_t>(p.data_ptr());
    t.ptr[kG] = reinterpret_cast<int64_t>(g.data_ptr());
    t.ptr[kM] = reinterpret_cast<int64_t>(m.data_ptr());
    t.ptr[kH] = reinterpret_cast<int64_t>(h.data_ptr());
    t.seed = sr_seeds[i];
    t.slot = 0;
    t.vec = vector_kind(t) && aligned_for_vec(p) && aligned_for_vec(g) && aligned_for_vec(m) && aligned_for_vec(h);
    groups[pc * 3 + gc].push_back(t);
  }

  const int64_t* skip_flag = nullptr;
  if (skip.numel() > 0) {
    TORCH_CHECK(skip.numel() == 1 && skip.scalar_type() == at::kLong && skip.device() == device, op,
                ": skip must be one int64 element on ", device);
    skip_flag = skip.data_ptr<int64_t>();
  }
  at::Tensor unclipped = at::zeros({1}, at::TensorOptions().dtype(at::kLong).device(device));
  auto* counts = reinterpret_cast<unsigned long long*>(unclipped.data_ptr<int64_t>());
  for (int pc = 0; pc < 3; ++pc) {
    for (int gc = 0; gc < 3; ++gc) {
      const std::vector<TensorMeta>& metas = groups[pc * 3 + gc];
      if (metas.empty()) continue;
      with_type(pc, [&](auto p_tag) {
        with_type(gc, [&](auto g_tag) {
          launch(metas, SophiaOp<decltype(p_tag), decltype(g_tag)>{s}, counts, device, skip_flag);
        });
      });
    }
  }
  return unclipped;
}

}  // namespace simu_fast
