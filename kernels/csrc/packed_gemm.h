// The tiled GEMM path of packed_gemv.cpp (included by it, inside its namespace, after Problem).
//
// Legend: as in packed_gemv.cpp; NC = weight rows per work item, KC = codes per K chunk,
// MR x NR = x rows x weight rows of one register block, Kx = row stride of the fp32 x.
//
// Why: the GEMV path decodes every code once per pass of MAX_MT x rows, so a slice with m
// rows routed to it is decoded m / 4 times. Prompts and batches route tens to thousands of
// rows to each expert; here a tile of NC weight rows x KC codes is decoded once, to fp32
// with its scale and zero point applied (w = (q - z) s, in natural k order, so x needs no
// per-width permutation), into a buffer that stays in L2, and a register-blocked FMA
// kernel multiplies it with every x row of the task:
//     y[m, r] = sum_k x[m, k] w[r, k]   (fp32, exact up to summation order)
// Decoding costs ~6 instructions per LANES codes once per call; the FMA kernel MR*NR
// FMAs per MR + NR loads, so the decode is amortised once a task has ~8 rows (measured
// switch-over: GEMM_MIN_ROWS in packed_gemv.cpp).

constexpr int64_t GEMM_NC = 64;   // weight rows per work item: the decoded tile is NC x KC fp32
constexpr int64_t GEMM_KC = 512;  // 128 KB of decoded tile per item: L2, with room for the x chunk
#ifndef GEMM_NR_OVERRIDE
constexpr int GEMM_NR = 3;        // weight rows per register block
constexpr int GEMM_MR = LANES == 16 ? 6 : 3;  // x rows per block: MR * NR accumulators of 16 / 32 registers
#else
constexpr int GEMM_NR = GEMM_NR_OVERRIDE, GEMM_MR = GEMM_MR_OVERRIDE;
#endif

// LANES codes from code k (a multiple of LANES) of the packed bytes at p: runs k/8 ..
// k/8 + LANES/8 - 1, each read as a 32-bit word (b <= 4; 3 bits: a 24-bit run plus a junk
// byte that the mask clears) or as bytes (b = 8). Reads up to VB bytes past those runs.
template <int BITS> inline vf natural_codes(const uint8_t* p, int64_t k) {
  if constexpr (BITS == 8) {
    typedef uint8_t vb8 __attribute__((vector_size(LANES)));
    vb8 raw;
    std::memcpy(&raw, p + k, sizeof raw);
    return __builtin_convertvector(__builtin_convertvector(raw, vi), vf);
  } else {
    constexpr uint32_t MASK = (1u << BITS) - 1;
    uint32_t w0;
    std::memcpy(&w0, p + k / 8 * BITS, sizeof w0);
    vu words = vu{} + w0;  // lane i holds the run of code i
#if defined(__AVX512F__)
    uint32_t w1;
    std::memcpy(&w1, p + (k / 8 + 1) * BITS, sizeof w1);
    const vu hi = vu{} + w1;
    const vu pick = {0, 0, 0, 0, 0, 0, 0, 0, 16, 16, 16, 16, 16, 16, 16, 16};
    words = __builtin_shuffle(words, hi, pick);
    const vu shift = {0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS,
                      0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS};
#else
    const vu shift = {0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS};
#endif
    return __builtin_convertvector((vi)((words >> shift) & MASK), vf);
  }
}

// Rows r0..r0+nr of the task's slice, codes k0..k0+kc (k0 a multiple of GEMM_KC, kc of
// LANES), into wc [nr, ldw] fp32: w = (q - z) s. Codes past K decode to exactly 0: they lie
// in groups >= G, whose scales and zero terms the scratch holds as 0. sbuf: 2 (G_pad + LANES)
// floats of scratch; tail: GEMM_KC + 2 VB bytes.
template <int BITS>
void decode_tile(const Problem& P, const Task& t, int64_t r0, int64_t nr, int64_t k0, int64_t kc, float* wc,
                 int64_t ldw, float* sbuf, uint8_t* tail) {
  const Buffers& B = P.buf[width_index(BITS)];
  const int64_t Kb = (P.K + 7) / 8 * BITS, gs = P.gs;
  const uint8_t* qend = B.q + B.n * P.R * Kb;
  const float zsym = float(1 << (BITS - 1));
  float* srow = sbuf;
  float* nzs = sbuf + P.G_pad + LANES;
  const int64_t first = k0 / 8 * BITS, bytes = std::min(Kb - first, (kc + 7) / 8 * BITS);
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t row = t.pos * P.R + r0 + r;
    load_scales(P, B, row, srow);
    const uint8_t* zrow = B.z ? B.z + row * P.G : nullptr;
    for (int64_t g = 0; g < P.G_pad + LANES; ++g) nzs[g] = g < P.G ? -srow[g] * (zrow ? float(zrow[g]) : zsym) : 0.f;
    const uint8_t* src = B.q + row * Kb + first;
    if (src + bytes + VB > qend) {  // the loads below may read VB bytes past the chunk
      std::memset(tail, 0, size_t(bytes + VB));
      std::memcpy(tail, src, size_t(bytes));
      src = tail;
    }
    float* dst = wc + r * ldw;
    if (gs % LANES == 0) {  // whole vectors per group: one broadcast scale per group
      for (int64_t k = 0; k < kc;) {
        const int64_t g = (k0 + k) / gs, end = std::min(kc, (g + 1) * gs - k0);
        const vf s = vf{} + srow[g], nz = vf{} + nzs[g];
        for (; k < end; k += LANES) {
          const vf w = natural_codes<BITS>(src, k) * s + nz;
          std::memcpy(dst + k, &w, sizeof w);
        }
      }
      continue;
    }
    for (int64_t k = 0; k < kc; k += LANES) {  // groups straddle vectors: scales lane by lane
      vf s, nz;
      for (int i = 0; i < LANES; ++i) {
        s[i] = srow[(k0 + k + i) / gs];
        nz[i] = nzs[(k0 + k + i) / gs];
      }
      const vf w = natural_codes<BITS>(src, k) * s + nz;
      std::memcpy(dst + k, &w, sizeof w);
    }
  }
}

template <int DT>
void dense_tile(const Problem& P, const Task& t, int64_t r0, int64_t nr, int64_t k0, int64_t kc, float* wc,
                int64_t ldw) {
  const int64_t esize = DT == F32 ? 4 : 2;
  for (int64_t r = 0; r < nr; ++r) {
    const char* wrow = static_cast<const char*>(P.buf[N_WIDTHS - 1].d16) + (t.pos * P.R + r0 + r) * P.K * esize;
    float* dst = wc + r * ldw;
    int64_t k = 0;
    for (; k + LANES <= kc && k0 + k + LANES <= P.K; k += LANES) {
      const vf v = loadv<DT>(wrow, k0 + k);
      std::memcpy(dst + k, &v, sizeof v);
    }
    for (; k < kc; ++k) dst[k] = k0 + k < P.K ? load1<DT>(wrow, k0 + k) : 0.f;
  }
}

// acc[i * ldacc + j] += x_i . w_j over nv vectors, for MR x rows and NR weight rows.
template <int MR, int NR>
inline void gemm_block(const float* const* x, const float* w, int64_t ldw, int64_t nv, float* acc, int64_t ldacc) {
  vf c[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i][j] = vf{};
  for (int64_t v = 0; v < nv; ++v) {
    vf wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = load_f32(w + j * ldw + v * LANES);
    for (int i = 0; i < MR; ++i) {
      const vf xv = load_f32(x[i] + v * LANES);
      for (int j = 0; j < NR; ++j) c[i][j] += xv * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i * ldacc + j] += hsum(c[i][j]);
}

// Calls f(integral_constant<int, n>) for n in 1..MAXN (a register block's tail size at compile time).
template <int MAXN, class F> inline void with_count(int n, F&& f) {
  if constexpr (MAXN > 0) {
    if (n == MAXN) return f(std::integral_constant<int, MAXN>{});
    with_count<MAXN - 1>(n, f);
  }
}

// One decoded tile [nr, kc] times every x row of the task, added to acc [nrows, GEMM_NC].
void gemm_tile(const Problem& P, const Task& t, const float* wc, int64_t nr, int64_t k0, int64_t kc, float* acc) {
  const int64_t nv = (kc + LANES - 1) / LANES;
  for (int64_t j0 = 0; j0 < nr; j0 += GEMM_NR) {
    const int nj = int(std::min<int64_t>(GEMM_NR, nr - j0));
    for (int i0 = 0; i0 < t.nrows; i0 += GEMM_MR) {
      const int ni = std::min(GEMM_MR, t.nrows - i0);
      const float* x[GEMM_MR];
      for (int i = 0; i < ni; ++i) x[i] = P.x + t.rows[i0 + i] * P.Kx + k0;
      float* a = acc + i0 * GEMM_NC + j0;
      with_count<GEMM_MR>(ni, [&](auto mi) {
        with_count<GEMM_NR>(nj, [&](auto nj_) {
          gemm_block<decltype(mi)::value, decltype(nj_)::value>(x, wc + j0 * GEMM_KC, GEMM_KC, nv, a, GEMM_NC);
        });
      });
    }
  }
}

struct GemmScratch {  // per thread
  AlignedFloats wc = AlignedFloats(size_t(GEMM_NC * GEMM_KC));
  std::vector<float> acc;
  std::vector<uint8_t> tail = std::vector<uint8_t>(size_t(GEMM_KC + 2 * VB));
};

// Rows r0..r1 (at most GEMM_NC) of the task's slice times all its x rows, written to P.out.
void gemm_item(const Problem& P, const Task& t, int64_t r0, int64_t r1, std::vector<float>& sbuf, GemmScratch& s) {
  const int64_t nr = r1 - r0;
  s.acc.assign(size_t(t.nrows) * GEMM_NC, 0.f);
  for (int64_t k0 = 0; k0 < P.K; k0 += GEMM_KC) {
    const int64_t kc = std::min(GEMM_KC, (P.K - k0 + LANES - 1) / LANES * LANES);
    float* wc = s.wc.data();
    switch (t.bits) {
      case 2: decode_tile<2>(P, t, r0, nr, k0, kc, wc, GEMM_KC, sbuf.data(), s.tail.data()); break;
      case 3: decode_tile<3>(P, t, r0, nr, k0, kc, wc, GEMM_KC, sbuf.data(), s.tail.data()); break;
      case 4: decode_tile<4>(P, t, r0, nr, k0, kc, wc, GEMM_KC, sbuf.data(), s.tail.data()); break;
      case 8: decode_tile<8>(P, t, r0, nr, k0, kc, wc, GEMM_KC, sbuf.data(), s.tail.data()); break;
      default:
        if (P.wdtype == BF16) dense_tile<BF16>(P, t, r0, nr, k0, kc, wc, GEMM_KC);
        else if (P.wdtype == F16) dense_tile<F16>(P, t, r0, nr, k0, kc, wc, GEMM_KC);
        else dense_tile<F32>(P, t, r0, nr, k0, kc, wc, GEMM_KC);
    }
    gemm_tile(P, t, wc, nr, k0, kc, s.acc.data());
  }
  for (int i = 0; i < t.nrows; ++i)
    for (int64_t j = 0; j < nr; ++j) put(P, t.rows[i] * P.N + t.col0 + r0 + j, s.acc[size_t(i * GEMM_NC + j)]);
}
