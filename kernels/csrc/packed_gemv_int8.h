// The AVX2 int8-activation path of packed_gemv.cpp (W+A8; included by it, inside its
// namespace, after packed_gemv_int16.h).
//
// Legend: as in packed_gemv_int16.h; here a 64-code chunk unpacks into 2 vectors e of 32
// unsigned bytes b.
//
// Why: a unit whose plan asks for act_bits = 8 multiplies activations rounded per token to
// int8, x ~ xs * xi (xs = max|x| / 127, |xi| <= 127; moe_ao.kernels.activations defines the
// rounding, repeated here bit for bit). Codes of 2-4 bits then meet x in vpmaddubsw (32
// u8 x s8 products summed in pairs into int16, at most 2 * 15 * 127 = 3810: no saturation)
// and vpmaddwd by ones widens to int32: ~1 instruction per 13 codes, against 1 per 4 for
// the int16 path. 8-bit codes would saturate vpmaddubsw (2 * 255 * 127 > 32767): they take
// the int16 path with xi as int16 and xs as every group's scale. Sums are exact per group,
// as in the int16 path; y = xs * sum_g s_g (sum q xi - z_g sum xi).

bool int8_path(int bits, int64_t gs) { return bits >= 2 && bits <= 4 && (gs == Q_HALF || gs % Q_CHUNK == 0); }

// The code (0..63 within its chunk) that byte b of vector e holds after extract8<bits>.
int code_of8(int bits, int e, int b) {
  if (bits == 2) return 4 * (b % 16) + 2 * (b / 16) + e;  // byte b%16 of 16, bit pair 2 (b/16) + e
  if (bits == 3) return 8 * (b / 4) + 4 * e + b % 4;     // run b/4 of 8 codes, its code 4e + b%4
  return 2 * b + e;                                        // 4 bits: byte b, nibble e
}

// xq[chunk][e][b] = xi[64 chunk + code_of8(bits, e, b)]: x in the order vpmaddubsw meets the codes.
void arrange_x8(const int8_t* xi, int64_t K, int bits, int8_t* xq) {
  for (int64_t c = 0; c < K / Q_CHUNK; ++c)
    for (int e = 0; e < 2; ++e)
      for (int b = 0; b < 32; ++b) xq[(c * 2 + e) * 32 + b] = xi[c * Q_CHUNK + code_of8(bits, e, b)];
}

// The 64 codes of the chunk at p (8 * BITS bytes) as 2 vectors of 32 bytes (see code_of8).
template <int BITS> inline void extract8(const uint8_t* p, __m256i (&c)[2]) {
  if constexpr (BITS == 2) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    // high half: bits 4-7 of each byte moved down (the 16-bit shift's spill is masked off)
    const __m256i y = _mm256_set_m128i(_mm_srli_epi16(v, 4), v), m = _mm256_set1_epi8(3);
    c[0] = _mm256_and_si256(y, m);
    c[1] = _mm256_and_si256(_mm256_srli_epi16(y, 2), m);
  } else if constexpr (BITS == 3) {
    // runs into 32-bit lanes as in the int16 path; then byte j of lane r <- code j of the run
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8));
    const __m256i ctrl = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                          4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1);
    const __m256i w = _mm256_shuffle_epi8(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1), ctrl);
    auto spread = [](__m256i u) {  // codes 0-3 of u (bits 0-11) into bytes 0-3
      const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7));
      const __m256i b = _mm256_and_si256(_mm256_slli_epi32(u, 5), _mm256_set1_epi32(0x700));
      const __m256i c2 = _mm256_and_si256(_mm256_slli_epi32(u, 10), _mm256_set1_epi32(0x70000));
      const __m256i d = _mm256_and_si256(_mm256_slli_epi32(u, 15), _mm256_set1_epi32(0x7000000));
      return _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c2, d));
    };
    c[0] = spread(w);
    c[1] = spread(_mm256_srli_epi32(w, 12));
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), m = _mm256_set1_epi8(15);
    c[0] = _mm256_and_si256(v, m);
    c[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
  }
}

// dots[t] = xs_t Σ_g s_g Σ_{k in g} (q_k - z_g) xi_tk for one packed row, xi int8 in maddubs order.
// int32 lane l sums bytes 4l..4l+3 of both vectors: codes 8l..8l+7 at 3 and 4 bits (HALVES
// at group size 32); at 2 bits bytes 0-7 and 16-23 hold codes 0-31, so lanes 0, 1, 4, 5
// (PAIRS).
template <int BITS, int MT>
void int8_row(const uint8_t* q, int64_t G, int64_t gs, const float* srow, const uint8_t* zrow, int32_t zsym,
              const int8_t* const* xq, const float* xs, const int32_t* const* isum, const int32_t* const* lzi,
              const float* const* lxs, float* dots) {
  const __m256i ones = _mm256_set1_epi16(1);
  constexpr Split SPLIT = split8(BITS);
  integer_row<MT, 8 * BITS, SPLIT>(
      q, G, gs, srow, zrow, zsym, isum, lzi, lxs, [&](int t, int64_t) { return xs[t]; },
      [&](const uint8_t* p, int64_t c, __m256i (&part)[MT], auto) {
    __m256i codes[2];
    extract8<BITS>(p, codes);
    for (int t = 0; t < MT; ++t) {
      const __m256i* x = reinterpret_cast<const __m256i*>(xq[t] + c * 64);
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(codes[0], _mm256_load_si256(x)),
                                             _mm256_maddubs_epi16(codes[1], _mm256_load_si256(x + 1)));
      part[t] = _mm256_add_epi32(part[t], _mm256_madd_epi16(pairs, ones));
    }
  }, dots);
}
