// Radix select kernels on CUDA: radix_histogram, select_mask and bracket_mask. Semantics: simu_fast/ops/radix_select.py;
// the key transform and the argument plans are in ../radix_select.h (shared with the CPU kernels).
//
// radix_histogram: a grid-stride loop in which every warp takes 32 consecutive items per step (an item is
// one 16-byte load, 4 float32 or 8 16-bit values, when x is 16-byte aligned; one element otherwise; the
// last numel % 4 or % 8 elements of the vector path go through the scalar loop). The trip count of the
// loop is the same for the 32 lanes of a warp, so the warp-wide intrinsics below always see the full warp
// (lanes past the end carry the "not counted" bin).
// Every element becomes a bin (0..255 the digit, 256 NaN, 257 not counted). Counting is warp-aggregated:
// __match_any_sync groups the lanes with equal bins and one lane per group adds the group's size to the
// warp's own shared-memory histogram (one shared atomic per distinct bin per warp step, so heavy ties, the
// usual case in the first pass over scores of similar magnitude, cost no more than distinct values). Steps
// where no lane of the warp counts anything (later passes: most elements fail the prefix test) skip the
// match. At the end each block sums its warps' histograms and does one global 64-bit atomicAdd per
// non-zero bin. Counts are integers: the result is deterministic. Mode INDICES launches over the window of
// indices that can pass the prefix test only (radix_index_window: after the first index pass, 1/256 of x
// or less).
//
// The histogram passes read x with ordinary cached loads (an x that fits in L2 stays there for the next
// pass); select_mask, the last pass of a top-k, streams it.
//
// select_mask: one elementwise pass, grid-stride, 16-byte loads and 4- or 8-byte stores of the mask bytes
// when x is 16-byte aligned (and the output 8-byte aligned, as fresh allocations are).
// bracket_mask: one grid-stride pass, one element per lane per step (warp-uniform trip count), writing the
// mask bytes; the counts are summed per warp with shuffles and added with one 64-bit atomic per warp and
// block; the candidates reserve their slots with one warp-aggregated atomic on the candidate counter
// (__ballot_sync: the lanes' order within the warp is kept, the warps' order is not).
// All indices are int64 (x may pass 2^31 elements).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "../radix_select.h"

namespace simu_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kHistBins = 257;  // 256 digits + NaN; the "not counted" bin is never stored

// ---- one element -> its bin ------------------------------------------------------------------------------

template <typename Format, int64_t kMode>
__device__ __forceinline__ uint32_t bin_of(uint32_t raw, int64_t i, const RadixHistogramPlan& p) {
  const uint32_t key = radix_key(raw, Format::kSign, p.absolute);
  if constexpr (kMode == kRadixKeys) {
    if (radix_is_nan(raw, Format::kSign, Format::kInf)) return kRadixNanBin;
    return (key & p.key_mask) == p.key_target ? (key >> p.key_shift) & p.key_digit : kRadixSkipBin;
  } else {
    const int64_t index = p.index_offset + i;
    const bool counted = key == p.key_equal && (static_cast<uint64_t>(index) & p.index_mask) == p.index_target;
    return counted ? static_cast<uint32_t>((index >> p.index_shift) & p.index_digit) : kRadixSkipBin;
  }
}

// Called by all 32 lanes of a warp together (warp-uniform control flow).
__device__ __forceinline__ void warp_count(uint32_t* warp_hist, uint32_t bin, int lane) {
  if (!__any_sync(0xFFFFFFFFu, bin != kRadixSkipBin)) return;
  const unsigned peers = __match_any_sync(0xFFFFFFFFu, bin);
  if (bin != kRadixSkipBin && lane == __ffs(peers) - 1) {
    atomicAdd(warp_hist + bin, static_cast<uint32_t>(__popc(peers)));
  }
}

// 16-byte words -> raw bits of the elements (element 2k is the low half of 32-bit word k: little endian).
template <typename Bits>
struct Vec;
template <>
struct Vec<uint32_t> {
  static constexpr int kN = 4;
  __device__ static void unpack(const uint4& w, uint32_t* v) {
    v[0] = w.x;
    v[1] = w.y;
    v[2] = w.z;
    v[3] = w.w;
  }
};
template <>
struct Vec<uint16_t> {
  static constexpr int kN = 8;
  __device__ static void unpack(const uint4& w, uint32_t* v) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = words[k] & 0xFFFFu;
      v[2 * k + 1] = words[k] >> 16;
    }
  }
};

// ---- kernels ---------------------------------------------------------------------------------------------

template <typename Format, int64_t kMode, bool kVector>
__global__ void __launch_bounds__(kThreads)
    radix_histogram_kernel(const typename Format::Bits* __restrict__ x, int64_t numel, RadixHistogramPlan plan,
                           unsigned long long* __restrict__ out) {
  using Bits = typename Format::Bits;
  __shared__ uint32_t hist[kWarps][kHistBins];
  for (int b = threadIdx.x; b < kWarps * kHistBins; b += kThreads) (&hist[0][0])[b] = 0u;
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t* warp_hist = hist[warp];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t warp_base = static_cast<int64_t>(blockIdx.x) * kThreads + warp * 32;  // same on all lanes

  int64_t scalar_begin = 0;
  if constexpr (kVector) {
    constexpr int kN = Vec<Bits>::kN;
    const int64_t n_vec = numel / kN;
    const uint4* __restrict__ xv = reinterpret_cast<const uint4*>(x);
    for (int64_t base = warp_base; base < n_vec; base += stride) {
      const int64_t v = base + lane;
      const bool valid = v < n_vec;
      uint32_t raw[kN];
      Vec<Bits>::unpack(valid ? __ldg(xv + v) : make_uint4(0u, 0u, 0u, 0u), raw);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const uint32_t bin = valid ? bin_of<Format, kMode>(raw[k], v * kN + k, plan) : kRadixSkipBin;
        warp_count(warp_hist, bin, lane);
      }
    }
    scalar_begin = n_vec * kN;
  }
  for (int64_t base = scalar_begin + warp_base; base < numel; base += stride) {
    const int64_t i = base + lane;
    const uint32_t bin = i < numel ? bin_of<Format, kMode>(static_cast<uint32_t>(x[i]), i, plan) : kRadixSkipBin;
    warp_count(warp_hist, bin, lane);
  }

  __syncthreads();
  for (int b = threadIdx.x; b < kHistBins; b += kThreads) {
    uint32_t total = 0u;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += hist[w][b];
    if (total != 0u) atomicAdd(out + b, static_cast<unsigned long long>(total));
  }
}

template <typename Format>
__device__ __forceinline__ uint8_t selected(uint32_t raw, int64_t i, bool absolute, uint32_t kth, int64_t cut) {
  const uint32_t key = radix_key(raw, Format::kSign, absolute);
  return (key > kth || (key == kth && i <= cut)) ? 1 : 0;
}

template <typename Format, bool kVector>
__global__ void __launch_bounds__(kThreads)
    select_mask_kernel(const typename Format::Bits* __restrict__ x, int64_t numel, bool absolute, uint32_t kth,
                       int64_t cut, uint8_t* __restrict__ out) {
  using Bits = typename Format::Bits;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  int64_t scalar_begin = 0;
  if constexpr (kVector) {
    constexpr int kN = Vec<Bits>::kN;
    const int64_t n_vec = numel / kN;
    const uint4* __restrict__ xv = reinterpret_cast<const uint4*>(x);
    for (int64_t v = first; v < n_vec; v += stride) {
      uint32_t raw[kN];
      Vec<Bits>::unpack(__ldcs(xv + v), raw);
      uint32_t packed[kN / 4];
#pragma unroll
      for (int w = 0; w < kN / 4; ++w) {
        packed[w] = 0u;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int e = 4 * w + k;
          packed[w] |= static_cast<uint32_t>(selected<Format>(raw[e], v * kN + e, absolute, kth, cut)) << (8 * k);
        }
      }
      if constexpr (kN == 4) {
        reinterpret_cast<uint32_t*>(out)[v] = packed[0];
      } else {
        reinterpret_cast<uint2*>(out)[v] = make_uint2(packed[0], packed[1]);
      }
    }
    scalar_begin = n_vec * kN;
  }
  for (int64_t i = scalar_begin + first; i < numel; i += stride) {
    out[i] = selected<Format>(static_cast<uint32_t>(x[i]), i, absolute, kth, cut);
  }
}

template <typename Format>
__global__ void bracket_mask_kernel(const typename Format::Bits* __restrict__ x, int64_t numel, bool absolute,
                                    uint32_t lo, uint32_t hi, int64_t capacity, uint8_t* __restrict__ out,
                                    int64_t* __restrict__ index, typename Format::Bits* __restrict__ values,
                                    unsigned long long* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned long long above = 0, nan = 0;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); base < numel;
       base += stride) {
    const int64_t i = base + lane;
    bool candidate = false;
    uint32_t raw = 0;
    if (i < numel) {
      raw = static_cast<uint32_t>(x[i]);
      const uint32_t key = radix_key(raw, Format::kSign, absolute);
      const bool is_nan = radix_is_nan(raw, Format::kSign, Format::kInf);
      const bool up = !is_nan && key > hi;
      candidate = !is_nan && key >= lo && key <= hi;
      out[i] = up ? 1 : 0;
      above += up ? 1 : 0;
      nan += is_nan ? 1 : 0;
    }
    const unsigned ballot = __ballot_sync(0xFFFFFFFFu, candidate);
    if (ballot == 0) continue;
    unsigned long long first = 0;
    if (lane == 0) first = atomicAdd(counts + 1, static_cast<unsigned long long>(__popc(ballot)));
    first = __shfl_sync(0xFFFFFFFFu, first, 0);
    if (candidate) {
      const unsigned long long slot = first + __popc(ballot & ((1u << lane) - 1u));
      if (slot < static_cast<unsigned long long>(capacity)) {
        index[slot] = i;
        values[slot] = static_cast<typename Format::Bits>(raw);
      }
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    above += __shfl_down_sync(0xFFFFFFFFu, above, offset);
    nan += __shfl_down_sync(0xFFFFFFFFu, nan, offset);
  }
  if (lane == 0) {
    if (above) atomicAdd(counts + 0, above);
    if (nan) atomicAdd(counts + 2, nan);
  }
}

// ---- host side -------------------------------------------------------------------------------------------

int64_t grid_for(int64_t items) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min((items + kThreads - 1) / kThreads, sms * (2048 / kThreads));
  return std::max<int64_t>(1, blocks);
}

template <typename Format, int64_t kMode>
void launch_histogram(const at::Tensor& x, RadixHistogramPlan plan, at::Tensor& out) {
  using Bits = typename Format::Bits;
  const Bits* bits = reinterpret_cast<const Bits*>(x.data_ptr());
  int64_t numel = x.numel();
  if (kMode == kRadixIndices) {
    // Visit only the window of indices that can pass the prefix test, widened down to a multiple of 8
    // elements so the 16-byte alignment of x carries over (the kernel still applies the full test).
    int64_t first = 0, end = numel;
    if (!radix_index_window(plan, numel, first, end)) return;
    first -= first % 8;
    bits += first;
    numel = end - first;
    plan.index_offset += first;
  }
  const bool vector = reinterpret_cast<uintptr_t>(bits) % 16 == 0;
  const auto blocks = static_cast<unsigned>(grid_for(vector ? numel / Vec<Bits>::kN + 1 : numel));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto* o = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  if (vector) {
    radix_histogram_kernel<Format, kMode, true><<<blocks, kThreads, 0, stream>>>(bits, numel, plan, o);
  } else {
    radix_histogram_kernel<Format, kMode, false><<<blocks, kThreads, 0, stream>>>(bits, numel, plan, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Format>
void launch_select(const at::Tensor& x, bool absolute, const RadixSelectPlan& plan, at::Tensor& out) {
  using Bits = typename Format::Bits;
  const Bits* bits = reinterpret_cast<const Bits*>(x.data_ptr());
  uint8_t* o = out.data_ptr<uint8_t>();
  const int64_t numel = x.numel();
  const bool vector = reinterpret_cast<uintptr_t>(bits) % 16 == 0 && reinterpret_cast<uintptr_t>(o) % 8 == 0;
  const auto blocks = static_cast<unsigned>(grid_for(vector ? numel / Vec<Bits>::kN + 1 : numel));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (vector) {
    select_mask_kernel<Format, true><<<blocks, kThreads, 0, stream>>>(bits, numel, absolute, plan.kth, plan.cut, o);
  } else {
    select_mask_kernel<Format, false><<<blocks, kThreads, 0, stream>>>(bits, numel, absolute, plan.kth, plan.cut, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be on a CUDA device, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
}

}  // namespace

at::Tensor radix_histogram_cuda(at::Tensor x, bool absolute, int64_t mode, int64_t key_prefix, int64_t prefix_bits,
                                int64_t shift, int64_t index_offset, int64_t key_equal) {
  constexpr const char* op = "radix_histogram_cuda";
  check_input(x, op);
  const int bits = radix_key_bits(x, op);
  TORCH_CHECK(mode == kRadixKeys || mode == kRadixIndices, op, ": mode must be 0 (keys) or 1 (indices), got ", mode);
  TORCH_CHECK(shift >= 0 && shift < 64, op, ": shift must be in [0, 64), got ", shift);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::zeros({257}, x.options().dtype(at::kLong));
  const RadixHistogramPlan plan =
      radix_histogram_plan(bits, absolute, mode, key_prefix, prefix_bits, shift, index_offset, key_equal);
  if (x.numel() == 0 || plan.nothing) return out;
  const bool keys = mode == kRadixKeys;
  switch (x.scalar_type()) {
    case at::kFloat:
      if (keys) launch_histogram<RadixF32, kRadixKeys>(x, plan, out);
      else launch_histogram<RadixF32, kRadixIndices>(x, plan, out);
      break;
    case at::kBFloat16:
      if (keys) launch_histogram<RadixBF16, kRadixKeys>(x, plan, out);
      else launch_histogram<RadixBF16, kRadixIndices>(x, plan, out);
      break;
    default:
      if (keys) launch_histogram<RadixF16, kRadixKeys>(x, plan, out);
      else launch_histogram<RadixF16, kRadixIndices>(x, plan, out);
      break;
  }
  return out;
}

at::Tensor select_mask_cuda(at::Tensor x, bool absolute, int64_t kth_key, int64_t index_cutoff,
                            int64_t index_offset) {
  constexpr const char* op = "select_mask_cuda";
  check_input(x, op);
  const int bits = radix_key_bits(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.numel()}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return out;
  const RadixSelectPlan plan = radix_select_plan(bits, kth_key, index_cutoff, index_offset, x.numel());
  switch (x.scalar_type()) {
    case at::kFloat: launch_select<RadixF32>(x, absolute, plan, out); break;
    case at::kBFloat16: launch_select<RadixBF16>(x, absolute, plan, out); break;
    default: launch_select<RadixF16>(x, absolute, plan, out); break;
  }
  return out;
}

std::vector<at::Tensor> bracket_mask_cuda(at::Tensor x, bool absolute, int64_t lo_key, int64_t hi_key,
                                          int64_t capacity) {
  constexpr const char* op = "bracket_mask_cuda";
  check_input(x, op);
  const int bits = radix_key_bits(x, op);
  check_bracket(bits, lo_key, hi_key, capacity, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t numel = x.numel();
  at::Tensor mask = at::empty({numel}, x.options().dtype(at::kByte));
  at::Tensor index = at::empty({std::min(capacity, numel)}, x.options().dtype(at::kLong));
  at::Tensor values = at::empty({index.numel()}, x.options());
  at::Tensor counts = at::zeros({3}, x.options().dtype(at::kLong));
  if (numel == 0) return {mask, index, values, counts};
  const auto lo = static_cast<uint32_t>(lo_key), hi = static_cast<uint32_t>(hi_key);
  const auto blocks = static_cast<unsigned>(grid_for(numel));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto* c = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  const int64_t cap = index.numel();
  switch (x.scalar_type()) {
#define SIMU_FAST_BRACKET(Format)                                                                              \
  bracket_mask_kernel<Format><<<blocks, kThreads, 0, stream>>>(                                                 \
      reinterpret_cast<const typename Format::Bits*>(x.data_ptr()), numel, absolute, lo, hi, cap,              \
      mask.data_ptr<uint8_t>(), index.data_ptr<int64_t>(),                                                     \
      reinterpret_cast<typename Format::Bits*>(values.data_ptr()), c)
    case at::kFloat: SIMU_FAST_BRACKET(RadixF32); break;
    case at::kBFloat16: SIMU_FAST_BRACKET(RadixBF16); break;
    default: SIMU_FAST_BRACKET(RadixF16); break;
#undef SIMU_FAST_BRACKET
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mask, index, values, counts};
}

}  // namespace simu_fast
