// Ssiuu's attribution regularizer on CUDA. Semantics: simu_fast/ops/ssiuu_regularize.py.
//
// A multi-tensor launch as in the masked SophiaG ops (masked_launch.cuh), without masks: one launch per
// (g, phi, d) dtype group updates every tensor of the group (phi_prev has phi's dtype, d_prev d's, so they
// add no groups); the penalty (norm or squared) is a template parameter of the whole launch. The host
// writes a table (int64, pinned, copied non_blocking on the current stream):
//
//   table[0 .. n]               chunk_start[t]: first chunk of tensor t; chunk_start[n] = total chunks
//   table[n+1 ..]               n TensorMeta records (pointers, numel, vec)
//
// Block b handles chunk b: it finds its tensor by binary search over chunk_start and updates elements
// [c * kChunk, min((c + 1) * kChunk, numel)) of it, 4 at a time with vector accesses where all 5 pointers
// allow them. The float32 arithmetic is explicit round-to-nearest (mul_rn, sub_rn, add_rn of
// multi_tensor.cuh: never contracted into an FMA) in the reference's order, so g matches the eager reference
// bit for bit. Only g is written.
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
// store_pack, aligned_for_vec; mul_rn / sub_rn / add_rn; the table: make_table (host), load_chunk_meta
// (device); the checks dtype_code, check_tensor, cuda_device.
using namespace multi_tensor;

constexpr int kThreads = 512;          // threads per block (multiple of 32)
constexpr int64_t kChunk = 64 * 1024;  // elements per block; a multiple of kVec, so every chunk starts on a
static_assert(kChunk % kVec == 0, "chunks must start on a vector boundary");  // vector boundary

// Pointer slots of TensorMeta::ptr.
enum : int { kG = 0, kPhi = 1, kD = 2, kPhiPrev = 3, kDPrev = 4 };

// One tensor of a launch. Plain int64 fields so the host can memcpy it into the int64 table.
struct TensorMeta {
  int64_t ptr[5];  // grad, param, prob_grad, prev_param, prev_prob_grad
  int64_t numel;   // > 0: empty tensors are left out of the table
  int64_t vec;     // 1: every pointer allows 4-wide aligned accesses
  int64_t pad[1];
};
static_assert(sizeof(TensorMeta) == 8 * sizeof(int64_t), "TensorMeta is 8 int64 words");

// One element in the reference's order: a = phi * d; a_prev = phi_prev * d_prev; delta = a - a_prev;
// s = delta (kSquared) or (delta > 0) - (delta < 0) (NaN -> 0, -0 -> +0); g += ((([a < 0] * s) * d) * scale).
// The [a < 0] factor is multiplied (0 * inf and 0 * NaN give NaN, as in the reference).
template <bool kSquared>
__device__ __forceinline__ float ssiuu_element(float g, float phi, float d, float phi_prev, float d_prev,
                                               float scale) {
  const float a = mul_rn(phi, d);
  const float a_prev = mul_rn(phi_prev, d_prev);
  const float delta = sub_rn(a, a_prev);
  const float s = kSquared ? delta : sub_rn(delta > 0.f ? 1.f : 0.f, delta < 0.f ? 1.f : 0.f);
  const float negative = a < 0.f ? 1.f : 0.f;
  const float term = mul_rn(mul_rn(mul_rn(negative, s), d), scale);
  return add_rn(g, term);
}

template <typename GT, typename PT, typename DT, bool kSquared>
struct SsiuuOp {
  float scale;

  __device__ void one(const TensorMeta& t, int64_t o) const {
    auto* g = reinterpret_cast<typename GT::T*>(t.ptr[kG]);
    const auto* phi = reinterpret_cast<const typename PT::T*>(t.ptr[kPhi]);
    const auto* d = reinterpret_cast<const typename DT::T*>(t.ptr[kD]);
    const auto* phi_prev = reinterpret_cast<const typename PT::T*>(t.ptr[kPhiPrev]);
    const auto* d_prev = reinterpret_cast<const typename DT::T*>(t.ptr[kDPrev]);
    g[o] = GT::from_float(ssiuu_element<kSquared>(GT::to_float(g[o]), PT::to_float(phi[o]), DT::to_float(d[o]),
                                                  PT::to_float(phi_prev[o]), DT::to_float(d_prev[o]), scale));
  }

  __device__ void four(const TensorMeta& t, int64_t o) const {
    auto* g = reinterpret_cast<typename GT::T*>(t.ptr[kG]);
    const auto* phi = reinterpret_cast<const typename PT::T*>(t.ptr[kPhi]);
    const auto* d = reinterpret_cast<const typename DT::T*>(t.ptr[kD]);
    const auto* phi_prev = reinterpret_cast<const typename PT::T*>(t.ptr[kPhiPrev]);
    const auto* d_prev = reinterpret_cast<const typename DT::T*>(t.ptr[kDPrev]);
    const Pack<typename PT::T> pp = load_pack(phi, o);
    const Pack<typename DT::T> dp = load_pack(d, o);
    const Pack<typename PT::T> ppp = load_pack(phi_prev, o);
    const Pack<typename DT::T> dpp = load_pack(d_prev, o);
    Pack<typename GT::T> gp = load_pack(g, o);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      gp.v[k] = GT::from_float(ssiuu_element<kSquared>(GT::to_float(gp.v[k]), PT::to_float(pp.v[k]),
                                                       DT::to_float(dp.v[k]), PT::to_float(ppp.v[k]),
                                                       DT::to_float(dpp.v[k]), scale));
    }
    store_pack(g, o, gp);
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

}  // namespace

void ssiuu_regularize_cuda(TensorList grads, TensorList params, TensorList prob_grads, TensorList prev_params,
                           TensorList prev_prob_grads, double lam, bool squared) {
  constexpr const char* op = "ssiuu_regularize_cuda";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && prob_grads.size() == n && prev_params.size() == n && prev_prob_grads.size() == n,
              "ssiuu_regularize_cuda: grads, params, prob_grads, prev_params and prev_prob_grads must have the same "
              "length (", n, ")");
  if (n == 0) return;
  const at::Device device = cuda_device(params[0], op);
  const c10::cuda::CUDAGuard guard(device);
  // The reference rounds lam (norm) or 2 lam (squared) to float32 once.
  const float scale = static_cast<float>(squared ? 2.0 * lam : lam);

  std::vector<TensorMeta> groups[27];  // by (g code * 3 + phi code) * 3 + d code
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &g = grads[i], &p = params[i], &d = prob_grads[i];
    const at::Tensor &pp = prev_params[i], &dp = prev_prob_grads[i];
    const int64_t numel = p.numel();
    check_tensor(p, device, numel, op, "parameter", i);
    check_tensor(g, device, numel, op, "gradient", i);
    check_tensor(d, device, numel, op, "probability gradient", i);
    check_tensor(pp, device, numel, op, "previous parameter", i);
    check_tensor(dp, device, numel, op, "previous probability gradient", i);
    TORCH_CHECK(pp.scalar_type() == p.scalar_type(), "ssiuu_regularize_cuda: previous parameter ", i,
                " must have the parameter's dtype");
    TORCH_CHECK(dp.scalar_type() == d.scalar_type(), "ssiuu_regularize_cuda: previous probability gradient ", i,
                " must have the probability gradient's dtype");
    const int gc = dtype_code(g.scalar_type(), op, "gradient", i);
    const int pc = dtype_code(p.scalar_type(), op, "parameter", i);
    const int dc = dtype_code(d.scalar_type(), op, "probability gradient", i);
    if (numel == 0) continue;
    TensorMeta t{};
    t.ptr[kG] = reinterpret_cast<int64_t>(g.data_ptr());
    t.ptr[kPhi] = reinterpret_cast<int64_t>(p.data_ptr());
    t.ptr[kD] = reinterpret_cast<int64_t>(d.data_ptr());
    t.ptr[kPhiPrev] = reinterpret_cast<int64_t>(pp.data_ptr());
    t.ptr[kDPrev] = reinterpret_cast<int64_t>(dp.data_ptr());
    t.numel = numel;
    t.vec = aligned_for_vec(g) && aligned_for_vec(p) && aligned_for_vec(d) && aligned_for_vec(pp) &&
            aligned_for_vec(dp);
    groups[(gc * 3 + pc) * 3 + dc].push_back(t);
  }

  for (int gc = 0; gc < 3; ++gc) {
    for (int pc = 0; pc < 3; ++pc) {
      for (int dc = 0; dc < 3; ++dc) {
        const std::vector<TensorMeta>& metas = groups[(gc * 3 + pc) * 3 + dc];
        if (metas.empty()) continue;
        with_type(gc, [&](auto g_tag) {
          with_type(pc, [&](auto p_tag) {
            with_type(dc, [&](auto d_tag) {
              using GT = decltype(g_tag);
              using PT = decltype(p_tag);
              using DT = decltype(d_tag);
              if (squared) launch(metas, SsiuuOp<GT, PT, DT, true>{scale}, device);
              else launch(metas, SsiuuOp<GT, PT, DT, false>{scale}, device);
            });
          });
        });
      }
    }
  }
}

}  // namespace simu_fast
