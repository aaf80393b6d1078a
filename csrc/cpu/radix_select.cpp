// Radix select kernels on the CPU: radix_histogram, select_mask and bracket_mask. Semantics:
// simu_fast/ops/radix_select.py; the key transform and the argument plans are in ../radix_select.h.
//
// radix_histogram: x is cut into one contiguous chunk per thread (at::parallel_for over the chunks); a chunk
// is walked kBlock elements at a time: a branch-free SIMD loop turns the block into bin numbers (0..255 the
// digit, 256 NaN, 257 not counted), then a scalar loop counts them into four interleaved local histograms
// (consecutive equal bins, e.g. many ties, then hit four counters instead of one: no store-to-load
// dependency chain). The chunks' histograms are added in chunk order at the end. Integer counts: the
// result does not depend on the thread count. Mode INDICES only visits the window of indices that pass the
// prefix test (radix_index_window: after the first index pass, 1/256 of x or less).
//
// select_mask: one pass, threads over ranges; within a range the index test splits it at the cut-off, so
// each part is a plain SIMD compare of 32-bit keys (key >= kth before the cut-off, key > kth after it).
//
// bracket_mask: one pass, one contiguous chunk per thread; on a CPU with AVX2 or AVX-512 each whole block of
// kBlock elements goes through a routine of bracket_simd.h (compares into bit masks: the mask bytes, the
// counts by popcount and the candidates' bits); elsewhere, and for the last partial block, a portable SIMD
// loop writes the mask bytes (key > hi) and flags the candidates (lo <= key <= hi) and the NaN in a local
// byte array, then a SWAR count of the bytes and a scan of the flags 64 at a time. Either way the bits of
// 64 elements, one step per candidate (they are a few percent of x), append the candidates' indices and
// values to the chunk's lists. The lists are concatenated in chunk order: the candidates come out in
// ascending index order (each chunk lists into its own region of the outputs, closed up at the end). A chunk
// stops storing (and keeps counting) at `capacity` candidates, so a bracket that missed touches no more
// memory than that, and a counting pass (capacity 0) runs at the speed of the mask alone. Chunks are whole
// blocks, so with block_counts each block's candidate count (computed anyway) goes out as well: the tied
// top-k's index cut-off then needs no pass over x (radix_select.py, _cutoff_in_blocks), and with mask_mode 2
// the candidates' mask bytes are 2, so the mask is finished from its own bytes, not from x. mask_mode 0
// (kth_largest) writes no mask: the count above without the n-byte store and its page faults.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../radix_select.h"
#include "bracket_simd.h"

namespace simu_fast {
namespace {
#if defined(__x86_64__) && defined(__GNUC__)
using namespace cpu;  // BracketBlock, BracketBounds, bracket_bounds, bracket_block_avx2 / avx512, kBracket*
#endif

// The extension is built for the baseline x86-64 (SSE2); a pass that must run at memory speed also gets
// AVX2 and AVX-512 versions, picked at load time by the CPU it runs on (GCC's target_clones). Measured on
// the bracket pass over 1e7 float32 with no candidates, 2 threads: 3.2-3.7 ms with them, 7.1-7.4 ms without.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11  // x86-64-v4: GCC 11
#define SIMU_FAST_WIDE_SIMD __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SIMU_FAST_WIDE_SIMD __attribute__((target_clones("avx2", "default")))
#else
#define SIMU_FAST_WIDE_SIMD
#endif

constexpr int64_t kBlock = kBracketCountBlock;  // elements binned per inner SIMD loop (and counted per block)
constexpr int64_t kMinChunk = 1 << 16;   // elements per thread, at least
constexpr int64_t kSelectGrain = 1 << 16;
constexpr int kCopies = 4;               // interleaved local histograms
constexpr int kLocalBins = 258;          // 256 digits, NaN, not counted

using Local = std::array<std::array<int64_t, kLocalBins>, kCopies>;

// The number of bytes of bytes[0, n) whose bit `bit` is set, for n <= kBlock. SWAR: 64-bit adds of eight
// lanes at a time (a lane sums at most kBlock / 8 <= 255 bits). In a stand-alone copy of the bracket pass
// (1e7 float32, 2 threads) the pass took 1.8 ms with it, 2.9 ms with a widening SIMD sum of the bytes.
inline uint32_t count_bit(const uint8_t* bytes, int64_t n, int bit) {
  static_assert(kBlock / 8 <= 255, "a byte lane must not overflow");
  const uint64_t lanes = 0x0101010101010101ull << bit;
  uint64_t sums = 0;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    uint64_t word;
    std::memcpy(&word, bytes + j, 8);
    sums += (word & lanes) >> bit;
  }
  uint32_t total = 0;
  for (int lane = 0; lane < 8; ++lane) total += (sums >> (8 * lane)) & 0xFF;
  for (; j < n; ++j) total += (bytes[j] >> bit) & 1u;
  return total;
}

// Mode KEYS: every element of [begin, end) becomes a bin (0..255 the digit, 256 NaN, 257 not counted) in a
// SIMD loop, then the bins are counted.
template <typename Format>
SIMU_FAST_WIDE_SIMD void key_histogram_chunk(const typename Format::Bits* __restrict x, int64_t begin,
                                             int64_t end, const RadixHistogramPlan& p, Local& counts) {
  const bool absolute = p.absolute;
  const uint32_t key_mask = p.key_mask, key_target = p.key_target, key_shift = p.key_shift,
                 key_digit = p.key_digit;
  alignas(64) uint16_t bins[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    const typename Format::Bits* __restrict xb = x + b;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t raw = xb[j];
      const uint32_t key = radix_key(raw, Format::kSign, absolute);
      const uint32_t digit = (key >> key_shift) & key_digit;
      const uint32_t bin = (key & key_mask) == key_target ? digit : kRadixSkipBin;
      bins[j] = static_cast<uint16_t>(radix_is_nan(raw, Format::kSign, Format::kInf) ? kRadixNanBin : bin);
    }
    int64_t j = 0;
    for (; j + kCopies <= n; j += kCopies) {
      ++counts[0][bins[j]];
      ++counts[1][bins[j + 1]];
      ++counts[2][bins[j + 2]];
      ++counts[3][bins[j + 3]];
    }
    for (; j < n; ++j) ++counts[0][bins[j]];
  }
}

// Mode INDICES, within the index window (every index there passes the prefix test): a SIMD loop flags the
// elements whose key == key_equal, then the flagged ones count the digit of their global index.
template <typename Format>
SIMU_FAST_WIDE_SIMD void index_histogram_chunk(const typename Format::Bits* __restrict x, int64_t begin,
                                               int64_t end, const RadixHistogramPlan& p, Local& counts) {
  const bool absolute = p.absolute;
  const uint32_t key_equal = p.key_equal, shift = p.index_shift;
  const int64_t offset = p.index_offset;
  alignas(64) uint8_t equal[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    const typename Format::Bits* __restrict xb = x + b;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) equal[j] = radix_key(xb[j], Format::kSign, absolute) == key_equal ? 1 : 0;
    const int64_t first_digit = ((offset + b) >> shift) & 0xFF;
    if (((offset + b) >> shift) == ((offset + b + n - 1) >> shift)) {  // the block within one digit: one count
      counts[0][first_digit] += count_bit(equal, n, 0);
      continue;
    }
    for (int64_t j = 0; j < n; ++j) {  // branch-free: ties make the test unpredictable
      counts[j & (kCopies - 1)][((offset + b + j) >> shift) & 0xFF] += equal[j];
    }
  }
}

template <typename Format, int64_t kMode>
void histogram(const at::Tensor& x, const RadixHistogramPlan& p, int64_t* out) {
  const auto* bits = reinterpret_cast<const typename Format::Bits*>(x.data_ptr());
  int64_t first = 0, last = x.numel();
  if (kMode == kRadixIndices && !radix_index_window(p, x.numel(), first, last)) return;
  const int64_t numel = last - first;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min(threads, numel / kMinChunk));
  const int64_t chunk = (numel + chunks - 1) / chunks;
  std::vector<std::array<int64_t, kLocalBins>> partial(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Local counts{};
      const int64_t begin = first + c * chunk, end = std::min(last, begin + chunk);
      if (begin < end) {
        if (kMode == kRadixKeys) key_histogram_chunk<Format>(bits, begin, end, p, counts);
        else index_histogram_chunk<Format>(bits, begin, end, p, counts);
      }
      for (int b = 0; b < kLocalBins; ++b) {
        partial[c][b] = counts[0][b] + counts[1][b] + counts[2][b] + counts[3][b];
      }
    }
  });
  for (const auto& h : partial) {
    for (int b = 0; b < 256; ++b) out[b] += h[b];
    if (kMode == kRadixKeys) out[kRadixNanBin] += h[kRadixNanBin];
  }
}

// o[i] for i in [begin, end): i <= cut: key >= kth; i > cut: key > kth.
template <typename Format>
SIMU_FAST_WIDE_SIMD void select_range(const typename Format::Bits* __restrict x, uint8_t* __restrict o,
                                      int64_t begin, int64_t end, bool absolute, uint32_t kth, int64_t cut) {
  const int64_t split = std::min(end, std::max(begin, cut + 1));
#pragma omp simd
  for (int64_t i = begin; i < split; ++i) o[i] = radix_key(x[i], Format::kSign, absolute) >= kth ? 1 : 0;
#pragma omp simd
  for (int64_t i = split; i < end; ++i) o[i] = radix_key(x[i], Format::kSign, absolute) > kth ? 1 : 0;
}

template <typename Format>
void select(const at::Tensor& x, bool absolute, const RadixSelectPlan& p, uint8_t* out) {
  const auto* bits = reinterpret_cast<const typename Format::Bits*>(x.data_ptr());
  at::parallel_for(0, x.numel(), kSelectGrain, [&](int64_t begin, int64_t end) {
    select_range<Format>(bits, out, begin, end, absolute, p.kth, p.cut);
  });
}

// out[positions[i]] = the select_mask byte of values[i], i in [0, m); false where a position is out of range
// (nothing written there).
template <typename Format>
bool scatter_select(const typename Format::Bits* __restrict values, const int64_t* __restrict positions, int64_t m,
                    bool absolute, const RadixSelectPlan& p, uint8_t* __restrict out, int64_t numel) {
  std::atomic<bool> in_range{true};
  at::parallel_for(0, m, kSelectGrain, [&](int64_t begin, int64_t end) {
    bool ok = true;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t pos = positions[i];
      if (pos < 0 || pos >= numel) {
        ok = false;
        continue;
      }
      const uint32_t key = radix_key(values[i], Format::kSign, absolute);
      out[pos] = (key > p.kth || (key == p.kth && i <= p.cut)) ? 1 : 0;
    }
    if (!ok) in_range = false;
  });
  return in_range;
}

// Bit t of the result: bit 0 of flag[t], t < 64 (flag 64-byte aligned). SSE2 (every x86-64) moves the bits
// out 16 at a time; in a stand-alone copy of the bracket pass with 1.6% candidates this scan took 3.3 ms
// against 4.2 ms for a test of every eight flags and a branch-free store of each of those eight.
inline uint64_t candidate_bits(const uint8_t* flag) {
  uint64_t bits = 0;
#if defined(__SSE2__)
  for (int q = 0; q < 4; ++q) {
    const __m128i v = _mm_load_si128(reinterpret_cast<const __m128i*>(flag + 16 * q));
    bits |= static_cast<uint64_t>(static_cast<uint32_t>(_mm_movemask_epi8(_mm_slli_epi16(v, 7)))) << (16 * q);
  }
#else
  for (int t = 0; t < 64; ++t) bits |= static_cast<uint64_t>(flag[t] & 1u) << t;
#endif
  return bits;
}

template <typename Bits>
struct BracketChunk {
  int64_t above = 0, candidates = 0, nan = 0, stored = 0;
  int64_t* index = nullptr;  // [0, stored) hold the chunk's candidates, in its region of the output lists
  Bits* bits = nullptr;
  int32_t* block_counts = nullptr;  // candidates per kBlock elements (global blocks: chunks start at multiples)
};

// A block's candidates (starting at flat index b, n elements; word(j): the bits of those among xb[j, j + 64))
// appended to the chunk's lists, or only counted (count()) once the chunk has no room left; the number goes
// to the block's slot of block_counts.
template <typename Bits, typename Word, typename Count>
inline void add_candidates(BracketChunk<Bits>& c, const Bits* __restrict xb, int64_t b, int64_t n, int64_t capacity,
                           Word word, Count count) {
  int64_t found;
  if (c.stored >= capacity) {  // no room left (or none asked for): count the candidates, list nothing
    found = count();
  } else {
    int64_t* __restrict index = c.index;
    Bits* __restrict kept = c.bits;
    int64_t stored = c.stored;
    for (int64_t j = 0; j < n; j += 64) {  // one step per candidate: they are a few percent of x
      for (uint64_t bits = word(j); bits != 0; bits &= bits - 1) {
        const int t = __builtin_ctzll(bits);
        index[stored] = b + j + t;
        kept[stored] = xb[j + t];
        ++stored;
      }
    }
    found = stored - c.stored;
    c.stored = std::min(stored, capacity);  // past capacity: counted, not kept
  }
  c.candidates += found;
  if (c.block_counts != nullptr) c.block_counts[b / kBlock] = static_cast<int32_t>(found);
}

template <typename Format>
SIMU_FAST_WIDE_SIMD void bracket_chunk(const typename Format::Bits* __restrict x, uint8_t* __restrict out,
                                       int64_t begin, int64_t end, bool absolute, uint32_t lo, uint32_t hi,
                                       int64_t capacity, uint8_t inside_byte, BracketChunk<typename Format::Bits>& c) {
  alignas(64) uint8_t flag[kBlock];  // 1: a candidate, 2: NaN
  alignas(64) uint8_t above[kBlock];  // the mask bytes when no mask is written (out == nullptr)
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    const typename Format::Bits* __restrict xb = x + b;
    uint8_t* __restrict ob = out != nullptr ? out + b : above;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t raw = xb[j];
      const uint32_t key = radix_key(raw, Format::kSign, absolute);
      const bool is_nan = radix_is_nan(raw, Format::kSign, Format::kInf);
      const bool inside = !is_nan && key >= lo && key <= hi;
      ob[j] = (!is_nan && key > hi) ? 1 : (inside ? inside_byte : 0);
      flag[j] = is_nan ? 2 : (inside ? 1 : 0);
    }
    c.above += count_bit(ob, n, 0);
    c.nan += count_bit(flag, n, 1);
    for (int64_t j = n; j < kBlock && j % 64 != 0; ++j) flag[j] = 0;  // whole groups of 64 below
    add_candidates(c, xb, b, n, capacity, [&](int64_t j) { return candidate_bits(flag + j); },
                   [&] { return static_cast<int64_t>(count_bit(flag, n, 0)); });
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// bracket_chunk with a block routine of bracket_simd.h for every whole block, the portable loop for the last,
// partial one.
template <typename Bits>
using BlockRoutine = void (*)(const Bits*, uint8_t*, uint8_t, BracketBounds, BracketBlock&);

template <typename Format>
void bracket_chunk_blocks(const typename Format::Bits* __restrict x, uint8_t* __restrict out, int64_t begin,
                          int64_t end, bool absolute, uint32_t lo, uint32_t hi, int64_t capacity,
                          uint8_t inside_byte, BracketChunk<typename Format::Bits>& c,
                          BlockRoutine<typename Format::Bits> block, BracketBounds bounds) {
  const int64_t whole = begin + (end - begin) / kBlock * kBlock;
  BracketBlock r;
  for (int64_t b = begin; b < whole; b += kBlock) {
    block(x + b, out != nullptr ? out + b : nullptr, inside_byte, bounds, r);
    c.above += r.above;
    c.nan += r.nan;
    add_candidates(c, x + b, b, kBlock, capacity, [&](int64_t j) { return r.inside[j / 64]; },
                   [&] { return r.inside_count; });
  }
  if (whole < end) bracket_chunk<Format>(x, out, whole, end, absolute, lo, hi, capacity, inside_byte, c);
}
#endif

template <typename Format>
std::vector<at::Tensor> bracket(const at::Tensor& x, bool absolute, uint32_t lo, uint32_t hi, int64_t capacity,
                                bool block_counts, int64_t mask_mode, int simd) {
  using Bits = typename Format::Bits;
  const auto* bits = reinterpret_cast<const Bits*>(x.data_ptr());
  const int64_t numel = x.numel();
  at::Tensor mask = at::empty({mask_mode != kBracketNoMask ? numel : 0}, x.options().dtype(at::kByte));
  uint8_t* out = mask_mode != kBracketNoMask ? mask.data_ptr<uint8_t>() : nullptr;
  const uint8_t inside_byte = mask_mode == kBracketMarkInside ? 2 : 0;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min(threads, numel / kMinChunk));
  const int64_t chunk = ((numel + chunks - 1) / chunks + kBlock - 1) / kBlock * kBlock;  // whole blocks
  at::Tensor counts_per_block = at::empty({block_counts ? (numel + kBlock - 1) / kBlock : 0},
                                          x.options().dtype(at::kInt));
  // Each chunk lists into its own region of the outputs: room for what it may keep (capacity, at most its
  // length) and one block past it. Only the pages written are ever touched; the regions are closed up below.
  const int64_t room = std::min(capacity, chunk) + kBlock;
  at::Tensor index = at::empty({chunks * room}, x.options().dtype(at::kLong));
  at::Tensor values = at::empty({chunks * room}, x.options());
  std::vector<BracketChunk<Bits>> parts(static_cast<size_t>(chunks));
  for (int64_t c = 0; c < chunks; ++c) {
    parts[c].index = index.data_ptr<int64_t>() + c * room;
    parts[c].bits = reinterpret_cast<Bits*>(values.data_ptr()) + c * room;
    if (block_counts) parts[c].block_counts = counts_per_block.data_ptr<int32_t>();
  }
  auto chunk_pass = [&](int64_t begin, int64_t end, BracketChunk<Bits>& part) {
#if defined(__x86_64__) && defined(__GNUC__)
    const BlockRoutine<Bits> routine =
        simd == kBracketAvx512 ? (absolute ? bracket_block_avx512<Format, true> : bracket_block_avx512<Format, false>)
        : simd == kBracketAvx2 ? (absolute ? bracket_block_avx2<Format, true> : bracket_block_avx2<Format, false>)
                               : nullptr;
    if (routine != nullptr) {
      return bracket_chunk_blocks<Format>(bits, out, begin, end, absolute, lo, hi, capacity, inside_byte, part,
                                          routine, bracket_bounds<Format>(lo, hi));
    }
#endif
    bracket_chunk<Format>(bits, out, begin, end, absolute, lo, hi, capacity, inside_byte, part);
  };
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * chunk, end = std::min(numel, begin + chunk);
      if (begin < end) chunk_pass(begin, end, parts[c]);
    }
  });
  at::Tensor counts = at::zeros({3}, x.options().dtype(at::kLong));
  int64_t* n = counts.data_ptr<int64_t>();
  int64_t stored = 0;
  for (const auto& c : parts) {
    n[0] += c.above;
    n[1] += c.candidates;
    n[2] += c.nan;
    stored += c.stored;
  }
  const int64_t kept = std::min(stored, capacity);
  int64_t filled = 0;
  for (const auto& c : parts) {  // chunk order: ascending indices; each region moves down (memmove: overlap)
    const int64_t take = std::min(c.stored, kept - filled);
    std::memmove(index.data_ptr<int64_t>() + filled, c.index, static_cast<size_t>(take) * sizeof(int64_t));
    std::memmove(reinterpret_cast<Bits*>(values.data_ptr()) + filled, c.bits, static_cast<size_t>(take) * sizeof(Bits));
    filled += take;
  }
  return {mask, index.narrow(0, 0, kept), values.narrow(0, 0, kept), counts, counts_per_block};
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": x must be on the CPU, got ", x.device());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
}

}  // namespace

at::Tensor radix_histogram_cpu(at::Tensor x, bool absolute, int64_t mode, int64_t key_prefix, int64_t prefix_bits,
                               int64_t shift, int64_t index_offset, int64_t key_equal) {
  constexpr const char* op = "radix_histogram_cpu";
  check_input(x, op);
  const int bits = radix_key_bits(x, op);
  TORCH_CHECK(mode == kRadixKeys || mode == kRadixIndices, op, ": mode must be 0 (keys) or 1 (indices), got ", mode);
  TORCH_CHECK(shift >= 0 && shift < 64, op, ": shift must be in [0, 64), got ", shift);
  at::Tensor out = at::zeros({257}, x.options().dtype(at::kLong));
  const RadixHistogramPlan plan =
      radix_histogram_plan(bits, absolute, mode, key_prefix, prefix_bits, shift, index_offset, key_equal);
  if (x.numel() == 0 || plan.nothing) return out;
  int64_t* o = out.data_ptr<int64_t>();
  const bool keys = mode == kRadixKeys;
  switch (x.scalar_type()) {
    case at::kFloat:
      keys ? histogram<RadixF32, kRadixKeys>(x, plan, o) : histogram<RadixF32, kRadixIndices>(x, plan, o);
      break;
    case at::kBFloat16:
      keys ? histogram<RadixBF16, kRadixKeys>(x, plan, o) : histogram<RadixBF16, kRadixIndices>(x, plan, o);
      break;
    default:
      keys ? histogram<RadixF16, kRadixKeys>(x, plan, o) : histogram<RadixF16, kRadixIndices>(x, plan, o);
      break;
  }
  return out;
}

at::Tensor select_mask_cpu(at::Tensor x, bool absolute, int64_t kth_key, int64_t index_cutoff, int64_t index_offset) {
  constexpr const char* op = "select_mask_cpu";
  check_input(x, op);
  const int bits = radix_key_bits(x, op);
  at::Tensor out = at::empty({x.numel()}, x.options().dtype(at::kByte));
  if (x.numel() == 0) return out;
  const RadixSelectPlan plan = radix_select_plan(bits, kth_key, index_cutoff, index_offset, x.numel());
  uint8_t* o = out.data_ptr<uint8_t>();
  switch (x.scalar_type()) {
    case at::kFloat: select<RadixF32>(x, absolute, plan, o); break;
    case at::kBFloat16: select<RadixBF16>(x, absolute, plan, o); break;
    default: select<RadixF16>(x, absolute, plan, o); break;
  }
  return out;
}

void scatter_select_cpu(at::Tensor values, bool absolute, int64_t kth_key, int64_t index_cutoff, at::Tensor out,
                        at::Tensor positions) {
  constexpr const char* op = "scatter_select_cpu";
  check_input(values, op);
  const int bits = radix_key_bits(values, op);
  const bool byte_mask = out.scalar_type() == at::kByte || out.scalar_type() == at::kBool;
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && byte_mask, op,
              ": out must be a contiguous uint8 or bool CPU tensor, got ", out.scalar_type(), " on ", out.device());
  TORCH_CHECK(positions.device().is_cpu() && positions.is_contiguous() && positions.scalar_type() == at::kLong &&
                  positions.numel() == values.numel(),
              op, ": positions must be a contiguous int64 CPU tensor with one entry per value (", values.numel(),
              "), got ", positions.scalar_type(), " [", positions.numel(), "]");
  if (values.numel() == 0) return;
  const RadixSelectPlan plan = radix_select_plan(bits, kth_key, index_cutoff, 0, values.numel());
  auto* o = static_cast<uint8_t*>(out.data_ptr());
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t m = values.numel(), n = out.numel();
  const void* v = values.data_ptr();
  bool in_range;
  switch (values.scalar_type()) {
    case at::kFloat:
      in_range = scatter_select<RadixF32>(static_cast<const uint32_t*>(v), pos, m, absolute, plan, o, n);
      break;
    case at::kBFloat16:
      in_range = scatter_select<RadixBF16>(static_cast<const uint16_t*>(v), pos, m, absolute, plan, o, n);
      break;
    default:
      in_range = scatter_select<RadixF16>(static_cast<const uint16_t*>(v), pos, m, absolute, plan, o, n);
      break;
  }
  TORCH_CHECK(in_range, op, ": positions must be in [0, ", n, ")");
}

std::vector<at::Tensor> bracket_mask_cpu(at::Tensor x, bool absolute, int64_t lo_key, int64_t hi_key,
                                         int64_t capacity, bool block_counts, int64_t mask_mode, int64_t simd) {
  constexpr const char* op = "bracket_mask_cpu";
  check_input(x, op);
  const int bits = radix_key_bits(x, op);
  check_bracket(bits, lo_key, hi_key, capacity, op);
  TORCH_CHECK(kBracketNoMask <= mask_mode && mask_mode <= kBracketMarkInside, op,
              ": mask_mode must be 0 (no mask), 1 (above) or 2 (above, candidates marked 2), got ", mask_mode);
  const int64_t best = bracket_simd_level_cpu();
  TORCH_CHECK(-1 <= simd && simd <= best, op, ": simd must be -1 (the widest) or 0..", best,
              " (portable, avx2, avx512) on this CPU, got ", simd);
  const int level = static_cast<int>(simd < 0 ? best : simd);
  const auto lo = static_cast<uint32_t>(lo_key), hi = static_cast<uint32_t>(hi_key);
  switch (x.scalar_type()) {
    case at::kFloat: return bracket<RadixF32>(x, absolute, lo, hi, capacity, block_counts, mask_mode, level);
    case at::kBFloat16: return bracket<RadixBF16>(x, absolute, lo, hi, capacity, block_counts, mask_mode, level);
    default: return bracket<RadixF16>(x, absolute, lo, hi, capacity, block_counts, mask_mode, level);
  }
}

int64_t bracket_simd_level_cpu() {
#if defined(__x86_64__) && defined(__GNUC__)
  return cpu::bracket_simd_level();
#else
  return 0;
#endif
}

}  // namespace simu_fast
