// Masked Hessian EMA of SophiaG on the CPU: h <- beta2 * h + (1 - beta2) * g^2 on the selected elements,
// threads over rows or chunks (at::parallel_for), vectorised inner loops over contiguous runs. Semantics:
// simu_fast/ops/hessian_ema.py. The mask walk, dtype dispatch and list checks: masked_elements.h.
#include "../hessian_ema.h"
#include "masked_elements.h"

namespace simu_fast {
using namespace cpu;  // load, MaskView, mask_view, visit_selected, dispatch_float, check_cpu_lists

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

}  // namespace simu_fast
