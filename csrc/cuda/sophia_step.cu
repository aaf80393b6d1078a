// Masked SophiaG step, Hessian EMA and non-finite check on CUDA. Semantics: simu_fast/ops/sophia_step.py,
// hessian_ema.py, nonfinite_check.py; mask layout: simu_fast/ops/update_mask.py.
//
// Multi-tensor launches in the style of apex's multi_tensor_apply: one launch per (param dtype, grad dtype)
// group updates every tensor of the group. The host writes a table (int64, pinned, copied non_blocking on
// the current stream):
//
//   table[0 .. n]               chunk_start[t]: first chunk of tensor t; chunk_start[n] = total chunks
//   table[n+1 ..]               n TensorMeta records (pointers, sizes, mask, seed, ...)
//
// Block b handles chunk b: it finds its tensor by binary search over chunk_start and visits work items
// [c * kChunk, min((c + 1) * kChunk, work)) of it, where work item e is the flat element
// work_offset(kind, e, ...). ROWS / COLS masks therefore only visit the selected elements; FULL and DENSE
// visit all of them (DENSE skips those whose mask byte is 0).
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "../sophia_step.h"
#include "../update_mask.h"
#include "multi_tensor.cuh"

namespace simu_fast {
namespace {

// F32 / BF16 / F16, with_type, kVec (4 elements per thread-iteration on the vector path), Pack, load_pack,
// store_pack, aligned_for_vec; the table: make_table (host), load_chunk_meta (device).
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

template <typename PT>
__device__ __forceinline__ typename PT::T store_param(float v, int64_t o, int64_t seed) {
  if constexpr (std::is_same_v<PT, BF16>) {
    if (seed >= 0) return bf16_bits_stochastic(v, static_cast<uint64_t>(o), static_cast<uint32_t>(seed));
  }
  return PT::from_float(v);
}

// ---- IEEE float32 arithmetic --------------------------------------------------------------------------
// The step must match the eager float32 reference (one rounding per torch op) exactly. nvcc contracts
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
// Sign-bit operations on the bits, so denormals are not flushed.
__device__ __forceinline__ float neg_bits(float x) { return __uint_as_float(__float_as_uint(x) ^ 0x80000000u); }
__device__ __forceinline__ float abs_bits(float x) { return __uint_as_float(__float_as_uint(x) & 0x7FFFFFFFu); }
// torch.sign: -1, 0 or 1; 0 for +-0 and NaN.
__device__ __forceinline__ float sign_of(float x) {
  const uint32_t b = __float_as_uint(x), mag = b & 0x7FFFFFFFu;
  if (mag == 0u || mag > 0x7F800000u) return 0.f;
  return (b >> 31) ? -1.f : 1.f;
}

struct StepScalars {
  float lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, rho_bs, eps;
  bool maximize, update_h;
};

// One element of the step, in the reference's order of operations. Returns 1 when q < 1 (not clipped).
__device__ __forceinline__ uint32_t sophia_element(float& p, float grad, float& m, float& h, const StepScalars& s) {
  const float g = s.maximize ? neg_bits(grad) : grad;
  if (s.update_h) h = add_rn(mul_rn(h, s.beta2), mul_rn(mul_rn(g, g), s.one_minus_beta2));
  p = mul_rn(p, s.decay);
  m = add_rn(mul_rn(m, s.beta1), mul_rn(g, s.one_minus_beta1));
  const float q = div_rn(abs_bits(m), add_rn(mul_rn(h, s.rho_bs), s.eps));
  const float clipped = q > 1.f ? 1.f : q;  // a NaN q passes through, as in torch.clamp
  p = sub_rn(p, mul_rn(mul_rn(sign_of(m), clipped), s.lr));
  return q < 1.f ? 1u : 0u;
}

// ---- per-op element functions: one(o) handles flat element o, four(o) elements o..o+3 -----------------

template <typename PT, typename GT>
struct SophiaOp {
  static constexpr bool kCounts = true;
  StepScalars s;

  __device__ uint32_t one(const TensorMeta& t, int64_t o) const {
    auto* p = reinterpret_cast<typename PT::T*>(t.ptr[kP]);
    const auto* g = reinterpret_cast<const typename GT::T*>(t.ptr[kG]);
    auto* m = reinterpret_cast<float*>(t.ptr[kM]);
    auto* h = reinterpret_cast<float*>(t.ptr[kH]);
    float pv = PT::to_float(p[o]), mv = m[o], hv = h[o];
    const uint32_t c = sophia_element(pv, GT::to_float(g[o]), mv, hv, s);
    p[o] = store_param<PT>(pv, o, t.seed);
    m[o] = mv;
    if (s.update_h) h[o] = hv;
    return c;
  }

  __device__ uint32_t four(const TensorMeta& t, int64_t o) const {
    auto* p = reinterpret_cast<typename PT::T*>(t.ptr[kP]);
    const auto* g = reinterpret_cast<const typename GT::T*>(t.ptr[kG]);
    auto* m = reinterpret_cast<float*>(t.ptr[kM]);
    auto* h = reinterpret_cast<float*>(t.ptr[kH]);
    Pack<typename PT::T> pp = load_pack(p, o);
    const Pack<typename GT::T> gp = load_pack(g, o);
    Pack<float> mp = load_pack(m, o), hp = load_pack(h, o);
    uint32_t c = 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      float pv = PT::to_float(pp.v[k]);
      c += sophia_element(pv, GT::to_float(gp.v[k]), mp.v[k], hp.v[k], s);
      pp.v[k] = store_param<PT>(pv, o + k, t.seed);
    }
    store_pack(p, o, pp);
    store_pack(m, o, mp);
    if (s.update_h) store_pack(h, o, hp);
    return c;
  }
};

template <typename GT>
struct HessianEmaOp {
  static constexpr bool kCounts = false;
  float beta2, one_minus_beta2;

  __device__ float ema(float h, float grad) const {
    return add_rn(mul_rn(h, beta2), mul_rn(mul_rn(grad, grad), one_minus_beta2));
  }
  __device__ uint32_t one(const TensorMeta& t, int64_t o) const {
    const auto* g = reinterpret_cast<const typename GT::T*>(t.ptr[kG]);
    auto* h = reinterpret_cast<float*>(t.ptr[kH]);
    h[o] = ema(h[o], GT::to_float(g[o]));
    return 0;
  }
  __device__ uint32_t four(const TensorMeta& t, int64_t o) const {
    const auto* g = reinterpret_cast<const typename GT::T*>(t.ptr[kG]);
    auto* h = reinterpret_cast<float*>(t.ptr[kH]);
    const Pack<typename GT::T> gp = load_pack(g, o);
    Pack<float> hp = load_pack(h, o);
#pragma unroll
    for (int k = 0; k < kVec; ++k) hp.v[k] = ema(hp.v[k], GT::to_float(gp.v[k]));
    store_pack(h, o, hp);
    return 0;
  }
};

template <typename GT>
struct NonfiniteOp {
  static constexpr bool kCounts = true;

  __device__ uint32_t one(const TensorMeta& t, int64_t o) const {
    return GT::nonfinite(reinterpret_cast<const typename GT::T*>(t.ptr[kG])[o]);
  }
  __device__ uint32_t four(const TensorMeta& t, int64_t o) const {
    const Pack<typename GT::T> gp = load_pack(reinterpret_cast<const typename GT::T*>(t.ptr[kG]), o);
    uint32_t c = 0;
#pragma unroll
    for (int k = 0; k < kVec; ++k) c += GT::nonfinite(gp.v[k]);
    return c;
  }
};

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
    multi_tensor_kernel(const int64_t* __restrict__ table, int64_t n_tensors, Op op, unsigned long long* counts) {
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

// Writes the table, copies it to the device and launches one block per chunk on the current stream.
template <typename Op>
void launch(const std::vector<TensorMeta>& metas, const Op& op, unsigned long long* counts, const at::Device& device) {
  if (metas.empty()) return;
  const int64_t n = static_cast<int64_t>(metas.size());
  int64_t chunks = 0;
  const at::Tensor table = multi_tensor::make_table(metas, &TensorMeta::work, kChunk, device, "simu_fast", &chunks);
  multi_tensor_kernel<Op><<<static_cast<unsigned int>(chunks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      table.data_ptr<int64_t>(), n, op, counts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 0: float32, 1: bfloat16, 2: float16.
int dtype_code(at::ScalarType t, const char* op, const char* what, size_t i) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: TORCH_CHECK(false, op, ": ", what, " ", i, " must be float32, bfloat16 or float16, got ", t);
  }
  return -1;
}

void check_tensor(const at::Tensor& x, const at::Device& device, int64_t numel, const char* op, const char* what,
                  size_t i) {
  TORCH_CHECK(x.device() == device, op, ": ", what, " ", i, " is on ", x.device(), ", expected ", device);
  TORCH_CHECK(x.is_contiguous(), op, ": ", what, " ", i, " must be contiguous");
  TORCH_CHECK(x.numel() == numel, op, ": ", what, " ", i, " has ", x.numel(), " elements, expected ", numel);
}

void check_lengths(size_t n, const IntList& kinds, const TensorList& masks, const IntList& row_lens, const char* op) {
  TORCH_CHECK(kinds.size() == n && masks.size() == n && row_lens.size() == n, op,
              ": kinds, mask tensors and row lengths must have one entry per tensor (", n, ")");
}

// The mask part of a TensorMeta (kind, row_len, n_index, mask, work) of tensor i with numel elements.
TensorMeta mask_meta(int64_t numel, int64_t kind, const at::Tensor& mask, int64_t row_len, const at::Device& device,
                     const char* op, size_t i) {
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
bool vector_kind(const TensorMeta& t) { return t.kind == kFull || (t.kind == kRows && t.row_len % kVec == 0); }

at::Device cuda_device(const at::Tensor& first, const char* op) {
  TORCH_CHECK(first.is_cuda(), op, ": tensors must be on a CUDA device, got ", first.device());
  return first.device();
}

}  // namespace

at::Tensor sophia_step_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList hessians,
                            IntList kinds, TensorList mask_tensors, IntList row_lens, double lr, double decay,
                            double beta1, double hessian_beta2, double rho_bs, double eps, bool maximize,
                            IntList sr_seeds) {
  constexpr const char* op = "sophia_step_cuda";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && hessians.size() == n && sr_seeds.size() == n, op,
              ": params, grads, exp_avgs, hessians and sr_seeds must have the same length (", n, ")");
  check_lengths(n, kinds, mask_tensors, row_lens, op);
  if (n == 0) return at::zeros({1}, at::TensorOptions().dtype(at::kLong));
  const at::Device device = cuda_device(params[0], op);
  const c10::cuda::CUDAGuard guard(device);

  // Scalars converted once, as the reference does (Python doubles -> float32 tensor ops).
  const bool update_h = hessian_beta2 >= 0.0;
  const StepScalars s{static_cast<float>(lr),
                      static_cast<float>(decay),
                      static_cast<float>(beta1),
                      static_cast<float>(1.0 - beta1),
                      static_cast<float>(update_h ? hessian_beta2 : 0.0),
                      static_cast<float>(update_h ? 1.0 - hessian_beta2 : 0.0),
                      static_cast<float>(rho_bs),
                      static_cast<float>(eps),
                      maximize,
                      update_h};

  std::vector<TensorMeta> groups[9];  // by param dtype code * 3 + grad dtype code
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &h = hessians[i];
    const int64_t numel = p.numel();
    check_tensor(p, device, numel, op, "parameter", i);
    check_tensor(g, device, numel, op, "gradient", i);
    check_tensor(m, device, numel, op, "exp_avg", i);
    check_tensor(h, device, numel, op, "hessian", i);
    TORCH_CHECK(m.scalar_type() == at::kFloat && h.scalar_type() == at::kFloat, op, ": exp_avg and hessian ", i,
                " must be float32");
    const int pc = dtype_code(p.scalar_type(), op, "parameter", i);
    const int gc = dtype_code(g.scalar_type(), op, "gradient", i);
    TensorMeta t = mask_meta(numel, kinds[i], mask_tensors[i], row_lens[i], device, op, i);
    if (t.work == 0) continue;
    t.ptr[kP] = reinterpret_cast<int64_t>(p.data_ptr());
    t.ptr[kG] = reinterpret_cast<int64_t>(g.data_ptr());
    t.ptr[kM] = reinterpret_cast<int64_t>(m.data_ptr());
    t.ptr[kH] = reinterpret_cast<int64_t>(h.data_ptr());
    t.seed = sr_seeds[i];
    t.slot = 0;
    t.vec = vector_kind(t) && aligned_for_vec(p) && aligned_for_vec(g) && aligned_for_vec(m) && aligned_for_vec(h);
    groups[pc * 3 + gc].push_back(t);
  }

  at::Tensor unclipped = at::zeros({1}, at::TensorOptions().dtype(at::kLong).device(device));
  auto* counts = reinterpret_cast<unsigned long long*>(unclipped.data_ptr<int64_t>());
  for (int pc = 0; pc < 3; ++pc) {
    for (int gc = 0; gc < 3; ++gc) {
      const std::vector<TensorMeta>& metas = groups[pc * 3 + gc];
      if (metas.empty()) continue;
      with_type(pc, [&](auto p_tag) {
        with_type(gc, [&](auto g_tag) {
          launch(metas, SophiaOp<decltype(p_tag), decltype(g_tag)>{s}, counts, device);
        });
      });
    }
  }
  return unclipped;
}

void hessian_ema_cuda(TensorList hessians, TensorList grads, IntList kinds, TensorList mask_tensors,
                      IntList row_lens, double beta2) {
  constexpr const char* op = "hessian_ema_cuda";
  const size_t n = hessians.size();
  TORCH_CHECK(grads.size() == n, op, ": hessians and grads must have the same length (", n, ")");
  check_lengths(n, kinds, mask_tensors, row_lens, op);
  if (n == 0) return;
  const at::Device device = cuda_device(hessians[0], op);
  const c10::cuda::CUDAGuard guard(device);

  std::vector<TensorMeta> groups[3];  // by grad dtype code
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &h = hessians[i], &g = grads[i];
    const int64_t numel = h.numel();
    check_tensor(h, device, numel, op, "hessian", i);
    check_tensor(g, device, numel, op, "gradient", i);
    TORCH_CHECK(h.scalar_type() == at::kFloat, op, ": hessian ", i, " must be float32");
    const int gc = dtype_code(g.scalar_type(), op, "gradient", i);
    TensorMeta t = mask_meta(numel, kinds[i], mask_tensors[i], row_lens[i], device, op, i);
    if (t.work == 0) continue;
    t.ptr[kG] = reinterpret_cast<int64_t>(g.data_ptr());
    t.ptr[kH] = reinterpret_cast<int64_t>(h.data_ptr());
    t.vec = vector_kind(t) && aligned_for_vec(g) && aligned_for_vec(h);
    groups[gc].push_back(t);
  }

  const float b2 = static_cast<float>(beta2), omb2 = static_cast<float>(1.0 - beta2);
  for (int gc = 0; gc < 3; ++gc) {
    if (groups[gc].empty()) continue;
    with_type(gc, [&](auto g_tag) {
      launch(groups[gc], HessianEmaOp<decltype(g_tag)>{b2, omb2}, nullptr, device);
    });
  }
}

at::Tensor count_nonfinite_cuda(TensorList grads, IntList kinds, TensorList mask_tensors, IntList row_lens) {
  constexpr const char* op = "count_nonfinite_cuda";
  const size_t n = grads.size();
  check_lengths(n, kinds, mask_tensors, row_lens, op);
  if (n == 0) return at::zeros({0}, at::TensorOptions().dtype(at::kLong));
  const at::Device device = cuda_device(grads[0], op);
  const c10::cuda::CUDAGuard guard(device);

  std::vector<TensorMeta> groups[3];  // by grad dtype code
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    check_tensor(g, device, g.numel(), op, "gradient", i);
    const int gc = dtype_code(g.scalar_type(), op, "gradient", i);
    TensorMeta t = mask_meta(g.numel(), kinds[i], mask_tensors[i], row_lens[i], device, op, i);
    if (t.work == 0) continue;
    t.ptr[kG] = reinterpret_cast<int64_t>(g.data_ptr());
    t.slot = static_cast<int64_t>(i);
    t.vec = vector_kind(t) && aligned_for_vec(g);
    groups[gc].push_back(t);
  }

  at::Tensor out = at::zeros({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kLong).device(device));
  auto* counts = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  for (int gc = 0; gc < 3; ++gc) {
    if (groups[gc].empty()) continue;
    with_type(gc, [&](auto g_tag) { launch(groups[gc], NonfiniteOp<decltype(g_tag)>{}, counts, device); });
  }
  return out;
}

}  // namespace simu_fast
