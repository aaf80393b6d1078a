// Shared by the masked SophiaG kernels on the CPU (sophia_step.cpp, hessian_ema.cpp, nonfinite_check.cpp):
// the mask of one tensor as raw pointers (MaskView, mask_view), the parallel visit of its selected elements
// (visit_selected), the dtype dispatch (dispatch_float) and the checks of the tensor lists
// (check_cpu_lists). Mask layout: simu_fast/ops/update_mask.py. Only inline / templated code: every .cpp
// that includes it gets its own copy.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "../tensor_lists.h"
#include "../update_mask.h"
#include "elements.h"

namespace simu_fast {
namespace cpu {

struct MaskView {
  int64_t kind, row_len, n_index;
  const int64_t* index;
  const uint8_t* dense;
};

inline MaskView mask_view(int64_t kind, const at::Tensor& t, int64_t row_len) {
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

inline void check_cpu_lists(const TensorList& a, const TensorList& b, const IntList& kinds, const TensorList& masks,
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

}  // namespace cpu
}  // namespace simu_fast
