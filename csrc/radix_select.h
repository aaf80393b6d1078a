// Radix select kernels (exact top-k): declarations and the key transform shared by the CPU and CUDA
// implementations and the bindings. Semantics: simu_fast/ops/radix_select.py (reference_keys,
// reference_radix_histogram, reference_select_mask).
//
//   radix_histogram(x, absolute, mode, key_prefix, prefix_bits, shift, index_offset, key_equal)
//     -> int64 [257] on x's device. mode KEYS (0): bins 0..255 count the 8-bit digit at `shift` of the keys
//        of the non-NaN elements whose key bits above the digit equal key_prefix's (when prefix_bits > 0);
//        bin 256 counts the NaN elements. mode INDICES (1): bins 0..255 count the digit at `shift` of the
//        global index (index_offset + flat i) of the elements whose key == key_equal, with the same prefix
//        rule applied to the index; bin 256 is 0.
//   select_mask(x, absolute, kth_key, index_cutoff, index_offset)
//     -> uint8 [numel]: 1 where key > kth_key or (key == kth_key and index_offset + i <= index_cutoff).
//   bracket_mask(x, absolute, lo_key, hi_key, capacity) -> (uint8 [numel], int64 index, values, int64 [3])
//     one pass for a top-k whose k-th key is expected in [lo_key, hi_key] (0 <= lo_key <= hi_key < 2^bits):
//     the mask is 1 where the element is not NaN and key > hi_key, else 0; counts = (elements above hi_key,
//     candidates, NaN elements), the candidates being the non-NaN elements with lo_key <= key <= hi_key. The
//     candidates' flat indices and values (x's dtype) fill the first min(candidates, capacity) entries of
//     index and values (in ascending index order on the CPU, in any order on CUDA; the tensors may be longer).
//   bracket_mask_cpu takes two more arguments. block_counts: true adds a fifth output, int32
//     [ceil(numel / kBracketCountBlock)], the candidates in each run of kBracketCountBlock elements (flat
//     index / kBracketCountBlock); false adds an empty one. mask_mode: 0 returns an empty mask (the counts and
//     lists unchanged), 1 the mask above, 2 the mask above with 2 at every candidate (the tied top-k's cut-off
//     then needs only the mask bytes: radix_select.py, _topk_by_bracket). simd: the block routine, -1 the
//     widest this CPU runs (bracket_simd_level_cpu), 0 the portable loop, 1 AVX2, 2 AVX-512 (same results;
//     the tests run each). The CUDA kernel has none of these.
//
// x: contiguous float32 / bfloat16 / float16, any numel (int64 indexing). Keys are 32-bit for float32 and
// 16-bit for the 16-bit types: ascending key == ascending value, -0.0 folded onto +0.0 (see radix_key).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "update_mask.h"  // SF_HD

namespace simu_fast {

enum RadixMode : int64_t { kRadixKeys = 0, kRadixIndices = 1 };

constexpr uint32_t kRadixNanBin = 256;   // NaN count (mode KEYS)
constexpr uint32_t kRadixSkipBin = 257;  // an element that is not counted (never stored)

// Bit layouts of the value types: the elements are read as raw unsigned bits.
struct RadixF32 {
  using Bits = uint32_t;
  static constexpr uint32_t kSign = 0x80000000u, kInf = 0x7F800000u;
};
struct RadixBF16 {
  using Bits = uint16_t;
  static constexpr uint32_t kSign = 0x8000u, kInf = 0x7F80u;
};
struct RadixF16 {
  using Bits = uint16_t;
  static constexpr uint32_t kSign = 0x8000u, kInf = 0x7C00u;
};

// The order-preserving key of raw bits (zero-extended to 32 bits; sign = the type's sign bit), exactly as
// reference_keys: |x| first when absolute (clearing the sign bit, so NaN stays NaN), -0.0 -> +0.0, then
// negative values are bit-inverted and non-negative ones get the sign bit set.
SF_HD uint32_t radix_key(uint32_t raw, uint32_t sign, bool absolute) {
  raw &= absolute ? sign - 1u : ~0u;
  raw = raw == sign ? 0u : raw;
  const uint32_t full = sign | (sign - 1u);
  return (raw & sign) ? (raw ^ full) : (raw | sign);
}

SF_HD bool radix_is_nan(uint32_t raw, uint32_t sign, uint32_t inf) { return (raw & (sign - 1u)) > inf; }

// The histogram arguments turned into masks, so the kernels test (value & mask) == target with no shift by
// a variable count >= the word width: (v >> h) == (p >> h) <=> (v & (~0 << h)) == (p & (~0 << h)) for the
// two's-complement bits of v and p and h < 64 (h >= 64 compares 0 with 0 for non-negative values).
struct RadixHistogramPlan {
  bool nothing;  // no element can be counted (mode INDICES, key_equal outside the key range)
  bool absolute;
  // mode KEYS: counted iff not NaN and (key & key_mask) == key_target; digit = (key >> key_shift) & key_digit
  uint32_t key_mask, key_target, key_shift, key_digit;
  // mode INDICES: counted iff key == key_equal and (index & index_mask) == index_target;
  // digit = (index >> index_shift) & index_digit (arithmetic shift, as torch's on int64)
  uint32_t key_equal;
  uint64_t index_mask, index_target;
  int64_t index_offset;
  uint32_t index_shift;
  int64_t index_digit;
};

inline RadixHistogramPlan radix_histogram_plan(int key_bits, bool absolute, int64_t mode, int64_t key_prefix,
                                               int64_t prefix_bits, int64_t shift, int64_t index_offset,
                                               int64_t key_equal) {
  RadixHistogramPlan p{};
  p.absolute = absolute;
  p.index_offset = index_offset;
  const int64_t high = shift + 8;
  const uint64_t mask = (prefix_bits > 0 && high < 64) ? (~uint64_t{0} << high) : uint64_t{0};
  const uint64_t target = static_cast<uint64_t>(key_prefix) & mask;
  const uint64_t full = (uint64_t{1} << key_bits) - 1u;
  if (mode == kRadixKeys) {
    if (target >> 32) {  // the prefix has bits above any 32-bit key: nothing matches (NaN still counted)
      p.key_mask = 0u;
      p.key_target = 1u;
    } else {
      p.key_mask = static_cast<uint32_t>(mask);
      p.key_target = static_cast<uint32_t>(target);
    }
    p.key_shift = shift < 32 ? static_cast<uint32_t>(shift) : 0u;
    p.key_digit = shift < 32 ? 0xFFu : 0u;
  } else {
    p.nothing = key_equal < 0 || static_cast<uint64_t>(key_equal) > full;
    p.key_equal = p.nothing ? 0u : static_cast<uint32_t>(key_equal);
    p.index_mask = mask;
    p.index_target = target;
    p.index_shift = static_cast<uint32_t>(shift < 63 ? shift : 63);
    p.index_digit = 0xFF;
  }
  return p;
}

// Mode INDICES: the local flat indices [first, end) of x (numel elements) whose global index passes the prefix
// test. (index & mask) == target holds on one interval of indices, [target, target + ~mask] (target has no
// bits below the mask, so the interval stays within one sign half). Returns false when it is empty.
inline bool radix_index_window(const RadixHistogramPlan& p, int64_t numel, int64_t& first, int64_t& end) {
  first = 0;
  end = numel;
  if (p.index_mask != 0) {
    const int64_t lo = static_cast<int64_t>(p.index_target);
    const int64_t hi = lo + static_cast<int64_t>(~p.index_mask);
    const int64_t off = p.index_offset;
    // lo - off and hi - off, saturated to the int64 range
    auto sub = [](int64_t a, int64_t b) {
      if (b > 0 && a < INT64_MIN + b) return INT64_MIN;
      if (b < 0 && a > INT64_MAX + b) return INT64_MAX;
      return a - b;
    };
    const int64_t local_lo = sub(lo, off), local_hi = sub(hi, off);
    first = local_lo > 0 ? local_lo : 0;
    end = local_hi < numel - 1 ? local_hi + 1 : numel;
  }
  return first < end;
}

// select_mask arguments in the key range: selected iff key > kth or (key == kth and i <= cut), with i the
// local flat index. Out-of-range kth_key / index_cutoff are folded into the same test.
struct RadixSelectPlan {
  uint32_t kth;
  int64_t cut;  // in [-1, numel - 1]
};

inline RadixSelectPlan radix_select_plan(int key_bits, int64_t kth_key, int64_t index_cutoff, int64_t index_offset,
                                         int64_t numel) {
  const int64_t full = (int64_t{1} << key_bits) - 1;
  if (kth_key < 0) return {0u, numel - 1};                  // every key > kth_key
  if (kth_key > full) return {static_cast<uint32_t>(full), -1};  // no key >= kth_key
  // index_offset + i <= index_cutoff  <=>  i <= index_cutoff - index_offset (saturating)
  int64_t cut;
  if (index_offset >= 0) {
    cut = index_cutoff < INT64_MIN + index_offset ? -1 : index_cutoff - index_offset;
  } else {
    cut = index_cutoff > INT64_MAX + index_offset ? INT64_MAX : index_cutoff - index_offset;
  }
  cut = cut < -1 ? -1 : (cut > numel - 1 ? numel - 1 : cut);
  return {static_cast<uint32_t>(kth_key), cut};
}

// The key width of x's dtype: 32 bits for float32, 16 for bfloat16 and float16 (`op` starts the error
// message for any other dtype).
inline int radix_key_bits(const at::Tensor& x, const char* op) {
  switch (x.scalar_type()) {
    case at::kFloat: return 32;
    case at::kBFloat16:
    case at::kHalf: return 16;
    default: TORCH_CHECK(false, op, ": x must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return 0;
}

// bracket_mask's keys checked against the key width (`op` starts the message).
inline void check_bracket(int key_bits, int64_t lo_key, int64_t hi_key, int64_t capacity, const char* op) {
  const int64_t full = (int64_t{1} << key_bits) - 1;
  TORCH_CHECK(0 <= lo_key && lo_key <= hi_key && hi_key <= full, op, ": need 0 <= lo_key <= hi_key <= ", full,
              ", got lo_key=", lo_key, ", hi_key=", hi_key);
  TORCH_CHECK(capacity >= 0, op, ": capacity must be >= 0, got ", capacity);
}

at::Tensor radix_histogram_cpu(at::Tensor x, bool absolute, int64_t mode, int64_t key_prefix, int64_t prefix_bits,
                               int64_t shift, int64_t index_offset, int64_t key_equal);
at::Tensor select_mask_cpu(at::Tensor x, bool absolute, int64_t kth_key, int64_t index_cutoff, int64_t index_offset);
// out[positions[i]] = select_mask(values, absolute, kth_key, index_cutoff, 0)[i] (out: x's uint8 / bool mask, positions
// distinct): a top-k's candidates written into its mask in one pass over them, no temporary, no index_put.
void scatter_select_cpu(at::Tensor values, bool absolute, int64_t kth_key, int64_t index_cutoff, at::Tensor out,
                        at::Tensor positions);
constexpr int64_t kBracketCountBlock = 1024;  // radix_select.py's COUNT_BLOCK
enum BracketMaskMode : int64_t { kBracketNoMask = 0, kBracketMaskAbove = 1, kBracketMarkInside = 2 };
std::vector<at::Tensor> bracket_mask_cpu(at::Tensor x, bool absolute, int64_t lo_key, int64_t hi_key,
                                         int64_t capacity, bool block_counts, int64_t mask_mode, int64_t simd);
int64_t bracket_simd_level_cpu();  // the widest block routine of the bracket pass here: 0 portable, 1 avx2, 2 avx512

#ifdef SIMU_FAST_WITH_CUDA
at::Tensor radix_histogram_cuda(at::Tensor x, bool absolute, int64_t mode, int64_t key_prefix, int64_t prefix_bits,
                                int64_t shift, int64_t index_offset, int64_t key_equal);
at::Tensor select_mask_cuda(at::Tensor x, bool absolute, int64_t kth_key, int64_t index_cutoff,
                            int64_t index_offset);
std::vector<at::Tensor> bracket_mask_cuda(at::Tensor x, bool absolute, int64_t lo_key, int64_t hi_key,
                                          int64_t capacity);
#endif

}  // namespace simu_fast
