// Shared machinery of the multi-tensor CUDA launches (the masked SophiaG ops through masked_launch.cuh:
// sophia_step.cu, hessian_ema.cu, nonfinite_check.cu; ssiuu_regularize.cu), in the style of apex's
// multi_tensor_apply: the element types, vector accesses, IEEE round-to-nearest float32 arithmetic, the
// launch table and the host-side checks of the tensors. Only inline / templated code: every .cu that
// includes it gets its own copy.
//
// The host writes a table (int64, pinned, copied non_blocking on the current stream):
//
//   table[0 .. n]               chunk_start[t]: first chunk of tensor t; chunk_start[n] = total chunks
//   table[n+1 ..]               n Meta records (each op's own struct of plain int64 fields)
//
// and launches one block per chunk; block b finds its tensor by binary search over chunk_start
// (load_chunk_meta) and handles items [c * chunk_items, min((c + 1) * chunk_items, items)) of it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>

namespace simu_fast {
namespace multi_tensor {

constexpr int kVec = 4;  // elements per thread-iteration on the vector path

// ---- element types: 16-bit floats travel as raw bits -------------------------------------------------

struct F32 {
  using T = float;
  __device__ static float to_float(T x) { return x; }
  __device__ static T from_float(float v) { return v; }
  __device__ static uint32_t nonfinite(T x) { return (__float_as_uint(x) & 0x7F800000u) == 0x7F800000u; }
};
struct BF16 {
  using T = uint16_t;
  __device__ static float to_float(T x) { return __uint_as_float(static_cast<uint32_t>(x) << 16); }
  __device__ static T from_float(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  __device__ static uint32_t nonfinite(T x) { return (x & 0x7F80u) == 0x7F80u; }
};
struct F16 {
  using T = uint16_t;
  __device__ static float to_float(T x) { return __half2float(__ushort_as_half(x)); }
  __device__ static T from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
  __device__ static uint32_t nonfinite(T x) { return (x & 0x7C00u) == 0x7C00u; }
};

// Calls fn(tag) with the element-type tag of a dtype code (0: float32, 1: bfloat16, 2: float16).
template <typename Fn>
void with_type(int code, Fn&& fn) {
  if (code == 0) fn(F32{});
  else if (code == 1) fn(BF16{});
  else fn(F16{});
}

// kVec elements in one aligned access: 128-bit for float32, 64-bit for 16-bit types.
template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};
template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* base, int64_t o) {
  return *reinterpret_cast<const Pack<T>*>(base + o);
}
template <typename T>
__device__ __forceinline__ void store_pack(T* base, int64_t o, const Pack<T>& x) {
  *reinterpret_cast<Pack<T>*>(base + o) = x;
}

inline bool aligned_for_vec(const at::Tensor& x) {
  return reinterpret_cast<uintptr_t>(x.data_ptr()) % (x.element_size() * kVec) == 0;
}

// ---- IEEE float32 arithmetic --------------------------------------------------------------------------
// The kernels must match the eager float32 reference (one rounding per torch op) exactly. nvcc contracts
// a * b + c into an FMA by default, and --use_fast_math would add flush-to-zero and approximate division,
// so the arithmetic is explicit round-to-nearest PTX that no compiler flag rewrites.

__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float add_rn(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float sub_rn(float a, float b) {
  float r;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// ---- device side ---------------------------------------------------------------------------------------

// For block `chunk`: the Meta record of its tensor and the first item of the chunk within that tensor.
// Called by one thread, which writes the results (typically to __shared__ variables) for the block.
template <typename Meta>
__device__ __forceinline__ void load_chunk_meta(const int64_t* __restrict__ table, int64_t n_tensors,
                                                int64_t chunk_items, int64_t chunk, Meta& meta, int64_t& begin) {
  // Largest t with chunk_start[t] <= chunk. Every tensor in the table has >= 1 chunk, so the starts
  // strictly increase and t is unique.
  int64_t lo = 0, hi = n_tensors - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (table[mid] <= chunk) lo = mid;
    else hi = mid - 1;
  }
  meta = reinterpret_cast<const Meta*>(table + n_tensors + 1)[lo];
  begin = (chunk - table[lo]) * chunk_items;
}

// ---- host side -----------------------------------------------------------------------------------------

// Writes the table of `metas` (non-empty; metas[t].*items > 0 items each, chunk_items per block) in pinned
// host memory and copies it to `device` on the current stream. Returns the device table; *chunks_out gets
// the number of chunks (the grid size, checked <= INT_MAX; `what` starts the error message).
template <typename Meta>
at::Tensor make_table(const std::vector<Meta>& metas, int64_t Meta::*items, int64_t chunk_items,
                      const at::Device& device, const char* what, int64_t* chunks_out) {
  static_assert(sizeof(Meta) % sizeof(int64_t) == 0, "Meta is a whole number of int64 words");
  constexpr int64_t kMetaWords = sizeof(Meta) / sizeof(int64_t);
  const int64_t n = static_cast<int64_t>(metas.size());
  const int64_t words = n + 1 + n * kMetaWords;
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* w = host.data_ptr<int64_t>();
  int64_t chunks = 0;
  for (int64_t t = 0; t < n; ++t) {
    w[t] = chunks;
    chunks += (metas[t].*items + chunk_items - 1) / chunk_items;
    std::memcpy(w + n + 1 + t * kMetaWords, &metas[t], sizeof(Meta));
  }
  w[n] = chunks;
  TORCH_CHECK(chunks <= INT_MAX, what, ": too many elements for one launch (", chunks, " chunks)");

  // Pinned source + non_blocking: the copy is queued on the current stream, and the caching host
  // allocator keeps the pinned block alive until it has run.
  at::Tensor table = at::empty({words}, at::TensorOptions().dtype(at::kLong).device(device));
  table.copy_(host, /*non_blocking=*/true);
  *chunks_out = chunks;
  return table;
}

// The dtype code of tensor i's `what` (0: float32, 1: bfloat16, 2: float16); `op` starts the error message.
inline int dtype_code(at::ScalarType t, const char* op, const char* what, size_t i) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, op, ": ", what, " ", i, " must be float32, bfloat16 or float16, got ", t);
  }
  return -1;
}

inline void check_tensor(const at::Tensor& x, const at::Device& device, int64_t numel, const char* op,
                         const char* what, size_t i) {
  TORCH_CHECK(x.device() == device, op, ": ", what, " ", i, " is on ", x.device(), ", expected ", device);
  TORCH_CHECK(x.is_contiguous(), op, ": ", what, " ", i, " must be contiguous");
  TORCH_CHECK(x.numel() == numel, op, ": ", what, " ", i, " has ", x.numel(), " elements, expected ", numel);
}

// The device of a launch: that of its first tensor, which must be a CUDA device.
inline at::Device cuda_device(const at::Tensor& first, const char* op) {
  TORCH_CHECK(first.is_cuda(), op, ": tensors must be on a CUDA device, got ", first.device());
  return first.device();
}

}  // namespace multi_tensor
}  // namespace simu_fast
