// Shared by the CPU and CUDA kernels: the mask layout of simu_fast/ops/update_mask.py and the
// stochastic-rounding hash of simu_fast/ops/stochastic_rounding.py. Bit-identical on every backend.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SF_HD __host__ __device__ __forceinline__
#else
#define SF_HD inline
#endif

namespace simu_fast {

enum MaskKind : int64_t { kFull = 0, kRows = 1, kCols = 2, kDense = 3 };

// Work item e (0 <= e < work_items) -> flat element offset of the parameter.
SF_HD int64_t work_offset(int64_t kind, int64_t e, const int64_t* index, int64_t n_index, int64_t row_len) {
  if (kind == kRows) return index[e / row_len] * row_len + e % row_len;
  if (kind == kCols) return (e / n_index) * row_len + index[e % n_index];
  return e;
}

SF_HD int64_t work_items(int64_t kind, int64_t numel, int64_t n_index, int64_t row_len) {
  if (kind == kRows) return n_index * row_len;
  if (kind == kCols) return (numel / row_len) * n_index;
  return numel;
}

SF_HD uint32_t hash32(uint64_t offset, uint32_t seed) {
  uint32_t x = static_cast<uint32_t>(offset) ^ ((seed ^ static_cast<uint32_t>(offset >> 32)) * 0x9E3779B9u);
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// float32 -> bfloat16 bits, rounding up with probability equal to the discarded fraction.
SF_HD uint16_t bf16_bits_stochastic(float v, uint64_t offset, uint32_t seed) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(v);
#else
  std::memcpy(&bits, &v, sizeof(bits));
#endif
  if ((bits & 0x7F800000u) == 0x7F800000u) {  // inf / NaN: no noise (it would carry into the sign bit)
    return (bits & 0x007FFFFFu) ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(bits >> 16);
  }
  bits += hash32(offset, seed) & 0xFFFFu;
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace simu_fast
