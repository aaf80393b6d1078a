// Ssiuu's attribution regularizer on the CPU: one pass over g, phi, d, phi_prev and d_prev per tensor,
// threads over chunks (at::parallel_for), a vectorised contiguous inner loop (with an AVX2 build chosen at
// run time). Semantics: simu_fast/ops/ssiuu_regularize.py. The float32 operations are those of the
// reference, in its order and with one rounding each (the extension is built with -ffp-contract=off), so g
// matches it bit for bit. The [a < 0] factor is multiplied, not selected, as in the reference: 0 * inf and
// 0 * NaN give NaN there too. The sign of delta is (delta > 0) - (delta < 0): NaN -> 0, -0 -> +0.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../ssiuu_regularize.h"
#include "elements.h"

namespace simu_fast {
using namespace cpu;  // kGrain, load, cpu_has_avx2

namespace {

// One element. phi_prev has phi's type P, d_prev d's type D. kSquared: s = delta, else s = sign(delta).
template <typename G, typename P, typename D, bool kSquared>
inline void ssiuu_element(G* g, const P* phi, const D* d, const P* phi_prev, const D* d_prev, int64_t o,
                          float scale) {
  const float dv = load(d, o);
  const float a = load(phi, o) * dv;
  const float a_prev = load(phi_prev, o) * load(d_prev, o);
  const float delta = a - a_prev;
  const float s = kSquared ? delta : (delta > 0.f ? 1.f : 0.f) - (delta < 0.f ? 1.f : 0.f);
  const float negative = a < 0.f ? 1.f : 0.f;
  const float term = ((negative * s) * dv) * scale;
  g[o] = static_cast<G>(load(g, o) + term);  // c10 conversions round to nearest even, as Tensor.to does
}

template <typename G, typename P, typename D, bool kSquared>
__attribute__((always_inline)) inline void ssiuu_contiguous(G* g, const P* phi, const D* d, const P* phi_prev,
                                                            const D* d_prev, int64_t begin, int64_t end,
                                                            float scale) {
#pragma omp simd
  for (int64_t o = begin; o < end; ++o) ssiuu_element<G, P, D, kSquared>(g, phi, d, phi_prev, d_prev, o, scale);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename G, typename P, typename D, bool kSquared>
__attribute__((target("avx2"))) void ssiuu_contiguous_avx2(G* g, const P* phi, const D* d, const P* phi_prev,
                                                           const D* d_prev, int64_t begin, int64_t end,
                                                           float scale) {
  ssiuu_contiguous<G, P, D, kSquared>(g, phi, d, phi_prev, d_prev, begin, end, scale);
}
#endif

template <typename G, typename P, typename D, bool kSquared>
void ssiuu_tensor(G* g, const P* phi, const D* d, const P* phi_prev, const D* d_prev, int64_t numel,
                  float scale) {
  at::parallel_for(0, numel, kGrain, [&](int64_t b, int64_t e) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx2()) return ssiuu_contiguous_avx2<G, P, D, kSquared>(g, phi, d, phi_prev, d_prev, b, e, scale);
#endif
    ssiuu_contiguous<G, P, D, kSquared>(g, phi, d, phi_prev, d_prev, b, e, scale);
  });
}

// Calls fn(T{}) with T the C++ type of a float32 / bfloat16 / float16 tensor.
template <typename Fn>
void dispatch_float(at::ScalarType t, const char* what, size_t i, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, "ssiuu_regularize_cpu: ", what, " ", i, " must be float32, bfloat16 or float16, got ", t);
  }
}

void check_tensor(const at::Tensor& x, int64_t numel, const char* what, size_t i) {
  TORCH_CHECK(x.device().is_cpu(), "ssiuu_regularize_cpu: ", what, " ", i, " is not on the CPU");
  TORCH_CHECK(x.is_contiguous(), "ssiuu_regularize_cpu: ", what, " ", i, " must be contiguous");
  TORCH_CHECK(x.numel() == numel, "ssiuu_regularize_cpu: ", what, " ", i, " has ", x.numel(),
              " elements, expected ", numel);
}

}  // namespace

void ssiuu_regularize_cpu(TensorList grads, TensorList params, TensorList prob_grads, TensorList prev_params,
                          TensorList prev_prob_grads, double lam, bool squared) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && prob_grads.size() == n && prev_params.size() == n && prev_prob_grads.size() == n,
              "ssiuu_regularize_cpu: grads, params, prob_grads, prev_params and prev_prob_grads must have the same "
              "length (", n, ")");
  // The reference rounds lam (norm) or 2 lam (squared) to float32 once.
  const float scale = static_cast<float>(squared ? 2.0 * lam : lam);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    check_tensor(params[i], numel, "parameter", i);
    check_tensor(grads[i], numel, "gradient", i);
    check_tensor(prob_grads[i], numel, "probability gradient", i);
    check_tensor(prev_params[i], numel, "previous parameter", i);
    check_tensor(prev_prob_grads[i], numel, "previous probability gradient", i);
    TORCH_CHECK(prev_params[i].scalar_type() == params[i].scalar_type(), "ssiuu_regularize_cpu: previous parameter ",
                i, " must have the parameter's dtype");
    TORCH_CHECK(prev_prob_grads[i].scalar_type() == prob_grads[i].scalar_type(),
                "ssiuu_regularize_cpu: previous probability gradient ", i,
                " must have the probability gradient's dtype");
    if (numel == 0) continue;
    dispatch_float(params[i].scalar_type(), "parameter", i, [&](auto p_tag) {
      using P = decltype(p_tag);
      const P* phi = params[i].data_ptr<P>();
      const P* phi_prev = prev_params[i].data_ptr<P>();
      dispatch_float(prob_grads[i].scalar_type(), "probability gradient", i, [&](auto d_tag) {
        using D = decltype(d_tag);
        const D* d = prob_grads[i].data_ptr<D>();
        const D* d_prev = prev_prob_grads[i].data_ptr<D>();
        dispatch_float(grads[i].scalar_type(), "gradient", i, [&](auto g_tag) {
          using G = decltype(g_tag);
          G* g = grads[i].data_ptr<G>();
          if (squared) ssiuu_tensor<G, P, D, true>(g, phi, d, phi_prev, d_prev, numel, scale);
          else ssiuu_tensor<G, P, D, false>(g, phi, d, phi_prev, d_prev, numel, scale);
        });
      });
    });
  }
}

}  // namespace simu_fast
