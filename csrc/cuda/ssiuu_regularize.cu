// Ssiuu's attribution regularizer on CUDA. Semantics: simu_fast/ops/ssiuu_regularize.py.
//
// A multi-tensor launch as in sophia_step.cu, without masks: one launch per (g, phi, d) dtype group
// (per (phi, d) group with first=True, where g is not touched) updates every tensor of the group. The host
// writes a table (int64, pinned, copied non_blocking on the current stream):
//
//   table[0 .. n]               chunk_start[t]: first chunk of tensor t; chunk_start[n] = total chunks
//   table[n+1 ..]               n TensorMeta records (pointers, numel, vec)
//
// Block b handles chunk b: it finds its tensor by binary search over chunk_start and updates elements
// [c * kChunk, min((c + 1) * kChunk, numel)) of it, 4 at a time with vector accesses where every pointer
// allows them. The float32 arithmetic is explicit round-to-nearest (__fmul_rn, __fsub_rn, __fadd_rn: never
// contracted into an FMA) in the reference's order, so g and a_prev match the eager reference bit for bit.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../ssiuu_regularize.h"
#include "multi_tensor.cuh"

namespace simu_fast {
namespace {

// F32 / BF16 / F16, with_type, kVec (4 elements per thread-iteration on the vector path), Pack, load_pack,
// store_pack, aligned_for_vec; the table: make_table (host), load_chunk_meta (device).
using namespace multi_tensor;

constexpr int kThreads = 512;          // threads per block (multiple of 32)
constexpr int64_t kChunk = 64 * 1024;  // elements per block; a multiple of kVec, so every chunk starts on a
static_assert(kChunk % kVec == 0, "chunks must start on a vector boundary");  // vector boundary

// Pointer slots of TensorMeta::ptr.
enum : int { kG = 0, kPhi = 1, kD = 2, kA = 3 };

// One tensor of a launch. Plain int64 fields so the host can memcpy it into the int64 table.
struct TensorMeta {
  int64_t ptr[4];  // grad (0 with first=True), param, prob_grad, attr_prev
  int64_t numel;   // > 0: empty tensors are left out of the table
  int64_t vec;     // 1: every pointer allows 4-wide aligned accesses
  int64_t pad[2];
};
static_assert(sizeof(TensorMeta) == 8 * sizeof(int64_t), "TensorMeta is 8 int64 words");

// One element in the reference's order: a = phi * d; g += ((([a < 0] * (a - a_prev)) * d) * two_lam);
// a_prev = a. The [a < 0] factor is multiplied (0 * inf and 0 * NaN give NaN, as in the reference).
template <bool kFirst>
__device__ __forceinline__ void ssiuu_element(float& g, float phi, float d, float& a_prev, float two_lam) {
  const float a = __fmul_rn(phi, d);
  if (!kFirst) {
    const float negative = a < 0.f ? 1.f : 0.f;
    const float term = __fmul_rn(__fmul_rn(__fmul_rn(negative, __fsub_rn(a, a_prev)), d), two_lam);
    g = __fadd_rn(g, term);
  }
  a_prev = a;
}

template <typename GT, typename PT, typename DT, bool kFirst>
struct SsiuuOp {
  float two_lam;

  __device__ void one(const TensorMeta& t, int64_t o) const {
    auto* g = reinterpret_cast<typename GT::T*>(t.ptr[kG]);
    const auto* phi = reinterpret_cast<const typename PT::T*>(t.ptr[kPhi]);
    const auto* d = reinterpret_cast<const typename DT::T*>(t.ptr[kD]);
    auto* a = reinterpret_cast<float*>(t.ptr[kA]);
    float gv = kFirst ? 0.f : GT::to_float(g[o]);
    float av = kFirst ? 0.f : a[o];
    ssiuu_element<kFirst>(gv, PT::to_float(phi[o]), DT::to_float(d[o]), av, two_lam);
    if (!kFirst) g[o] = GT::from_float(gv);
    a[o] = av;
  }

  __device__ void four(const TensorMeta& t, int64_t o) const {
    auto* g = reinterpret_cast<typename GT::T*>(t.ptr[kG]);
    const auto* phi = reinterpret_cast<const typename PT::T*>(t.ptr[kPhi]);
    const auto* d = reinterpret_cast<const typename DT::T*>(t.ptr[kD]);
    auto* a = reinterpret_cast<float*>(t.ptr[kA]);
    const Pack<typename PT::T> pp = load_pack(phi, o);
    const Pack<typename DT::T> dp = load_pack(d, o);
    Pack<typename GT::T> gp{};
    Pack<float> ap{};
    if (!kFirst) {
      gp = load_pack(g, o);
      ap = load_pack(a, o);
    }
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      float gv = kFirst ? 0.f : GT::to_float(gp.v[k]);
      ssiuu_element<kFirst>(gv, PT::to_float(pp.v[k]), DT::to_float(dp.v[k]), ap.v[k], two_lam);
      if (!kFirst) gp.v[k] = GT::from_float(gv);
    }
    if (!kFirst) store_pack(g, o, gp);
    store_pack(a, o, ap);
  }
};

template <typename Op>
__global__ void __launch_bounds__(kThreads)
    ssiuu_multi_tensor_kernel(const int64_t* __restrict__ table, int64_t n_tensors, Op op) {
  __shared__ TensorMeta meta_s;
  __shared__ int64_t begin_s;
  if (threadIdx.x == 0) multi_tensor::load_chunk_meta(table, n_tensors, kChunk, blockIdx.x, meta_s, begin_s);
  __syncthreads();
  const TensorMeta t = meta_s;
  const int64_t begin = begin_s;
  const int64_t end = begin + kChunk < t.numel ? begin + kChunk : t.numel;

  int64_t scalar_begin = begin;
  if (t.vec) {
    // begin is a multiple of kVec (kChunk is) and the pointers are 4-element aligned: every group of 4
    // is one aligned access. A ragged end goes below.
    const int64_t n_vec = (end - begin) / kVec;
    for (int64_t v = threadIdx.x; v < n_vec; v += kThreads) op.four(t, begin + v * kVec);
    scalar_begin = begin + n_vec * kVec;
  }
  for (int64_t o = scalar_begin + threadIdx.x; o < end; o += kThreads) op.one(t, o);
}

// ---- host side -----------------------------------------------------------------------------------------

// Writes the table, copies it to the device and launches one block per chunk on the current stream.
template <typename Op>
void launch(const std::vector<TensorMeta>& metas, const Op& op, const at::Device& device) {
  if (metas.empty()) return;
  const int64_t n = static_cast<int64_t>(metas.size());
  int64_t chunks = 0;
  const at::Tensor table =
      multi_tensor::make_table(metas, &TensorMeta::numel, kChunk, device, "ssiuu_regularize_cuda", &chunks);
  ssiuu_multi_tensor_kernel<Op><<<static_cast<unsigned int>(chunks), kThreads, 0,
                                  at::cuda::getCurrentCUDAStream()>>>(table.data_ptr<int64_t>(), n, op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 0: float32, 1: bfloat16, 2: float16.
int dtype_code(at::ScalarType t, const char* what, size_t i) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, "ssiuu_regularize_cuda: ", what, " ", i, " must be float32, bfloat16 or float16, got ", t);
  }
  return -1;
}

void check_tensor(const at::Tensor& x, const at::Device& device, int64_t numel, const char* what, size_t i) {
  TORCH_CHECK(x.device() == device, "ssiuu_regularize_cuda: ", what, " ", i, " is on ", x.device(), ", expected ",
              device);
  TORCH_CHECK(x.is_contiguous(), "ssiuu_regularize_cuda: ", what, " ", i, " must be contiguous");
  TORCH_CHECK(x.numel() == numel, "ssiuu_regularize_cuda: ", what, " ", i, " has ", x.numel(),
              " elements, expected ", numel);
}

}  // namespace

void ssiuu_regularize_cuda(TensorList grads, TensorList params, TensorList prob_grads, TensorList attr_prev,
                           double lam, bool first) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && prob_grads.size() == n && attr_prev.size() == n,
              "ssiuu_regularize_cuda: grads, params, prob_grads and attr_prev must have the same length (", n, ")");
  if (n == 0) return;
  TORCH_CHECK(params[0].is_cuda(), "ssiuu_regularize_cuda: tensors must be on a CUDA device, got ",
              params[0].device());
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  // The reference multiplies a float32 tensor by the Python float 2 * lam: torch rounds it to float32 once.
  const float two_lam = static_cast<float>(2.0 * lam);

  std::vector<TensorMeta> groups[27];  // by (g code * 3 + phi code) * 3 + d code; g code 0 with first=True
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &g = grads[i], &p = params[i], &d = prob_grads[i], &a = attr_prev[i];
    const int64_t numel = p.numel();
    check_tensor(p, device, numel, "parameter", i);
    check_tensor(g, device, numel, "gradient", i);
    check_tensor(d, device, numel, "probability gradient", i);
    check_tensor(a, device, numel, "attr_prev", i);
    TORCH_CHECK(a.scalar_type() == at::kFloat, "ssiuu_regularize_cuda: attr_prev ", i, " must be float32");
    const int gc = dtype_code(g.scalar_type(), "gradient", i);
    const int pc = dtype_code(p.scalar_type(), "parameter", i);
    const int dc = dtype_code(d.scalar_type(), "probability gradient", i);
    if (numel == 0) continue;
    TensorMeta t{};
    t.ptr[kG] = first ? 0 : reinterpret_cast<int64_t>(g.data_ptr());
    t.ptr[kPhi] = reinterpret_cast<int64_t>(p.data_ptr());
    t.ptr[kD] = reinterpret_cast<int64_t>(d.data_ptr());
    t.ptr[kA] = reinterpret_cast<int64_t>(a.data_ptr());
    t.numel = numel;
    t.vec = aligned_for_vec(p) && aligned_for_vec(d) && aligned_for_vec(a) && (first || aligned_for_vec(g));
    groups[((first ? 0 : gc) * 3 + pc) * 3 + dc].push_back(t);
  }

  for (int gc = 0; gc < 3; ++gc) {
    for (int pc = 0; pc < 3; ++pc) {
      for (int dc = 0; dc < 3; ++dc) {
        const std::vector<TensorMeta>& metas = groups[(gc * 3 + pc) * 3 + dc];
        if (metas.empty()) continue;
        with_type(pc, [&](auto p_tag) {
          with_type(dc, [&](auto d_tag) {
            using PT = decltype(p_tag);
            using DT = decltype(d_tag);
            if (first) {
              launch(metas, SsiuuOp<F32, PT, DT, true>{two_lam}, device);
              return;
            }
            with_type(gc, [&](auto g_tag) {
              launch(metas, SsiuuOp<decltype(g_tag), PT, DT, false>{two_lam}, device);
            });
          });
        });
      }
    }
  }
}

}  // namespace simu_fast
