// Ssiuu's attribution regularizer on the CPU: one pass over phi, g, d and a_prev per tensor, threads over
// chunks (at::parallel_for), a vectorised contiguous inner loop (with an AVX2 build chosen at run time).
// Semantics: simu_fast/ops/ssiuu_regularize.py. The float32 operations are those of the reference, in its
// order and with one rounding each (the extension is built with -ffp-contract=off), so g and a_prev match
// it bit for bit. The [a < 0] factor is multiplied, not selected, as in the reference: 0 * inf and 0 * NaN
// give NaN there too.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../ssiuu_regularize.h"

namespace simu_fast {
namespace {

constexpr int64_t kGrain = 16384;

template <typename T>
inline float load(const T* x, int64_t o) { return static_cast<float>(x[o]); }

// One element. kFirst: only a_prev = a (g is not touched, and may be null).
template <typename G, typename P, typename D, bool kFirst>
inline void ssiuu_element(G* g, const P* phi, const D* d, float* a_prev, int64_t o, float two_lam) {
  const float dv = load(d, o);
  const float a = load(phi, o) * dv;
  if (!kFirst) {
    const float negative = a < 0.f ? 1.f : 0.f;
    const float term = ((negative * (a - a_prev[o])) * dv) * two_lam;
    g[o] = static_cast<G>(load(g, o) + term);  // c10 conversions round to nearest even, as Tensor.to does
  }
  a_prev[o] = a;
}

template <typename G, typename P, typename D, bool kFirst>
__attribute__((always_inline)) inline void ssiuu_contiguous(G* g, const P* phi, const D* d, float* a_prev,
                                                            int64_t begin, int64_t end, float two_lam) {
#pragma omp simd
  for (int64_t o = begin; o < end; ++o) ssiuu_element<G, P, D, kFirst>(g, phi, d, a_prev, o, two_lam);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename G, typename P, typename D, bool kFirst>
__attribute__((target("avx2"))) void ssiuu_contiguous_avx2(G* g, const P* phi, const D* d, float* a_prev,
                                                           int64_t begin, int64_t end, float two_lam) {
  ssiuu_contiguous<G, P, D, kFirst>(g, phi, d, a_prev, begin, end, two_lam);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

template <typename G, typename P, typename D, bool kFirst>
void ssiuu_tensor(G* g, const P* phi, const D* d, float* a_prev, int64_t numel, float two_lam) {
  at::parallel_for(0, numel, kGrain, [&](int64_t b, int64_t e) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (cpu_has_avx2()) return ssiuu_contiguous_avx2<G, P, D, kFirst>(g, phi, d, a_prev, b, e, two_lam);
#endif
    ssiuu_contiguous<G, P, D, kFirst>(g, phi, d, a_prev, b, e, two_lam);
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

void ssiuu_regularize_cpu(TensorList grads, TensorList params, TensorList prob_grads, TensorList attr_prev,
                          double lam, bool first) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && prob_grads.size() == n && attr_prev.size() == n,
              "ssiuu_regularize_cpu: grads, params, prob_grads and attr_prev must have the same length (", n, ")");
  // The reference multiplies a float32 tensor by the Python float 2 * lam: torch rounds it to float32 once.
  const float two_lam = static_cast<float>(2.0 * lam);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    check_tensor(params[i], numel, "parameter", i);
    check_tensor(grads[i], numel, "gradient", i);
    check_tensor(prob_grads[i], numel, "probability gradient", i);
    check_tensor(attr_prev[i], numel, "attr_prev", i);
    TORCH_CHECK(attr_prev[i].scalar_type() == at::kFloat, "ssiuu_regularize_cpu: attr_prev ", i, " must be float32");
    if (numel == 0) continue;
    float* a_prev = attr_prev[i].data_ptr<float>();
    dispatch_float(params[i].scalar_type(), "parameter", i, [&](auto p_tag) {
      using P = decltype(p_tag);
      const P* phi = params[i].data_ptr<P>();
      dispatch_float(prob_grads[i].scalar_type(), "probability gradient", i, [&](auto d_tag) {
        using D = decltype(d_tag);
        const D* d = prob_grads[i].data_ptr<D>();
        if (first) {
          ssiuu_tensor<float, P, D, true>(nullptr, phi, d, a_prev, numel, two_lam);  // g is not read
          return;
        }
        dispatch_float(grads[i].scalar_type(), "gradient", i, [&](auto g_tag) {
          using G = decltype(g_tag);
          ssiuu_tensor<G, P, D, false>(grads[i].data_ptr<G>(), phi, d, a_prev, numel, two_lam);
        });
      });
    });
  }
}

}  // namespace simu_fast
