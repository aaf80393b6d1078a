// Integrated-gradients accumulation on CUDA. Semantics: simu_fast/ops/ig_accumulate.py.
//
//   out[k] += sum over positions p = r * S + t:  weight[r] * mask[p] * act[p, k] * grad[p, k]
//
// Grid: blockIdx.x = a tile of kTile features, blockIdx.y = a chunk of consecutive positions. A block has
// kThreads threads laid out as kLanes position lanes x (kTile / kVec) feature threads; every thread owns
// kVec features of the tile and walks the positions p = chunk_begin + lane, + kLanes, ... of its chunk,
// keeping its kVec float32 sums in registers. Positions with weight[r] * mask[p] == 0 are skipped before
// act / grad are touched (the 32 threads of a warp share a lane, so the branch is uniform). The lanes are
// then summed through shared memory and each feature of the tile gets one atomicAdd into out per block.
//
// Vector path (act and grad 16-byte aligned, F a multiple of kVec): a thread's kVec features are
// contiguous and arrive in one 16-byte streaming load per tensor (4 float32 or 8 16-bit values). Otherwise
// a thread's features are tid, tid + kTile / kVec, ... so each scalar load instruction of a warp is still
// coalesced. All offsets are int64 (R * S * F may pass 2^31).
//
// Results are float32 sums in a launch-dependent order (atomics): not bit-reproducible run to run.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "../ig_accumulate.h"

namespace simu_fast {
namespace {

constexpr int kThreads = 256;        // threads per block
constexpr int kTile = 256;           // features per block
constexpr int64_t kMinChunk = 64;    // positions per block, at least (bounds the atomics per element read)

// ---- element types: 16-bit floats travel as raw bits ---------------------------------------------------

struct F32 {
  using T = float;
  static constexpr int kVec = 4;  // 4 x 4 bytes = one 16-byte load
  __device__ static float to_float(T x) { return x; }
  __device__ static void unpack(const uint4& w, float* v) {
    v[0] = __uint_as_float(w.x);
    v[1] = __uint_as_float(w.y);
    v[2] = __uint_as_float(w.z);
    v[3] = __uint_as_float(w.w);
  }
};

// 8 x 2 bytes = one 16-byte load; element 2i is the low half of 32-bit word i (little endian).
template <typename Derived>
struct Half16 {
  using T = uint16_t;
  static constexpr int kVec = 8;
  __device__ static void unpack(const uint4& w, float* v) {
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = Derived::to_float(static_cast<uint16_t>(words[i] & 0xFFFFu));
      v[2 * i + 1] = Derived::to_float(static_cast<uint16_t>(words[i] >> 16));
    }
  }
};
struct BF16 : Half16<BF16> {
  __device__ static float to_float(uint16_t x) { return __uint_as_float(static_cast<uint32_t>(x) << 16); }
};
struct F16 : Half16<F16> {
  __device__ static float to_float(uint16_t x) { return __half2float(__ushort_as_half(x)); }
};

// ---- kernel --------------------------------------------------------------------------------------------

template <typename E, bool kVector>
__global__ void __launch_bounds__(kThreads)
    ig_accumulate_kernel(float* __restrict__ out, const typename E::T* __restrict__ act,
                         const typename E::T* __restrict__ grad, const float* __restrict__ weight,
                         const uint8_t* __restrict__ mask, int64_t S, int64_t F, int64_t positions,
                         int64_t chunk) {
  constexpr int kVec = E::kVec;
  constexpr int kCols = kTile / kVec;       // feature threads per lane
  constexpr int kLanes = kThreads / kCols;  // position lanes per block
  static_assert(kTile % kVec == 0 && kThreads % kCols == 0 && kThreads == kTile, "block layout");
  __shared__ float lane_sums[kLanes][kTile];

  const int col = threadIdx.x % kCols, lane = threadIdx.x / kCols;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t p_end = p_begin + chunk < positions ? p_begin + chunk : positions;

  float acc[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) acc[j] = 0.f;

  int64_t p = p_begin + lane;
  if (p < p_end) {
    int64_t r = p / S, t = p - r * S;  // one division; then stepped along with p
    for (; p < p_end; p += kLanes) {
      const float s = __ldg(weight + r) * static_cast<float>(__ldg(mask + p));
      t += kLanes;
      while (t >= S) {
        t -= S;
        ++r;
      }
      if (s == 0.f) continue;  // uniform across the warp: all its threads are on this position
      const int64_t base = p * F;
      if constexpr (kVector) {
        const int64_t k = k0 + static_cast<int64_t>(col) * kVec;
        if (k < F) {  // F % kVec == 0: the kVec features are all in range or all out
          float a[kVec], g[kVec];
          E::unpack(__ldcs(reinterpret_cast<const uint4*>(act + base + k)), a);
          E::unpack(__ldcs(reinterpret_cast<const uint4*>(grad + base + k)), g);
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[j] = fmaf(s, a[j] * g[j], acc[j]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const int64_t k = k0 + col + j * kCols;
          if (k < F) acc[j] = fmaf(s, E::to_float(act[base + k]) * E::to_float(grad[base + k]), acc[j]);
        }
      }
    }
  }

#pragma unroll
  for (int j = 0; j < kVec; ++j) lane_sums[lane][kVector ? col * kVec + j : col + j * kCols] = acc[j];
  __syncthreads();
  const int f = threadIdx.x;  // kThreads == kTile: one feature of the tile per thread
  float total = 0.f;
#pragma unroll
  for (int l = 0; l < kLanes; ++l) total += lane_sums[l][f];
  // total == 0 adds nothing (a chunk whose positions are all masked out costs no atomics); NaN != 0.
  if (k0 + f < F && total != 0.f) atomicAdd(out + k0 + f, total);
}

// ---- host side -----------------------------------------------------------------------------------------

template <typename E>
void launch(const at::Tensor& out, const at::Tensor& act, const at::Tensor& grad, const at::Tensor& weight,
            const at::Tensor& mask, int64_t S, int64_t F, int64_t positions) {
  const int64_t tiles = (F + kTile - 1) / kTile;
  TORCH_CHECK(tiles <= INT_MAX, "ig_accumulate_cuda: too many features (", F, ")");
  // Enough blocks to fill the device (kThreads-thread blocks, 2048 threads per SM), split along the
  // positions only as far as that needs and each block keeps >= kMinChunk positions.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target = sms * (2048 / kThreads);
  int64_t chunks = std::min((target + tiles - 1) / tiles, (positions + kMinChunk - 1) / kMinChunk);
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, 65535));
  const int64_t chunk = (positions + chunks - 1) / chunks;
  chunks = (positions + chunk - 1) / chunk;

  using T = typename E::T;
  const T* a = reinterpret_cast<const T*>(act.data_ptr());
  const T* g = reinterpret_cast<const T*>(grad.data_ptr());
  const bool vector = F % E::kVec == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(g) % 16 == 0;
  const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(chunks));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  float* o = out.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const uint8_t* m = mask.data_ptr<uint8_t>();
  if (vector) {
    ig_accumulate_kernel<E, true><<<grid, kThreads, 0, stream>>>(o, a, g, w, m, S, F, positions, chunk);
  } else {
    ig_accumulate_kernel<E, false><<<grid, kThreads, 0, stream>>>(o, a, g, w, m, S, F, positions, chunk);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void ig_accumulate_cuda(at::Tensor out, at::Tensor act, at::Tensor grad, at::Tensor weight, at::Tensor mask) {
  constexpr const char* op = "ig_accumulate_cuda";
  check_ig_accumulate_args(out, act, grad, weight, mask, op);
  const int64_t R = act.size(0), S = act.size(1), F = act.size(2);
  TORCH_CHECK(out.is_cuda(), op, ": tensors must be on a CUDA device, got ", out.device());
  for (const at::Tensor* t : {&act, &grad, &weight, &mask}) {
    TORCH_CHECK(t->device() == out.device(), op, ": all tensors must be on ", out.device(), ", got ", t->device());
  }
  for (const at::Tensor* t : {&out, &act, &grad, &weight, &mask}) {
    TORCH_CHECK(t->is_contiguous(), op, ": tensors must be contiguous");
  }
  const int64_t positions = R * S;
  if (positions == 0 || F == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  switch (act.scalar_type()) {
    case at::kFloat: launch<F32>(out, act, grad, weight, mask, S, F, positions); break;
    case at::kBFloat16: launch<BF16>(out, act, grad, weight, mask, S, F, positions); break;
    case at::kHalf: launch<F16>(out, act, grad, weight, mask, S, F, positions); break;
    default: TORCH_CHECK(false, op, ": act must be float32, bfloat16 or float16, got ", act.scalar_type());
  }
}

}  // namespace simu_fast
