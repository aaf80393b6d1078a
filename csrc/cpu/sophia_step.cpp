// Masked SophiaG step, Hessian EMA and non-finite check on the CPU: one pass over the selected elements
// of p, g, m, h per parameter, threads over rows or chunks (at::parallel_for), vectorised inner loops over
// contiguous runs (whole tensors, selected rows). Semantics: simu_fast/ops/sophia_step.py.
#include <ATen/Parallel.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "../sophia_step.h"
#include "../update_mask.h"

namespace simu_fast {
namespace {

constexpr int64_t kGrain = 16384;

struct StepScalars {
  float lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, rho_bs, eps;
};

struct MaskView {
  int64_t kind, row_len, n_index;
  const int64_t* index;
  const uint8_t* dense;
};

MaskView mask_view(int64_t kind, const at::Tensor& t, int64_t row_len) {
  MaskView v{kind, row_len, 0, nullptr, nullptr};
  if (kind == kRows || kind == kCols) {
    TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous(), "mask index must be a contiguous int64 tensor");
    v.index = t.data_ptr<int64_t>();
    v.n_index = t.numel();
  } else if (kind == kDense) {
    TORCH_CHECK(t.scalar_type() == at::kByte && t.is_contiguous(), "dense mask must be a contiguous uint8 tensor");
    v.dense = t.data_ptr<uint8_t>();
  }
  return v;
}

template <typename T>
inline float load(const T* x, int64_t o) { return static_cast<float>(x[o]); }

inline int64_t nonfinite_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x7f800000u) == 0x7f800000u ? 1 : 0;
}

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

// Visits the selected elements of one tensor in parallel: contiguous runs (FULL: everything; ROWS: each
// selected row) go to range(begin, end), single elements (COLS, DENSE) to single(offset). No division per
// element: ROWS and COLS walk rows and index lists directly. Returns the sum of what the callbacks return.
template <typename Range, typename Single>
int64_t visit_selected(const MaskView& mv, int64_t numel, Range&& range, Single&& single) {
  std::atomic<int64_t> total{0};
  if (mv.kind == kFull) {
    at::parallel_for(0, numel, kGrain, [&](int64_t b, int64_t e) { total += range(b, e); });
  } else if (mv.kind == kRows) {
    const int64_t grain = std::max<int64_t>(1, kGrain / mv.row_len);
    at::parallel_for(0, mv.n_index, grain, [&](int64_t b, int64_t e) {
      int64_t local = 0;
      for (int64_t r = b; r < e; ++r) local += range(mv.index[r] * mv.row_len, (mv.index[r] + 1) * mv.row_len);
      total += local;
    });
  } else if (mv.kind == kCols) {
    const int64_t rows = numel / mv.row_len;
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, mv.n_index));
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      int64_t local = 0;
      for (int64_t r = b; r < e; ++r)
        for (int64_t j = 0; j < mv.n_index; ++j) local += single(r * mv.row_len + mv.index[j]);
      total += local;
    });
  } else {
    at::parallel_for(0, numel, kGrain, [&](int64_t b, int64_t e) {
      int64_t local = 0;
      for (int64_t o = b; o < e; ++o)
        if (mv.dense[o]) local += single(o);
      total += local;
    });
  }
  return total.load();
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

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
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

// Calls fn.template operator()<T>() with T the C++ type of a float32 / bfloat16 / float16 tensor.
template <typename Fn>
auto dispatch_float(at::ScalarType t, const char* what, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", t);
  }
}

void check_cpu_lists(const TensorList& a, const TensorList& b, const IntList& kinds, const TensorList& masks,
                     const IntList& row_lens, const char* op) {
  const size_t n = a.size();
  TORCH_CHECK(b.size() == n && kinds.size() == n && masks.size() == n && row_lens.size() == n, op,
              ": list lengths differ");
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(a[i].device().is_cpu() && b[i].device().is_cpu(), op, ": tensor ", i, " is not on the CPU");
    TORCH_CHECK(a[i].is_contiguous() && b[i].is_contiguous(), op, ": tensor ", i, " is not contiguous");
    TORCH_CHECK(a[i].numel() == b[i].numel(), op, ": tensor ", i, " sizes differ");
    TORCH_CHECK(row_lens[i] > 0, op, ": row length of tensor ", i, " must be positive");
  }
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

void hessian_ema_cpu(TensorList hessians, TensorList grads, IntList kinds, TensorList mask_tensors,
                     IntList row_lens, double beta2) {
  check_cpu_lists(hessians, grads, kinds, mask_tensors, row_lens, "hessian_ema_cpu");
  const float b2 = static_cast<float>(beta2), omb2 = static_cast<float>(1.0 - beta2);
  for (size_t i = 0; i < hessians.size(); ++i) {
    TORCH_CHECK(hessians[i].scalar_type() == at::kFloat, "hessian_ema_cpu: hessian must be float32");
    const MaskView mv = mask_view(kinds[i], mask_tensors[i], row_lens[i]);
    float* h = hessians[i].data_ptr<float>();
    dispatch_float(grads[i].scalar_type(), "gradient", [&](auto g_tag) {
      using G = decltype(g_tag);
      const G* g = grads[i].data_ptr<G>();
      auto single = [&](int64_t o) -> int64_t {
        const float gv = load(g, o);
        h[o] = h[o] * b2 + (gv * gv) * omb2;
        return 0;
      };
      auto range = [&](int64_t b, int64_t e) -> int64_t {
#pragma omp simd
        for (int64_t o = b; o < e; ++o) single(o);
        return 0;
      };
      return visit_selected(mv, hessians[i].numel(), range, single);
    });
  }
}

// The raw bits of a float32 / bfloat16 / float16 and the exponent mask that marks inf and NaN.
template <typename G> struct FloatBits;
template <> struct FloatBits<float> { using U = uint32_t; static constexpr U kExp = 0x7f800000u; };
template <> struct FloatBits<c10::BFloat16> { using U = uint16_t; static constexpr U kExp = 0x7f80u; };
template <> struct FloatBits<c10::Half> { using U = uint16_t; static constexpr U kExp = 0x7c00u; };

template <typename G>
__attribute__((always_inline)) inline int64_t count_nonfinite_bits(const G* g, int64_t begin, int64_t end) {
  using U = typename FloatBits<G>::U;
  constexpr U kExp = FloatBits<G>::kExp;
  const U* __restrict__ u = reinterpret_cast<const U*>(g);
  int64_t total = 0;
  for (int64_t block = begin; block < end; block += (int64_t{1} << 30)) {  // int32 counts never overflow
    const int64_t stop = std::min(end, block + (int64_t{1} << 30));
    int32_t local = 0;
#pragma omp simd reduction(+ : local)
    for (int64_t o = block; o < stop; ++o) local += (u[o] & kExp) == kExp;
    total += local;
  }
  return total;
}

template <typename G>
int64_t count_nonfinite_contiguous(const G* g, int64_t begin, int64_t end) {
  return count_nonfinite_bits(g, begin, end);
}

template <typename G>
__attribute__((target("avx2"))) int64_t count_nonfinite_contiguous_avx2(const G* g, int64_t begin, int64_t end) {
  return count_nonfinite_bits(g, begin, end);
}

at::Tensor count_nonfinite_cpu(TensorList grads, IntList kinds, TensorList mask_tensors, IntList row_lens) {
  check_cpu_lists(grads, grads, kinds, mask_tensors, row_lens, "count_nonfinite_cpu");
  at::Tensor out = at::zeros({static_cast<int64_t>(grads.size())}, at::TensorOptions().dtype(at::kLong));
  int64_t* counts = out.data_ptr<int64_t>();
  for (size_t i = 0; i < grads.size(); ++i) {
    const MaskView mv = mask_view(kinds[i], mask_tensors[i], row_lens[i]);
    counts[i] = dispatch_float(grads[i].scalar_type(), "gradient", [&](auto g_tag) {
      using G = decltype(g_tag);
      const G* g = grads[i].data_ptr<G>();
      // exponent bits all ones <=> inf or NaN: integer compares on the raw bits vectorise where
      // std::isfinite does not
      auto single = [&](int64_t o) -> int64_t { return nonfinite_bits(load(g, o)); };
      auto range = [&](int64_t b, int64_t e) -> int64_t {
        return cpu_has_avx2() ? count_nonfinite_contiguous_avx2(g, b, e) : count_nonfinite_contiguous(g, b, e);
      };
      return visit_selected(mv, grads[i].numel(), range, single);
    });
  }
  return out;
}

}  // namespace simu_fast
