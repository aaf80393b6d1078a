// Masked SophiaG step on the CPU: one pass over the selected elements of p, g, m, h per parameter, threads
// over rows or chunks (at::parallel_for), vectorised inner loops over contiguous runs (whole tensors,
// selected rows). Semantics: simu_fast/ops/sophia_step.py. The mask walk, dtype dispatch and list checks
// shared with hessian_ema.cpp and nonfinite_check.cpp: masked_elements.h.
#include <ATen/ops/full.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <type_traits>

#include "../sophia_step.h"
#include "../update_mask.h"
#include "masked_elements.h"

namespace simu_fast {
using namespace cpu;  // kGrain, load, cpu_has_avx2, MaskView, mask_view, visit_selected, dispatch_float, ...

namespace {

struct StepScalars {
  float lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, rho_bs, eps;
};

template <typename P>
inline void store(P* p, int64_t o, float v, int64_t seed) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    if (seed >= 0) {
      p[o] = c10::BFloat16(bf16_bits_stochastic(v, static_cast<uint64_t>(o), static_cast<uint32_t>(seed)),
                           c10::BFloat16::from_bits());
      return;
    }
  }
  p[o] = static_cast<P>(v);
}

// One element of the step; returns 1 when the update was not clipped (q < 1).
template <typename P, typename G, bool kMaximize, bool kUpdateHessian>
inline int64_t step_element(P* p, const G* g, float* m, float* h, int64_t o, const StepScalars& s, int64_t seed) {
  float gv = load(g, o);
  if (kMaximize) gv = -gv;
  float hv = h[o];
  if (kUpdateHessian) {
    hv = hv * s.beta2 + (gv * gv) * s.one_minus_beta2;
    h[o] = hv;
  }
  const float mv = m[o] * s.beta1 + gv * s.one_minus_beta1;
  m[o] = mv;
  const float q = std::fabs(mv) / (hv * s.rho_bs + s.eps);
  const float sign = static_cast<float>((mv > 0.f) - (mv < 0.f));
  const float clipped = q > 1.f ? 1.f : q;  // NaN passes through (torch.clamp semantics), fmin would hide it
  const float pv = load(p, o) * s.decay - sign * clipped * s.lr;
  store(p, o, pv, seed);
  return q < 1.f ? 1 : 0;
}

// The contiguous hot loop (vectorised). Inlined into a default build and into an AVX2 build chosen at
// run time, so one binary runs everywhere and uses 256-bit vectors where the CPU has them.
template <typename P, typename G, bool kMaximize, bool kUpdateHessian>
__attribute__((always_inline)) inline int64_t step_contiguous(P* __restrict__ p, const G* __restrict__ g,
                                                              float* __restrict__ m, float* __restrict__ h,
                                                              int64_t begin, int64_t end, const StepScalars s_ref,
                                                              int64_t seed) {
  // Scalars by value and restrict pointers: the compiler may keep them in registers and vectorise
  // (otherwise it must assume the stores to m and h could change them).
  const StepScalars s = s_ref;
  int64_t local = 0;
#pragma omp simd reduction(+ : local)
  for (int64_t o = begin; o < end; ++o) local += step_element<P, G, kMaximize, kUpdateHessian>(p, g, m, h, o, s, seed);
  return local;
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename P, typename G, bool kMaximize, bool kUpdateHessian>
__attribute__((target("avx2"))) int64_t step_contiguous_avx2(P* p, const G* g, float* m, float* h, int64_t begin,
                                                             int64_t end, const StepScalars& s, int64_t seed) {
  return step_contiguous<P, G, kMaximize, kUpdateHessian>(p, g, m, h, begin, end, s, seed);
}
#endif

template <typename P, typename G, bool kMaximize, bool kUpdateHessian>
int64_t step_tensor(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                    const at::Tensor& hessian, const MaskView& mv, const StepScalars& s, int64_t seed) {
  P* p = param.data_ptr<P>();
  const G* g = grad.data_ptr<G>();
  float* m = exp_avg.data_ptr<float>();
  float* h = hessian.data_ptr<float>();
  auto range = [&](int64_t b, int64_t e) -> int64_t {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx2()) return step_contiguous_avx2<P, G, kMaximize, kUpdateHessian>(p, g, m, h, b, e, s, seed);
#endif
    return step_contiguous<P, G, kMaximize, kUpdateHessian>(p, g, m, h, b, e, s, seed);
  };
  auto single = [&](int64_t o) -> int64_t { return step_element<P, G, kMaximize, kUpdateHessian>(p, g, m, h, o, s, seed); };
  return visit_selected(mv, param.numel(), range, single);
}

template <typename P, typename G>
int64_t step_dispatch_flags(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& h,
                            const MaskView& mv, const StepScalars& s, int64_t seed, bool maximize, bool update_h) {
  if (maximize) {
    return update_h ? step_tensor<P, G, true, true>(p, g, m, h, mv, s, seed)
                    : step_tensor<P, G, true, false>(p, g, m, h, mv, s, seed);
  }
  return update_h ? step_tensor<P, G, false, true>(p, g, m, h, mv, s, seed)
                  : step_tensor<P, G, false, false>(p, g, m, h, mv, s, seed);
}

}  // namespace

at::Tensor sophia_step_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList hessians,
                           IntList kinds, TensorList mask_tensors, IntList row_lens, double lr, double decay,
                           double beta1, double hessian_beta2, double rho_bs, double eps, bool maximize,
                           IntList sr_seeds) {
  check_cpu_lists(params, grads, kinds, mask_tensors, row_lens, "sophia_step_cpu");
  TORCH_CHECK(exp_avgs.size() == params.size() && hessians.size() == params.size() && sr_seeds.size() == params.size(),
              "sophia_step_cpu: list lengths differ");
  const bool update_h = hessian_beta2 >= 0.0;
  const StepScalars s{static_cast<float>(lr),     static_cast<float>(decay),
                      static_cast<float>(beta1),  static_cast<float>(1.0 - beta1),
                      static_cast<float>(update_h ? hessian_beta2 : 0.0),
                      static_cast<float>(update_h ? 1.0 - hessian_beta2 : 0.0),
                      static_cast<float>(rho_bs), static_cast<float>(eps)};
  int64_t unclipped = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(exp_avgs[i].scalar_type() == at::kFloat && hessians[i].scalar_type() == at::kFloat,
                "sophia_step_cpu: exp_avg and hessian must be float32");
    TORCH_CHECK(exp_avgs[i].is_contiguous() && hessians[i].is_contiguous() &&
                    exp_avgs[i].numel() == params[i].numel() && hessians[i].numel() == params[i].numel(),
                "sophia_step_cpu: state of tensor ", i, " must be contiguous and sized like its parameter");
    const MaskView mv = mask_view(kinds[i], mask_tensors[i], row_lens[i]);
    unclipped += dispatch_float(params[i].scalar_type(), "parameter", [&](auto p_tag) {
      using P = decltype(p_tag);
      return dispatch_float(grads[i].scalar_type(), "gradient", [&](auto g_tag) {
        using G = decltype(g_tag);
        return step_dispatch_flags<P, G>(params[i], grads[i], exp_avgs[i], hessians[i], mv, s, sr_seeds[i], maximize,
                                         update_h);
      });
    });
  }
  return at::full({1}, unclipped, at::TensorOptions().dtype(at::kLong));
}

}  // namespace simu_fast
