// The AVX2 integer path of packed_gemv.cpp (included by it, inside its namespace).
//
// Legend: as in packed_gemv.cpp; chunk = 64 consecutive codes of a row, e = one of the 4
// int16 vectors a chunk unpacks into, b = one of the 16 words of such a vector.
//
// Why: on an AVX2-only CPU the fp32 path spends ~4 instructions per 8 codes (shift, mask,
// int->fp32 conversion, FMA) and stays compute bound at about half the DRAM bandwidth.
// Here x is rounded to 16-bit fixed point per group, x ~ xs_g * xi with xs_g = max|x_g| /
// 32767, and each code meets x in vpmaddwd (16 code x int16 products summed in pairs into
// 8 int32 lanes): ~1 instruction per 4 codes. Per group, Σ q xi - z_g Σ xi is exact in
// int32 in each of the 8 lanes (lane 0 also carries -z_g Σ xi); each lane is then converted
// to fp32 and scaled by s_g * xs_g, so a group's sum is rounded at the scale of its largest
// lane, as the fp32 path rounds Σ q x - z Σ x. The rounding of x, at most 2^-16 of the
// group's largest |x|, is 2^7 times finer than the bf16 activations of a bf16 model.
//
// Used for bf16/fp16 x at 2, 3, 4 and 8 bits with group sizes 64 and 128 (multiples of a
// 64-code chunk, so chunks never straddle groups; see Q_MAX_GROUP) and 32 (llama.cpp's
// block: a chunk holds two groups, whose products land in known lanes, see Split); fp32 x
// and other group sizes take the exact fp32 path.

#include <immintrin.h>

constexpr int Q_CHUNK = 64;
// Per group an int32 lane gathers gs / 8 products of <= 255 * 32767 (<= 1.4e8 at gs = 128),
// and lane 0 also takes -z Σ xi (|.| <= 255 * 128 * 32767 = 1.07e9): both stay below 2^31.
constexpr int64_t Q_MAX_GROUP = 128;

constexpr int64_t Q_HALF = Q_CHUNK / 2;  // group size 32: two groups per chunk (rows of K % 64 == 0)

bool int16_path(int bits, int64_t gs) {
  return bits != 16 && (gs == Q_HALF || (gs % Q_CHUNK == 0 && gs <= Q_MAX_GROUP));
}

// Where a chunk's int32 lane sums put its two groups at group size 32: HALVES, lanes 0-3
// the first group and 4-7 the second; PAIRS, lanes 0, 1, 4, 5 and 2, 3, 6, 7 (what
// _mm256_hadd_epi32 of one vector per group gives). Each kernel's code order fixes one.
enum class Split { HALVES, PAIRS };
constexpr Split split16(int bits) { return bits <= 3 ? Split::HALVES : Split::PAIRS; }  // int16 path
constexpr Split split8(int bits) { return bits == 2 ? Split::PAIRS : Split::HALVES; }   // int8 path

// Group 32: per x row the terms each chunk's lanes need, laid out as the lanes hold them (8
// per chunk): lzi = zsym Σ xi on a group's first lane (0 elsewhere; zsym = 1 for
// asymmetric codes, whose z_g multiplies it per weight row), lxs = the x scale of each
// lane's group. Then a chunk costs each x row one subtract and one multiply, not a pair's
// loads, product and permutes.
void lane_terms(Split split, int32_t zsym, int64_t G, const int32_t* isum, const float* xs, float xtok,
                int32_t* lzi, float* lxs) {
  for (int64_t c = 0; c < G / 2; ++c)
    for (int l = 0; l < 8; ++l) {
      const int e = split == Split::HALVES ? l / 4 : (l / 2) % 2;  // which group of the pair
      const bool first = split == Split::HALVES ? l % 4 == 0 : l == 0 || l == 2;
      lzi[8 * c + l] = first ? zsym * isum[2 * c + e] : 0;
      lxs[8 * c + l] = xs ? xs[2 * c + e] : xtok;
    }
}

// The code (0..63 within its chunk) that word b of vector e holds after extract<bits>.
int code_of(int bits, int e, int b) {
  if (bits == 2) return 4 * b + e;                      // byte b of 16, bit pair e
  if (bits == 3) return 8 * (b / 2) + 2 * e + b % 2;   // run b/2 of 8 codes, its code 2e + b%2
  if (bits == 4) return 32 * (e / 2) + 2 * b + e % 2;  // bytes 16(e/2) + b, nibble e % 2
  return 16 * e + b;                                    // 8 bits: bytes 16e + b
}

// One x row [K] -> xi [K] int16, xs [G] fp32 scales, isum [G] = Σ xi per group.
void quantize_x(const float* x, int64_t K, int64_t gs, int16_t* xi, float* xs, int32_t* isum) {
  for (int64_t g = 0; g < K / gs; ++g) {
    const float* xg = x + g * gs;
    float amax = 0.f;
    for (int64_t k = 0; k < gs; ++k) amax = std::max(amax, std::fabs(xg[k]));
    const float scale = amax > 0.f ? amax / 32767.f : 1.f;
    int32_t s = 0;
    for (int64_t k = 0; k < gs; ++k) {
      const float v = std::nearbyint(xg[k] / scale);
      xi[g * gs + k] = int16_t(std::max(-32767.f, std::min(32767.f, v)));
      s += xi[g * gs + k];
    }
    xs[g] = scale;
    isum[g] = s;
  }
}

// xq[chunk][e][b] = xi[64 chunk + code_of(bits, e, b)]: x in the order vpmaddwd meets the codes.
void arrange_x(const int16_t* xi, int64_t K, int bits, int16_t* xq) {
  for (int64_t c = 0; c < K / Q_CHUNK; ++c)
    for (int e = 0; e < 4; ++e)
      for (int b = 0; b < 16; ++b) xq[(c * 4 + e) * 16 + b] = xi[c * Q_CHUNK + code_of(bits, e, b)];
}

// The 64 codes of the chunk at p (8 * BITS bytes) as 4 vectors of 16 int16 (see code_of).
template <int BITS> inline void extract(const uint8_t* p, __m256i (&c)[4]) {
  auto words = [](const uint8_t* at) {  // 16 bytes -> 16 zero-extended int16
    return _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at)));
  };
  if constexpr (BITS == 2) {
    const __m256i v = words(p), m = _mm256_set1_epi16(3);
    c[0] = _mm256_and_si256(v, m);
    c[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m);
    c[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    c[3] = _mm256_srli_epi16(v, 6);  // a zero-extended byte: nothing above the top pair
  } else if constexpr (BITS == 3) {
    // 8 runs of 3 bytes (run r: codes 8r..8r+7 at bits 3j of its 24-bit word). Two 16-byte
    // loads inside the chunk (bytes 0-15 and 8-23, never past it) and one in-lane shuffle
    // put run r in 32-bit lane r; vector e then takes codes 2e and 2e+1 of every run into
    // the lane's low and high int16.
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));       // runs 0-3: bytes 0-11
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8));   // runs 4-7: bytes 4-15
    const __m256i ctrl = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                          4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1);
    const __m256i w = _mm256_shuffle_epi8(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1), ctrl);
    const __m256i m = _mm256_set1_epi32(0x00070007);
    auto pair = [&](__m256i u) {  // u = w >> 6e: low int16 from u, high from u << 13 (bit 3 -> 16)
      return _mm256_and_si256(_mm256_blend_epi16(u, _mm256_slli_epi32(u, 13), 0xAA), m);
    };
    c[0] = pair(w);
    c[1] = pair(_mm256_srli_epi32(w, 6));
    c[2] = pair(_mm256_srli_epi32(w, 12));
    c[3] = pair(_mm256_srli_epi32(w, 18));
  } else if constexpr (BITS == 4) {
    const __m256i lo = words(p), hi = words(p + 16), m = _mm256_set1_epi16(15);
    c[0] = _mm256_and_si256(lo, m);
    c[1] = _mm256_srli_epi16(lo, 4);
    c[2] = _mm256_and_si256(hi, m);
    c[3] = _mm256_srli_epi16(hi, 4);
  } else {
    for (int e = 0; e < 4; ++e) c[e] = words(p + 16 * e);
  }
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// dots[t] = Σ_g s_g xscale(t, g) Σ_{k in g} (q_k - z_g) xi_tk for one packed row: the loop
// the integer paths share. chunk(p, c, part, two) adds Σ q xi of chunk c (codes at p) to
// part[t] per lane; z_g = zrow[g], or zsym when zrow is null. The integer part of each group
// is exact per lane (one lane of the group also carries -z_g Σ xi), then converted and
// scaled in fp32. At group size 32 (two = true) each chunk holds groups 2c and 2c+1, in
// the lanes SPLIT says, and is scaled on its own with the x rows' lane_terms (lzi, lxs);
// the pair's weight scales (and zero points) are spread over the lanes by one permute.
template <int MT, int64_t CHUNK_BYTES, Split SPLIT, class XScale, class Chunk>
inline void integer_row(const uint8_t* q, int64_t G, int64_t gs, const float* srow, const uint8_t* zrow,
                        int32_t zsym, const int32_t* const* isum, const int32_t* const* lzi,
                        const float* const* lxs, XScale&& xscale, Chunk&& chunk, float* dots) {
  __m256 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
  auto prefetch = [&](int64_t c) {
    if (CHUNK_BYTES >= 64 || c % (64 / CHUNK_BYTES) == 0)  // once per 64-byte line
      __builtin_prefetch(q + c * CHUNK_BYTES + PREFETCH_BYTES, 0, 3);
  };
  if (gs == Q_HALF) {
    // lane -> element of the pair: each group's scale and zero point to every lane of it
    const __m256i to_lanes = SPLIT == Split::HALVES ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)
                                                    : _mm256_setr_epi32(0, 0, 1, 1, 0, 0, 1, 1);
    for (int64_t c = 0; c < G / 2; ++c) {
      __m256i part[MT];
      for (int t = 0; t < MT; ++t) part[t] = _mm256_setzero_si256();
      prefetch(c);
      chunk(q + c * CHUNK_BYTES, c, part, std::true_type{});
      const int64_t g = 2 * c;
      const __m256 s8 = _mm256_permutevar8x32_ps(
          _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(srow + g)))), to_lanes);
      const __m256i z8 = zrow ? _mm256_permutevar8x32_epi32(
          _mm256_castsi128_si256(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(zrow[g] | zrow[g + 1] << 8))), to_lanes)
                              : __m256i{};
      for (int t = 0; t < MT; ++t) {
        const __m256i zi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lzi[t] + 8 * c));
        const __m256i zterm = zrow ? _mm256_mullo_epi32(z8, zi) : zi;
        const __m256 exact = _mm256_cvtepi32_ps(_mm256_sub_epi32(part[t], zterm));
        acc[t] = _mm256_fmadd_ps(exact, _mm256_mul_ps(s8, _mm256_loadu_ps(lxs[t] + 8 * c)), acc[t]);
      }
    }
    for (int t = 0; t < MT; ++t) dots[t] = hsum256(acc[t]);
    return;
  }
  const int64_t chunks = gs / Q_CHUNK;
  for (int64_t g = 0; g < G; ++g) {
    __m256i part[MT];
    for (int t = 0; t < MT; ++t) part[t] = _mm256_setzero_si256();
    for (int64_t c = g * chunks; c < (g + 1) * chunks; ++c) {
      prefetch(c);
      chunk(q + c * CHUNK_BYTES, c, part, std::false_type{});
    }
    const int32_t z = zrow ? int32_t(zrow[g]) : zsym;
    for (int t = 0; t < MT; ++t) {
      const __m256i zterm = _mm256_set_epi32(0, 0, 0, 0, 0, 0, 0, z * isum[t][g]);
      const __m256 exact = _mm256_cvtepi32_ps(_mm256_sub_epi32(part[t], zterm));
      acc[t] = _mm256_fmadd_ps(exact, _mm256_set1_ps(srow[g] * xscale(t, g)), acc[t]);
    }
  }
  for (int t = 0; t < MT; ++t) dots[t] = hsum256(acc[t]);
}

// dots[t] = Σ_g s_g xs_tg Σ_{k in g} (q_k - z_g) xi_tk for one packed row, xi int16 in madd order.
// Lane l of a madd holds codes 8l..8l+7 of the chunk at 2 and 3 bits (HALVES at group size
// 32); at 4 and 8 bits vectors 0-1 hold codes 0-31 and 2-3 codes 32-63, so two groups are
// kept apart by a horizontal add (PAIRS).
template <int BITS, int MT>
void int16_row(const uint8_t* q, int64_t G, int64_t gs, const float* srow, const uint8_t* zrow, int32_t zsym,
               const int16_t* const* xq, const float* const* xs, const int32_t* const* isum,
               const int32_t* const* lzi, const float* const* lxs, float* dots) {
  constexpr Split SPLIT = split16(BITS);
  integer_row<MT, 8 * BITS, SPLIT>(
      q, G, gs, srow, zrow, zsym, isum, lzi, lxs, [&](int t, int64_t g) { return xs[t][g]; },
      [&](const uint8_t* p, int64_t c, __m256i (&part)[MT], auto two) {
    __m256i codes[4];
    extract<BITS>(p, codes);
    for (int t = 0; t < MT; ++t) {
      const __m256i* x = reinterpret_cast<const __m256i*>(xq[t] + c * 64);
      const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(codes[0], _mm256_load_si256(x)),
                                         _mm256_madd_epi16(codes[1], _mm256_load_si256(x + 1)));
      const __m256i b = _mm256_add_epi32(_mm256_madd_epi16(codes[2], _mm256_load_si256(x + 2)),
                                         _mm256_madd_epi16(codes[3], _mm256_load_si256(x + 3)));
      if constexpr (decltype(two)::value && SPLIT == Split::PAIRS)
        part[t] = _mm256_add_epi32(part[t], _mm256_hadd_epi32(a, b));
      else
        part[t] = _mm256_add_epi32(part[t], _mm256_add_epi32(a, b));
    }
  }, dots);
}
