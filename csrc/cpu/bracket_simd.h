// The bracket pass's tests of one block of kBracketCountBlock elements in AVX-512 and in AVX2 intrinsics
// (radix_select.cpp picks one by the CPU it runs on; its portable loop serves other CPUs and the last,
// partial block). Per element: above the bracket (key > hi), inside it (lo <= key <= hi), NaN; per block:
// the three counts, the bits of the elements inside (64 per word) and, when asked, the mask bytes (1 above,
// inside_byte inside, else 0).
//
// No key transform per element: the raw bits s (16-bit types shifted into the top half) give the signed
// t = s ^ ((s >> 31) & 0x7fffffff), whose order is the keys' order, key = t ^ 0x80000000, except for -0.0
// (t = -1, while its key is +0.0's); bracket_bounds moves the two bounds that -1 could sit on, since no
// other element has t = -1. Compares then need no per-element fold of -0.0 or sign flip. Measured on the
// counting pass over 1e8 float32, 2 threads (Intel Xeon): AVX-512 23.3-23.6 ms, AVX2 28-29 ms, the portable
// loop (which builds each key and writes flag bytes to count) 32.5-33.1 ms; a plain read of x takes 18 ms.
#pragma once
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdint>

#include "../radix_select.h"

namespace simu_fast {
namespace cpu {

enum BracketSimd : int { kBracketPortable = 0, kBracketAvx2 = 1, kBracketAvx512 = 2 };

// The widest block routine this CPU runs.
inline int bracket_simd_level() {
  static const int level = [] {
    if (!__builtin_cpu_supports("popcnt")) return int{kBracketPortable};
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return int{kBracketAvx512};
    return __builtin_cpu_supports("avx2") ? int{kBracketAvx2} : int{kBracketPortable};
  }();
  return level;
}

// The bounds as signed t values: inside <=> t >= lo && !(t > hi); above <=> t > hi. A 16-bit key k covers
// the 32-bit keys [k << 16, (k << 16) | 0xffff]. -0.0 (t = -1) has key 0x80000000: lo = 0x80000000 (t 0)
// becomes -1 so that it is inside, hi = 0x7fffffff (t -1) becomes -2 so that it is above.
struct BracketBounds {
  int32_t lo, hi, inf;  // inf: the raw bits of +inf as t (NaN <=> (s & 0x7fffffff) > inf)
};

template <typename Format>
inline BracketBounds bracket_bounds(uint32_t lo_key, uint32_t hi_key) {
  constexpr int kShift = 32 - 8 * static_cast<int>(sizeof(typename Format::Bits));
  const uint32_t lo32 = lo_key << kShift, hi32 = (hi_key << kShift) | ((1u << kShift) - 1u);
  int32_t lo = static_cast<int32_t>(lo32 ^ 0x80000000u), hi = static_cast<int32_t>(hi32 ^ 0x80000000u);
  if (lo == 0) lo = -1;
  if (hi == -1) hi = -2;
  return {lo, hi, static_cast<int32_t>(Format::kInf << kShift)};
}

struct BracketBlock {
  uint64_t inside[kBracketCountBlock / 64];  // bit t of word w: element 64 w + t is inside the bracket
  int64_t above = 0, inside_count = 0, nan = 0;
};

// Word w of a block (64 elements; above, inside and nan exclusive) into the block's result.
__attribute__((target("popcnt"))) inline void add_word(BracketBlock& r, int64_t w, uint64_t above, uint64_t inside,
                                                      uint64_t nan) {
  r.inside[w] = inside;
  r.above += __builtin_popcountll(above);
  r.inside_count += __builtin_popcountll(inside);
  r.nan += __builtin_popcountll(nan);
}

// AVX-512: 16 elements per vector, compares into mask registers, the mask bytes from the 64-bit mask.
template <typename Format>
__attribute__((target("avx512f,avx512bw,popcnt"))) inline __m512i t_of16(const typename Format::Bits* x) {
  if constexpr (sizeof(typename Format::Bits) == 4) return _mm512_loadu_si512(x);
  else return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))), 16);
}

template <typename Format, bool kAbsolute>
__attribute__((target("avx512f,avx512bw,popcnt"))) void bracket_block_avx512(const typename Format::Bits* x,
                                                                            uint8_t* out, uint8_t inside_byte,
                                                                            BracketBounds b, BracketBlock& r) {
  const __m512i low31 = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(b.inf),
                lo = _mm512_set1_epi32(b.lo), hi = _mm512_set1_epi32(b.hi), one = _mm512_set1_epi8(1),
                mark = _mm512_set1_epi8(static_cast<char>(inside_byte));
  r.above = r.inside_count = r.nan = 0;
  for (int64_t w = 0; w < kBracketCountBlock / 64; ++w) {
    uint64_t above = 0, at_least = 0, nan = 0;
    for (int q = 0; q < 4; ++q) {
      __m512i s = t_of16<Format>(x + 64 * w + 16 * q);
      if (kAbsolute) s = _mm512_and_si512(s, low31);
      const __m512i t = kAbsolute ? s : _mm512_xor_si512(s, _mm512_and_si512(_mm512_srai_epi32(s, 31), low31));
      const __m512i magnitude = kAbsolute ? s : _mm512_and_si512(s, low31);
      nan |= static_cast<uint64_t>(_mm512_cmpgt_epi32_mask(magnitude, inf)) << (16 * q);
      above |= static_cast<uint64_t>(_mm512_cmpgt_epi32_mask(t, hi)) << (16 * q);
      at_least |= static_cast<uint64_t>(_mm512_cmpge_epi32_mask(t, lo)) << (16 * q);
    }
    above &= ~nan;
    const uint64_t inside = at_least & ~above & ~nan;
    if (out != nullptr) {
      _mm512_storeu_si512(out + 64 * w, _mm512_mask_mov_epi8(_mm512_maskz_mov_epi8(above, one), inside, mark));
    }
    add_word(r, w, above, inside, nan);
  }
}

// AVX2: 8 elements per vector, compares into vectors and their sign bits (movemask), the mask bytes of
// each 8 elements from a table.
struct BytesOfBits {
  uint64_t bytes[256];
  constexpr BytesOfBits() : bytes() {
    for (int v = 0; v < 256; ++v)
      for (int bit = 0; bit < 8; ++bit)
        if ((v >> bit) & 1) bytes[v] |= uint64_t{1} << (8 * bit);
  }
};
inline constexpr BytesOfBits kBytesOfBits{};

template <typename Format>
__attribute__((target("avx2,popcnt"))) inline __m256i t_of8(const typename Format::Bits* x) {
  if constexpr (sizeof(typename Format::Bits) == 4) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  else return _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))), 16);
}

__attribute__((target("avx2,popcnt"))) inline uint64_t sign_bits8(__m256i v) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(v)));
}

template <typename Format, bool kAbsolute>
__attribute__((target("avx2,popcnt"))) void bracket_block_avx2(const typename Format::Bits* x, uint8_t* out,
                                                              uint8_t inside_byte, BracketBounds b, BracketBlock& r) {
  const __m256i low31 = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(b.inf),
                lo = _mm256_set1_epi32(b.lo), hi = _mm256_set1_epi32(b.hi);
  r.above = r.inside_count = r.nan = 0;
  for (int64_t w = 0; w < kBracketCountBlock / 64; ++w) {
    uint64_t above = 0, below = 0, nan = 0;
    for (int q = 0; q < 8; ++q) {
      __m256i s = t_of8<Format>(x + 64 * w + 8 * q);
      if (kAbsolute) s = _mm256_and_si256(s, low31);
      const __m256i t = kAbsolute ? s : _mm256_xor_si256(s, _mm256_and_si256(_mm256_srai_epi32(s, 31), low31));
      const __m256i magnitude = kAbsolute ? s : _mm256_and_si256(s, low31);
      nan |= sign_bits8(_mm256_cmpgt_epi32(magnitude, inf)) << (8 * q);
      above |= sign_bits8(_mm256_cmpgt_epi32(t, hi)) << (8 * q);
      below |= sign_bits8(_mm256_cmpgt_epi32(lo, t)) << (8 * q);
    }
    above &= ~nan;
    const uint64_t inside = ~below & ~above & ~nan;
    if (out != nullptr) {
      for (int q = 0; q < 8; ++q) {
        const uint64_t bytes = kBytesOfBits.bytes[(above >> (8 * q)) & 0xFF] |
                               kBytesOfBits.bytes[(inside >> (8 * q)) & 0xFF] * inside_byte;  // bytes 0 or 1: no carry
        __builtin_memcpy(out + 64 * w + 8 * q, &bytes, 8);
      }
    }
    add_word(r, w, above, inside, nan);
  }
}

}  // namespace cpu
}  // namespace simu_fast
#endif
