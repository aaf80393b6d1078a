// simu_fast._C: one module, one function per op and device.
#include <torch/extension.h>

#include "hessian_ema.h"
#include "ig_accumulate.h"
#include "nonfinite_check.h"
#include "radix_select.h"
#include "sophia_step.h"
#include "ssiuu_regularize.h"

namespace {
bool with_cuda() {
#ifdef SIMU_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The GPU code the CUDA kernels were compiled to ("sm_90" machine code, "compute_90" PTX), set by setup.py.
std::string cuda_archs() {
#ifdef SIMU_FAST_CUDA_ARCHS
  return SIMU_FAST_CUDA_ARCHS;
#else
  return "";
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "simu_fast compiled kernels (C++ OpenMP; CUDA when built with it)";
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  m.def("cuda_archs", &cuda_archs, "comma-separated GPU targets of the CUDA kernels (sm_XY code, compute_XY PTX)");
  m.def("sophia_step_cpu", &simu_fast::sophia_step_cpu);
  m.def("hessian_ema_cpu", &simu_fast::hessian_ema_cpu);
  m.def("count_nonfinite_cpu", &simu_fast::count_nonfinite_cpu);
  m.def("ig_accumulate_cpu", &simu_fast::ig_accumulate_cpu);
  m.def("radix_histogram_cpu", &simu_fast::radix_histogram_cpu);
  m.def("select_mask_cpu", &simu_fast::select_mask_cpu);
  m.def("bracket_mask_cpu", &simu_fast::bracket_mask_cpu);
  m.def("scatter_select_cpu", &simu_fast::scatter_select_cpu);
  m.def("bracket_simd_level_cpu", &simu_fast::bracket_simd_level_cpu);
  m.def("ssiuu_regularize_cpu", &simu_fast::ssiuu_regularize_cpu);
#ifdef SIMU_FAST_WITH_CUDA
  m.def("sophia_step_cuda", &simu_fast::sophia_step_cuda);
  m.def("hessian_ema_cuda", &simu_fast::hessian_ema_cuda);
  m.def("count_nonfinite_cuda", &simu_fast::count_nonfinite_cuda);
  m.def("ig_accumulate_cuda", &simu_fast::ig_accumulate_cuda);
  m.def("radix_histogram_cuda", &simu_fast::radix_histogram_cuda);
  m.def("select_mask_cuda", &simu_fast::select_mask_cuda);
  m.def("bracket_mask_cuda", &simu_fast::bracket_mask_cuda);
  m.def("ssiuu_regularize_cuda", &simu_fast::ssiuu_regularize_cuda);
#endif
}
