// Integrated-gradients accumulation on the CPU. Semantics: simu_fast/ops/ig_accumulate.py.
//
// The positions (r, t) with a non-zero scale weight[r] * mask[r, t] are listed first (R * S entries at
// most, never R * S * F). The features are then cut into tiles; a work item is one tile over all the
// listed positions (or over a contiguous part of them, see below): it keeps float32 sums for its tile in
// a small stack buffer and streams act / grad rows through a SIMD inner loop over the features, so act
// and grad are read once and nothing of size R * S * F is allocated.
//
// When F is too small to give every thread a tile and there are many positions, the positions are also
// split into parts: each part writes its per-feature sums into a [parts, F] float32 buffer, which is
// then added to out in part order. The split depends only on F, the number of positions and
// at::get_num_threads(), so a run is deterministic for a given thread count.
//
// Positions whose scale is 0 are skipped without reading act or grad: a non-finite activation at a
// masked position does not turn the sums into NaN (the eager reference would compute 0 * inf = NaN).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../ig_accumulate.h"

namespace simu_fast {
namespace {

constexpr int64_t kMaxTile = 1024;      // features per work item, at most (4 KiB of sums, in L1)
constexpr int64_t kMinTile = 64;        // ... and at least, so each row visit streams >= 64 elements
constexpr int64_t kMinPartRows = 256;   // positions per part when positions are split across threads

// Widening loads that vectorise inside the SIMD loop (c10::Half's own conversion does not).
inline float to_f32(float x) { return x; }
inline float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b;
}
inline float to_f32(c10::BFloat16 x) { return bits_to_f32(static_cast<uint32_t>(x.x) << 16); }
// IEEE half -> float, exact for every input and without denormal arithmetic (so DAZ / FTZ modes cannot
// change it): exponent and mantissa move into float32 position with the exponent rebased by 112; a
// subnormal half m * 2^-24 is (2^-14 + m * 2^-24) - 2^-14, both normal; Inf / NaN get an all-ones
// exponent and keep their mantissa.
inline float to_f32(c10::Half x) {
  const uint32_t h = x.x, em = h & 0x7FFFu, e = h & 0x7C00u;
  const float normal = bits_to_f32((em << 13) + (112u << 23));
  const float subnormal = bits_to_f32((em << 13) + (113u << 23)) - bits_to_f32(113u << 23);
  uint32_t b = f32_to_bits(e == 0 ? subnormal : normal);
  b |= e == 0x7C00u ? 0x7F800000u : 0u;
  return bits_to_f32(b | ((h & 0x8000u) << 16));
}

// sums[0 .. n) = (float32) sum over positions i in [p0, p1) of scale[i] * act[row i][k0 + j] * grad[...].
template <typename T>
void tile_sums(float* __restrict sums, const T* __restrict act, const T* __restrict grad, const int64_t* pos,
               const float* scale, int64_t p0, int64_t p1, int64_t features, int64_t k0, int64_t n) {
  std::fill(sums, sums + n, 0.f);
  for (int64_t i = p0; i < p1; ++i) {
    const int64_t base = pos[i] * features + k0;  // int64: R * S * F may pass 2^31
    const T* __restrict a = act + base;
    const T* __restrict g = grad + base;
    const float s = scale[i];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) sums[j] += s * (to_f32(a[j]) * to_f32(g[j]));
  }
}

template <typename T>
void accumulate(float* out, const T* act, const T* grad, const std::vector<int64_t>& pos,
                const std::vector<float>& scale, int64_t features) {
  const int64_t n_pos = static_cast<int64_t>(pos.size());
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Tiles of equal size (a multiple of 16), enough of them to give each thread one where F allows.
  const int64_t per_thread = (features + threads - 1) / threads;
  const int64_t tile = std::min(kMaxTile, std::max(kMinTile, (per_thread + 15) / 16 * 16));
  const int64_t n_tiles = (features + tile - 1) / tile;
  int64_t parts = 1;
  if (n_tiles < threads) {
    parts = std::min((threads + n_tiles - 1) / n_tiles, std::max<int64_t>(1, n_pos / kMinPartRows));
  }
  const int64_t part_len = (n_pos + parts - 1) / parts;
  parts = (n_pos + part_len - 1) / part_len;  // no empty part

  if (parts == 1) {
    at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float sums[kMaxTile];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t k0 = t * tile, n = std::min(tile, features - k0);
        tile_sums(sums, act, grad, pos.data(), scale.data(), 0, n_pos, features, k0, n);
        for (int64_t j = 0; j < n; ++j) out[k0 + j] += sums[j];
      }
    });
    return;
  }

  std::vector<float> partial(static_cast<size_t>(parts * features));  // [parts, F], parts <= threads
  at::parallel_for(0, n_tiles * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t part = w / n_tiles, t = w % n_tiles;
      const int64_t k0 = t * tile, n = std::min(tile, features - k0);
      const int64_t p0 = part * part_len, p1 = std::min(n_pos, p0 + part_len);
      tile_sums(partial.data() + part * features + k0, act, grad, pos.data(), scale.data(), p0, p1, features, k0,
                n);
    }
  });
  for (int64_t k = 0; k < features; ++k) {
    float total = 0.f;
    for (int64_t part = 0; part < parts; ++part) total += partial[part * features + k];
    out[k] += total;
  }
}

}  // namespace

void ig_accumulate_cpu(at::Tensor out, at::Tensor act, at::Tensor grad, at::Tensor weight, at::Tensor mask) {
  constexpr const char* op = "ig_accumulate_cpu";
  check_ig_accumulate_args(out, act, grad, weight, mask, op);
  const int64_t R = act.size(0), S = act.size(1), F = act.size(2);
  for (const at::Tensor* t : {&out, &act, &grad, &weight, &mask}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": tensors must be on the CPU, got ", t->device());
    TORCH_CHECK(t->is_contiguous(), op, ": tensors must be contiguous");
  }
  if (R * S == 0 || F == 0) return;

  // Positions with a non-zero scale (the reference's float32 weight * mask), in row order.
  const float* w = weight.data_ptr<float>();
  const uint8_t* m = mask.data_ptr<uint8_t>();
  std::vector<int64_t> pos;
  std::vector<float> scale;
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t t = 0; t < S; ++t) {
      const float s = w[r] * static_cast<float>(m[r * S + t]);
      if (s != 0.f) {
        pos.push_back(r * S + t);
        scale.push_back(s);
      }
    }
  }
  if (pos.empty()) return;

  float* o = out.data_ptr<float>();
  switch (act.scalar_type()) {
    case at::kFloat:
      accumulate(o, act.data_ptr<float>(), grad.data_ptr<float>(), pos, scale, F);
      break;
    case at::kBFloat16:
      accumulate(o, act.data_ptr<c10::BFloat16>(), grad.data_ptr<c10::BFloat16>(), pos, scale, F);
      break;
    case at::kHalf:
      accumulate(o, act.data_ptr<c10::Half>(), grad.data_ptr<c10::Half>(), pos, scale, F);
      break;
    default:
      TORCH_CHECK(false, op, ": act must be float32, bfloat16 or float16, got ", act.scalar_type());
  }
}

}  // namespace simu_fast
