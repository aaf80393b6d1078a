// The multi-tensor launch of the masked SophiaG ops on CUDA (sophia_step.cu, hessian_ema.cu,
// nonfinite_check.cu): the TensorMeta record, the kernel that runs an op's element functions over the
// selected elements of every tensor of a launch, launch<Op>, and the host-side checks and mask records.
// Mask layout: simu_fast/ops/update_mask.py. Only inline / templated code: every .cu that includes it gets
// its own copy.
//
// Multi-tensor launches in the style of apex's multi_tensor_apply: one launch per dtype group (param dtype x
// grad dtype for the step, grad dtype for the others) updates every tensor of the group. The host writes a
// table (int64, pinned, copied non_blocking on the current stream):
//
//   table[0 .. n]               chunk_start[t]: first chunk of tensor t; chunk_start[n] = total chunks
//   table[n+1 ..]               n TensorMeta records (pointers, sizes, mask, seed, ...)
//
// Block b handles chunk b: it finds its tensor by binary search over chunk_start and visits work items
// [c * kChunk, min((c + 1) * kChunk, work)) of it, where work item e is the flat element
// work_offset(kind, e, ...). ROWS / COLS masks therefore only visit the selected elements; FULL and DENSE
// visit all of them (DENSE skips those whose mask byte is 0).
//
// An op is a struct with `static constexpr bool kCounts` (whether the kernel sums what its element
// functions return into counts[slot]) and two element functions: one(t, o) handles flat element o of
// tensor t, four(t, o) elements o..o+3 (only called where TensorMeta::vec is set).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "../tensor_lists.h"
#include "../update_mask.h"
#include "multi_tensor.cuh"

namespace simu_fast {
namespace masked_launch {

// F32 / BF16 / F16, with_type, kVec (4 elements per thread-iteration on the vector path), Pack, load_pack,
// store_pack, aligned_for_vec; mul_rn ...; the table: make_table (host), load_chunk_meta (device); the
// checks dtype_code, check_tensor, cuda_device.
using namespace multi_tensor;

constexpr int kThreads = 512;                       // threads per block (multiple of 32)
constexpr int64_t kChunk = 64 * 1024;               // work items per block; a multiple of kVec, so every chunk
static_assert(kChunk % kVec == 0, "chunks must start on a vector boundary");  // starts on a vector boundary
static_assert(sizeof(unsigned long long) == sizeof(int64_t), "counts are int64 tensors updated by atomicAdd");

// Pointer slots of TensorMeta::ptr.
enum : int { kP = 0, kG = 1, kM = 2, kH = 3 };

// One tensor of a launch. Plain int64 fields so the host can memcpy it into the int64 table.
struct TensorMeta {
  int64_t ptr[4];  // param, grad, exp_avg, hessian (unused slots are 0)
  int64_t kind, row_len, n_index;
  int64_t mask;    // const int64_t* index (ROWS / COLS), const uint8_t* dense (DENSE), 0 (FULL)
  int64_t work;    // work items (> 0: tensors without work are left out of the table)
  int64_t seed;    // stochastic-rounding seed for bfloat16 params; < 0: round to nearest
  int64_t slot;    // counts[slot] receives this tensor's count
  int64_t vec;     // 1: work items 4k..4k+3 are 4 contiguous elements and every pointer allows a 4-wide access
  int64_t pad[4];
};
static_assert(sizeof(TensorMeta) == 16 * sizeof(int64_t), "TensorMeta is 16 int64 words");

// ---- the multi-tensor kernel ---------------------------------------------------------------------------

// Sum over the block; the result is valid in thread 0. Every thread of the block must call it (threads
// without work contribute 0), since it synchronises.
__device__ __forceinline__ uint32_t block_sum(uint32_t v) {
  __shared__ uint32_t warp_sums[kThreads / 32];
  for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, d);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0;
  if (warp == 0) {
    if (lane < kThreads / 32) v = warp_sums[lane];
    for (int d = 16; d > 0; d >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, d);
  }
  return v;
}

template <typename Op>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const int64_t* __restrict__ table, int64_t n_tensors, Op op, unsigned long long* counts,
                        const int64_t* __restrict__ skip) {
  // A non-zero device flag (set by an earlier kernel, as apex's noop_flag): the whole launch does nothing.
  // Every thread of the block reads the same value, so returning here cannot split a __syncthreads.
  if (skip != nullptr && *skip != 0) return;
  __shared__ TensorMeta meta_s;
  __shared__ int64_t begin_s;
  if (threadIdx.x == 0) multi_tensor::load_chunk_meta(table, n_tensors, kChunk, blockIdx.x, meta_s, begin_s);
  __syncthreads();
  const TensorMeta t = meta_s;
  const int64_t begin = begin_s;
  const int64_t end = begin + kChunk < t.work ? begin + kChunk : t.work;
  const auto* index = reinterpret_cast<const int64_t*>(t.mask);
  const auto* dense = reinterpret_cast<const uint8_t*>(t.mask);

  uint32_t count = 0;  // at most kChunk per block: fits
  int64_t scalar_begin = begin;
  if (t.vec) {
    // begin is a multiple of kVec (kChunk is), so each group of 4 work items starts an aligned run of 4
    // contiguous elements (FULL, or ROWS with row_len % 4 == 0). A ragged end (FULL only) goes below.
    const int64_t n_vec = (end - begin) / kVec;
    for (int64_t v = threadIdx.x; v < n_vec; v += kThreads)
      count += op.four(t, work_offset(t.kind, begin + v * kVec, index, t.n_index, t.row_len));
    scalar_begin = begin + n_vec * kVec;
  }
  for (int64_t e = scalar_begin + threadIdx.x; e < end; e += kThreads) {
    const int64_t o = work_offset(t.kind, e, index, t.n_index, t.row_len);
    if (t.kind == kDense && dense[o] == 0) continue;
    count += op.one(t, o);
  }

  if constexpr (Op::kCounts) {
    const uint32_t total = block_sum(count);
    if (threadIdx.x == 0 && total != 0) atomicAdd(counts + t.slot, static_cast<unsigned long long>(total));
  }
}

// ---- host side -----------------------------------------------------------------------------------------

// Writes the table, copies it to the device and launches one block per chunk on the current stream. skip: a
// device int64 flag, or nullptr (see multi_tensor_kernel).
template <typename Op>
void launch(const std::vector<TensorMeta>& metas, const Op& op, unsigned long long* counts, const at::Device& device,
            const int64_t* skip = nullptr) {
  if (metas.empty()) return;
  const int64_t n = static_cast<int64_t>(metas.size());
  int64_t chunks = 0;
  const at::Tensor table = multi_tensor::make_table(metas, &TensorMeta::work, kChunk, device, "simu_fast", &chunks);
  multi_tensor_kernel<Op><<<static_cast<unsigned int>(chunks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      table.data_ptr<int64_t>(), n, op, counts, skip);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline void check_lengths(size_t n, const IntList& kinds, const TensorList& masks, const IntList& row_lens,
                          const char* op) {
  TORCH_CHECK(kinds.size() == n && masks.size() == n && row_lens.size() == n, op,
              ": kinds, mask tensors and row lengths must have one entry per tensor (", n, ")");
}

// The mask part of a TensorMeta (kind, row_len, n_index, mask, work) of tensor i with numel elements.
inline TensorMeta mask_meta(int64_t numel, int64_t kind, const at::Tensor& mask, int64_t row_len,
                            const at::Device& device, const char* op, size_t i) {
  TensorMeta t{};
  t.kind = kind;
  t.row_len = row_len;
  t.seed = -1;
  if (kind == kRows || kind == kCols) {
    TORCH_CHECK(mask.scalar_type() == at::kLong && mask.is_contiguous() && mask.device() == device, op,
                ": mask index ", i, " must be a contiguous int64 tensor on ", device);
    TORCH_CHECK(row_len > 0 && numel % row_len == 0, op, ": mask row length ", row_len, " of tensor ", i,
                " does not divide its ", numel, " elements");
    t.n_index = mask.numel();
    t.mask = reinterpret_cast<int64_t>(mask.data_ptr());
  } else if (kind == kDense) {
    TORCH_CHECK(mask.scalar_type() == at::kByte && mask.is_contiguous() && mask.numel() == numel &&
                    mask.device() == device,
                op, ": dense mask ", i, " must be a contiguous uint8 tensor of ", numel, " elements on ", device);
    t.mask = reinterpret_cast<int64_t>(mask.data_ptr());
  } else {
    TORCH_CHECK(kind == kFull, op, ": unknown mask kind ", kind, " for tensor ", i);
  }
  t.work = work_items(kind, numel, t.n_index, row_len);
  return t;
}

// Whether 4 consecutive work items from a multiple of 4 are 4 contiguous elements from a multiple of 4.
inline bool vector_kind(const TensorMeta& t) { return t.kind == kFull || (t.kind == kRows && t.row_len % kVec == 0); }

}  // namespace masked_launch
}  // namespace simu_fast
