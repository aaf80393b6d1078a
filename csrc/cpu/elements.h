// Helpers shared by the CPU kernels' element loops (sophia_step.cpp, hessian_ema.cpp, nonfinite_check.cpp,
// ssiuu_regularize.cpp): the parallel grain, the widening load of a float32 / bfloat16 / float16 element and
// the run-time AVX2 check. Only inline / templated code: every .cpp that includes it gets its own copy.
#pragma once
#include <cstdint>

namespace simu_fast {
namespace cpu {

constexpr int64_t kGrain = 16384;

template <typename T>
inline float load(const T* x, int64_t o) { return static_cast<float>(x[o]); }

#if defined(__x86_64__) && defined(__GNUC__)
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

}  // namespace cpu
}  // namespace simu_fast
