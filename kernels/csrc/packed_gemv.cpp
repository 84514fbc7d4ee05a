// Mixed-bit GEMV / small-batch GEMM over moe_ao PackedWeight buffers, on CPU.
//
// Legend: M x rows, K in features, Kb packed bytes per row, R rows per slice, G groups per
// row, lane = one of LANES vector lanes (16 with AVX-512, else 8), CPL = codes per lane,
// block = LANES lanes of codes.
//
// A plain C ABI with no torch headers (it compiles in about a second); packed_ops.cpp
// checks the buffers and registers it as the CPU implementation of moe_ao's torch ops.
// Portable GCC vector extensions of one machine register (-march=native): 16 x fp32 with
// AVX-512, 8 x fp32 otherwise
// (AVX2, or a pair of NEON registers). Emulating 16 lanes on AVX2 would split every
// variable shuffle into scalar code (measured ~7x slower on an AVX2-only EPYC).
//
// The sum never materialises dequantized weights:
//     y_r = sum_g s_rg * (sum_{j in g} q_rj x_j  -  z_rg * sum_{j in g} x_j)
// accumulated in fp32. Bit layout (moe_ao/tensors/packing.py): each run of 8 codes is
// `bits` bytes, code j of the run at bit offset bits*j of the little-endian word.
//
// Unpacking: lane i of a block holds one 32-bit word of codes (b = 2, 4, 8: the word at
// byte 4i; b = 3: the 24-bit run at byte 3i), so code j of every lane sits at bit b*j.
// For b < 8 a shift right by b*j, then with AVX-512 a 16-entry table lookup (vpermps,
// which reads only the low 4 index bits: no mask), else a mask and an int->fp32
// conversion, give the codes as fp32; for b = 8 the codes below the top byte are masked
// in place, w & (255 << 8j) = q * 2^(8j), converted exactly, and multiplied by x
// pre-scaled by 2^(-8j) (a power of two: exact). Then one FMA per LANES codes. x is
// permuted once per call into that lane order (xp); the weights are only ever read.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int LANES = 16;
#else
constexpr int LANES = 8;
#endif
constexpr int VB = 4 * LANES;  // bytes of one fp32 vector
typedef float vf __attribute__((vector_size(VB)));
typedef uint32_t vu __attribute__((vector_size(VB)));
typedef int32_t vi __attribute__((vector_size(VB)));
typedef uint8_t vb __attribute__((vector_size(VB)));
typedef uint16_t vh __attribute__((vector_size(VB / 2)));
typedef _Float16 vhf __attribute__((vector_size(VB / 2)));
constexpr int MAX_MT = 4;     // x rows sharing one pass over the weights (3*MT vector accumulators)
constexpr int64_t TILE = 16;  // output rows per OpenMP work item: a few us, so dynamic scheduling is cheap
// Software prefetch distance along the codes: about one 4-bit row of K = 4096 ahead. The
// hardware prefetchers alone left the loop waiting on DRAM (2x slower at 2 bits, single
// thread, weights streamed from DRAM); 1-4 KB measured alike, 2 KB best.
constexpr int64_t PREFETCH_BYTES = 2048;
constexpr int N_WIDTHS = 5;   // buffer order of PackedWeight: 2, 3, 4, 8, 16 bits
constexpr int64_t SERIAL_WEIGHTS = int64_t(1) << 20;  // calls reading fewer run on one thread
constexpr int WIDTHS[N_WIDTHS] = {2, 3, 4, 8, 16};

enum DType { F32 = 0, BF16 = 1, F16 = 2 };

template <int BITS> struct Layout;
template <> struct Layout<2> { static constexpr int CPL = 16, BLOCK_BYTES = VB; };
template <> struct Layout<3> { static constexpr int CPL = 8, BLOCK_BYTES = 3 * LANES; };
template <> struct Layout<4> { static constexpr int CPL = 8, BLOCK_BYTES = VB; };
template <> struct Layout<8> { static constexpr int CPL = 4, BLOCK_BYTES = VB; };

int width_index(int bits) {
  for (int i = 0; i < N_WIDTHS; ++i)
    if (WIDTHS[i] == bits) return i;
  return -1;
}

int codes_per_lane(int bits) { return bits == 2 ? 16 : bits == 8 ? 4 : 8; }

#include "packed_gemv_loads.h"

// ---------------------------------------------------------------------------- x setup
// The factor code<BITS>(w, j) leaves on q_j, undone on x: 2^(-8j) for the in-place 8-bit codes.
float x_scale(int bits, int j) { return bits == 8 && j < 3 ? std::ldexp(1.f, -8 * j) : 1.f; }

// xp[blk][j][i] = x[blk*LANES*CPL + CPL*i + j] * x_scale(bits, j): the lane order of the codes.
void permute_x(const float* x, int64_t K, int bits, int64_t nblk, float* xp) {
  const int cpl = codes_per_lane(bits);
  for (int64_t blk = 0; blk < nblk; ++blk)
    for (int j = 0; j < cpl; ++j) {
      float* dst = xp + (blk * cpl + j) * LANES;
      const float scale = x_scale(bits, j);  // a power of two: exact
      for (int i = 0; i < LANES; ++i) {
        const int64_t k = blk * LANES * cpl + int64_t(cpl) * i + j;
        dst[i] = k < K ? x[k] * scale : 0.f;
      }
    }
}

// sum of n floats in double, four independent chains (not one latency-bound chain)
float sum(const float* x, int64_t n) {
  double a[4] = {};
  int64_t k = 0;
  for (; k + 4 <= n; k += 4)
    for (int c = 0; c < 4; ++c) a[c] += x[k + c];
  for (; k < n; ++k) a[0] += x[k];
  return float((a[0] + a[1]) + (a[2] + a[3]));
}

int64_t n_blocks(int64_t K, int bits) {
  const int64_t codes = int64_t(LANES) * codes_per_lane(bits);
  return (K + codes - 1) / codes;
}

// Per-block scale vector: lane i of block blk belongs to group (blk*BC + i*CPL) / gs.
struct ScaleMap {
  enum Mode { BROADCAST, PERMUTE, GENERAL } mode;
  int64_t groups_per_block = 0;
  vi pattern = {};
  std::vector<int32_t> group;  // BROADCAST: group of each block; GENERAL: group of each lane

  ScaleMap(int bits, int64_t gs, int64_t nblk) {
    const int64_t cpl = codes_per_lane(bits), block_codes = LANES * cpl;
    if (gs % block_codes == 0) {
      mode = BROADCAST;
      for (int64_t blk = 0; blk < nblk; ++blk) group.push_back(int32_t(blk * block_codes / gs));
    } else if (block_codes % gs == 0) {
      mode = PERMUTE;
      groups_per_block = block_codes / gs;
      for (int i = 0; i < LANES; ++i) pattern[i] = int32_t(i * cpl / gs);
    } else {
      mode = GENERAL;
      for (int64_t lane = 0; lane < nblk * LANES; ++lane) group.push_back(int32_t(lane * cpl / gs));
    }
  }

  // srow: fp32 scales of one row, zero-padded by LANES (tail lanes may point past G).
  inline vf load(const float* srow, int64_t blk) const {
    if (mode == BROADCAST) return vf{} + srow[group[size_t(blk)]];
    if (mode == PERMUTE) return __builtin_shuffle(load_f32(srow + blk * groups_per_block), pattern);
    vf v;
    for (int i = 0; i < LANES; ++i) v[i] = srow[group[size_t(blk * LANES + i)]];
    return v;
  }
};

// The LANES lane words of one block, for a block that may read VB bytes from p.
template <int BITS> inline vu lane_words(const uint8_t* p) {
  vb raw;
  std::memcpy(&raw, p, sizeof raw);
  if constexpr (BITS == 3) {
    // lane i <- bytes 3i, 3i+1, 3i+2; its top byte is junk that every code mask clears.
#if defined(__AVX512F__)
    const vb idx = {0,  1,  2,  0, 3,  4,  5,  0, 6,  7,  8,  0, 9,  10, 11, 0,
                    12, 13, 14, 0, 15, 16, 17, 0, 18, 19, 20, 0, 21, 22, 23, 0,
                    24, 25, 26, 0, 27, 28, 29, 0, 30, 31, 32, 0, 33, 34, 35, 0,
                    36, 37, 38, 0, 39, 40, 41, 0, 42, 43, 44, 0, 45, 46, 47, 0};
#else
    const vb idx = {0,  1,  2,  0, 3,  4,  5,  0, 6,  7,  8,  0, 9,  10, 11, 0,
                    12, 13, 14, 0, 15, 16, 17, 0, 18, 19, 20, 0, 21, 22, 23, 0};
#endif
    raw = __builtin_shuffle(raw, idx);
  }
  vu w;
  std::memcpy(&w, &raw, sizeof w);
  return w;
}

// Code j of every lane as fp32. b < 8: the lane shifted right by b*j, then with AVX-512 a
// 16-entry table lookup (vpermps reads only the low 4 index bits, so no mask is needed),
// else masked and converted. b = 8, j < 3: masked in place and converted, q_j * 2^(8j)
// exactly (xp holds x * 2^(-8j)); the top byte (j = 3) is shifted down instead, since in
// place it would make the signed int->fp32 conversion negative (AVX2 has no unsigned one).
template <int BITS> inline vf code(vu w, int j) {
  if constexpr (BITS == 8) {
    if (j == 3) return __builtin_convertvector((vi)(w >> 24), vf);
    return __builtin_convertvector((vi)(w & (0xFFu << (8 * j))), vf);
  } else {
    constexpr int M = (1 << BITS) - 1;
#if defined(__AVX512F__)
    const vf table = {0, 1 & M, 2 & M, 3 & M, 4 & M, 5 & M, 6 & M, 7 & M,  // low 4 bits -> low b bits
                      8 & M, 9 & M, 10 & M, 11 & M, 12 & M, 13 & M, 14 & M, 15 & M};
    return __builtin_shuffle(table, (vi)(w >> (BITS * j)));
#else
    return __builtin_convertvector((vi)((w >> (BITS * j)) & M), vf);
#endif
  }
}

// part[t] = sum_j q_j x_t[j] over one block; two chains per x row hide FMA latency.
template <int BITS, int MT>
inline void block_dot(vu w, const float* const* xp, int64_t blk, vf (&part)[MT]) {
  constexpr int CPL = Layout<BITS>::CPL;
  vf odd[MT];
  for (int t = 0; t < MT; ++t) part[t] = odd[t] = vf{};
#pragma GCC unroll 16
  for (int j = 0; j < CPL; ++j) {
    const vf qj = code<BITS>(w, j);
    for (int t = 0; t < MT; ++t) {
      const vf xv = load_f32(xp[t] + (blk * CPL + j) * LANES);
      if (j % 2) odd[t] += qj * xv;
      else part[t] += qj * xv;
    }
  }
  for (int t = 0; t < MT; ++t) part[t] += odd[t];
}

// dots[t] = sum_j s_g(j) q_j x_t[j] - sum of zterm[t]'s lanes, for one packed row.
template <int BITS, int MT>
void dot_row(const uint8_t* q, int64_t Kb, const uint8_t* qend, const float* const* xp, int64_t nblk,
             const float* srow, const ScaleMap& sm, const vf* zterm, float* dots) {
  constexpr int BB = Layout<BITS>::BLOCK_BYTES;
  vf acc[MT], part[MT];
  for (int t = 0; t < MT; ++t) acc[t] = -zterm[t];
  // Blocks that may load VB bytes: whole blocks, less (3 bits: 3/4 VB blocks) one whose
  // VB-byte load would run past the end of the buffer.
  int64_t fast = Kb / BB;
  if (BB < VB && fast > 0 && q + (fast - 1) * BB + VB > qend) --fast;
  for (int64_t blk = 0; blk < fast; ++blk) {
    __builtin_prefetch(q + blk * BB + PREFETCH_BYTES, 0, 3);
    block_dot<BITS, MT>(lane_words<BITS>(q + blk * BB), xp, blk, part);
    const vf s = sm.load(srow, blk);
    for (int t = 0; t < MT; ++t) acc[t] += s * part[t];
  }
  for (int64_t blk = fast; blk < nblk; ++blk) {  // the row's tail: copy, zero-padded
    uint8_t tail[VB] = {};
    std::memcpy(tail, q + blk * BB, size_t(std::min<int64_t>(BB, Kb - blk * BB)));
    block_dot<BITS, MT>(lane_words<BITS>(tail), xp, blk, part);
    const vf s = sm.load(srow, blk);
    for (int t = 0; t < MT; ++t) acc[t] += s * part[t];
  }
  for (int t = 0; t < MT; ++t) dots[t] = hsum(acc[t]);
}

template <int DT, int MT>
void dense_row(const void* wrow, int64_t K, const float* const* x, float* dots) {
  vf acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = vf{};
  int64_t k = 0;
  for (; k + LANES <= K; k += LANES) {
    const vf wv = loadv<DT>(wrow, k);
    for (int t = 0; t < MT; ++t) acc[t] += wv * load_f32(x[t] + k);
  }
  for (int t = 0; t < MT; ++t) {
    dots[t] = hsum(acc[t]);
    for (int64_t kk = k; kk < K; ++kk) dots[t] += load1<DT>(wrow, kk) * x[t][kk];
  }
}

#if defined(__AVX2__) && !defined(__AVX512F__)
#define MOE_AO_INT16 1
#include "packed_gemv_int16.h"
#include "packed_gemv_int8.h"
#endif

// ---------------------------------------------------------------------------- driver
struct Buffers {  // one bit width of a PackedWeight
  const uint8_t* q = nullptr;
  const void* s = nullptr;
  const uint8_t* z = nullptr;
  const void* d16 = nullptr;
  int64_t n = 0;
};

struct Task {  // one slice times the x rows routed to it
  int bits;
  int64_t pos, col0;
  const int64_t* rows;
  int nrows;
  bool gemm;  // decode tiles once for all rows (packed_gemm.h) instead of the GEMV row passes
};

// 64-byte aligned float storage: x is read in whole 64-byte vectors, never split over two lines.
template <class T> struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U> Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const Aligned64&) const { return true; }
  bool operator!=(const Aligned64&) const { return false; }
};
using AlignedFloats = std::vector<float, Aligned64<float>>;

// An uninitialised 64-byte aligned array: rows only some tasks need are never written, so
// their pages are never touched and cost no memory (a prompt's x is large).
template <class T> struct RawArray {
  T* p = nullptr;
  RawArray() = default;
  RawArray(const RawArray&) = delete;
  RawArray& operator=(const RawArray&) = delete;
  ~RawArray() { ::operator delete(p, std::align_val_t(64)); }
  void allocate(size_t n) { p = static_cast<T*>(::operator new(std::max<size_t>(n, 1) * sizeof(T), std::align_val_t(64))); }
  T* data() const { return p; }
};

struct Problem {
  const float* x;  // [M, Kx] fp32, zero beyond K
  int64_t M, K, Kx, N, R, G, gs;
  int wdtype;
  Buffers buf[N_WIDTHS];
  RawArray<float> xp[N_WIDTHS];  // [M, xp_stride] x in lane order, per width (rows of GEMV tasks only)
  int64_t xp_stride[N_WIDTHS] = {};
  std::vector<float> xsum;  // [M, G_pad] group sums of x
  int64_t G_pad = 0;
#ifdef MOE_AO_INT16
  int ipath[N_WIDTHS] = {};          // integer path of each width's GEMV tasks: 8, 16 or 0 (fp32)
  RawArray<int16_t> xq[N_WIDTHS];    // [M, K] x as int16, in madd order (rows of GEMV tasks only)
  RawArray<int8_t> xq8[N_WIDTHS];    // [M, K] x as int8, in maddubs order (act_bits = 8)
  RawArray<float> xs;                // [M, G] per-group x scales of the int16 path
  RawArray<int32_t> lzi[N_WIDTHS];   // [M, 4G] group 32: lane_terms of each x row
  RawArray<float> lxs[N_WIDTHS];     // [M, 4G]
#endif
  int act_bits = 0;                  // 8: x rounded per token to int8 (W+A8)
  RawArray<float> xtok;              // [M] per-token x scales (act_bits = 8)
  RawArray<int32_t> xisum;           // [M, G] per-group sums of the integer x
  void* out;   // [M, N] in odtype
  int odtype;  // coded as DType
};

// out[idx] = v in the output dtype (16 bits: rounded to nearest even, as torch rounds).
inline void put(const Problem& P, int64_t idx, float v) {
  if (P.odtype == F32) static_cast<float*>(P.out)[idx] = v;
  else from_f32(P.odtype, &v, 1, static_cast<uint16_t*>(P.out) + idx);
}

// Calls pass(first, std::integral_constant<int, MT>{}) over the task's x rows: passes of
// MAX_MT rows, then one of the 1-3 left, so that each pass's MT is a compile-time count.
template <class Pass>
inline void by_passes(int nrows, Pass&& pass) {
  int first = 0;
  for (; first + MAX_MT <= nrows; first += MAX_MT) pass(first, std::integral_constant<int, MAX_MT>{});
  switch (nrows - first) {
    case 3: pass(first, std::integral_constant<int, 3>{}); break;
    case 2: pass(first, std::integral_constant<int, 2>{}); break;
    case 1: pass(first, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

// Row ``row`` of buffer B's scales as fp32 in dst, zero-padded to G_pad + LANES.
void load_scales(const Problem& P, const Buffers& B, int64_t row, float* dst) {
  scales_to_f32(P.wdtype, static_cast<const char*>(B.s) + row * P.G * (P.wdtype == F32 ? 4 : 2), P.G, dst,
                P.G_pad + LANES);
}

#include "packed_gemm.h"

#ifdef MOE_AO_INT16
// The lane_terms rows of a pass's x rows (all null where the width has none: not group 32).
void lane_rows(const Problem& P, int wi, const Task& t, int first, int mt, const int32_t** lzi, const float** lxs) {
  for (int i = 0; i < mt; ++i) {
    const int64_t m = t.rows[first + i];
    lzi[i] = P.lzi[wi].data() ? P.lzi[wi].data() + m * 4 * P.G : nullptr;
    lxs[i] = P.lxs[wi].data() ? P.lxs[wi].data() + m * 4 * P.G : nullptr;
  }
}

template <int BITS, int MT>
void int16_rows_mt(const Problem& P, const Task& t, const uint8_t* q, const float* srow, const uint8_t* zrow,
                   int64_t r, int first) {
  const int wi = width_index(BITS);
  const int16_t* xq[MT];
  const float* xs[MT];
  const int32_t* isum[MT];
  const int32_t* lzi[MT];
  const float* lxs[MT];
  lane_rows(P, wi, t, first, MT, lzi, lxs);
  for (int i = 0; i < MT; ++i) {
    const int64_t m = t.rows[first + i];
    xq[i] = P.xq[wi].data() + m * P.K;
    xs[i] = P.xs.data() + m * P.G;
    isum[i] = P.xisum.data() + m * P.G;
  }
  float dots[MT];
  int16_row<BITS, MT>(q, P.G, P.gs, srow, zrow, 1 << (BITS - 1), xq, xs, isum, lzi, lxs, dots);
  for (int i = 0; i < MT; ++i) put(P, t.rows[first + i] * P.N + t.col0 + r, dots[i]);
}

// The GEMV passes below loop over passes of MAX_MT x rows outside the tile's weight rows:
// those x rows (MAX_MT x K, 32 KB of int16 at K = 4096) are then reused from L1/L2 by the
// tile's 16 weight rows. Weight rows outside made a slice with 64 rows re-read 512 KB of x
// per weight row from L3 (22 instead of 33 GMAC/s, 2-bit 14336 x 4096, one thread).
// Rows r0..r1 of the task's slice on an integer path: the rows' scales once, then
// row_mt<MT>(packed row, its scales, its zero points, r, first x row) per pass of x rows.
template <int BITS, class RowMT>
void integer_rows(const Problem& P, const Task& t, int64_t r0, int64_t r1, std::vector<float>& sbuf, RowMT&& row_mt) {
  const Buffers& B = P.buf[width_index(BITS)];
  const int64_t Kb = P.K / 8 * BITS, SP = P.G_pad + LANES;
  for (int64_t r = r0; r < r1; ++r) load_scales(P, B, t.pos * P.R + r, sbuf.data() + (r - r0) * SP);
  by_passes(t.nrows, [&](int first, auto mt) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = t.pos * P.R + r;
      row_mt(mt, B.q + row * Kb, sbuf.data() + (r - r0) * SP, B.z ? B.z + row * P.G : nullptr, r, first);
    }
  });
}

template <int BITS, int MT>
void int8_rows_mt(const Problem& P, const Task& t, const uint8_t* q, const float* srow, const uint8_t* zrow,
                  int64_t r, int first) {
  const int wi = width_index(BITS);
  const int8_t* xq[MT];
  float xs[MT];
  const int32_t* isum[MT];
  const int32_t* lzi[MT];
  const float* lxs[MT];
  lane_rows(P, wi, t, first, MT, lzi, lxs);
  for (int i = 0; i < MT; ++i) {
    const int64_t m = t.rows[first + i];
    xq[i] = P.xq8[wi].data() + m * P.K;
    xs[i] = P.xtok.data()[m];
    isum[i] = P.xisum.data() + m * P.G;
  }
  float dots[MT];
  int8_row<BITS, MT>(q, P.G, P.gs, srow, zrow, 1 << (BITS - 1), xq, xs, isum, lzi, lxs, dots);
  for (int i = 0; i < MT; ++i) put(P, t.rows[first + i] * P.N + t.col0 + r, dots[i]);
}

template <int BITS>
void int16_rows(const Problem& P, const Task& t, int64_t r0, int64_t r1, std::vector<float>& sbuf) {
  integer_rows<BITS>(P, t, r0, r1, sbuf, [&](auto mt, const uint8_t* q, const float* s, const uint8_t* z, int64_t r,
                                             int first) {
    int16_rows_mt<BITS, decltype(mt)::value>(P, t, q, s, z, r, first);
  });
}

template <int BITS>
void int8_rows(const Problem& P, const Task& t, int64_t r0, int64_t r1, std::vector<float>& sbuf) {
  integer_rows<BITS>(P, t, r0, r1, sbuf, [&](auto mt, const uint8_t* q, const float* s, const uint8_t* z, int64_t r,
                                             int first) {
    int8_rows_mt<BITS, decltype(mt)::value>(P, t, q, s, z, r, first);
  });
}
#endif

template <int BITS, int MT>
void quant_rows_mt(const Problem& P, const Task& t, int64_t r, const float* srow, const float* sz, float zsym,
                   const ScaleMap& sm, int first) {
  const int wi = width_index(BITS);
  const Buffers& B = P.buf[wi];
  const int64_t Kb = (P.K + 7) / 8 * BITS;
  const uint8_t* q = B.q + (t.pos * P.R + r) * Kb;
  const uint8_t* qend = B.q + B.n * P.R * Kb;
  const float* xp[MT];
  vf zterm[MT];
  for (int i = 0; i < MT; ++i) {
    const int64_t m = t.rows[first + i];
    xp[i] = P.xp[wi].data() + m * P.xp_stride[wi];
    // zero-point term: sum_g s_g z_g xsum_g (symmetric: z is the constant zsym), reduced with the dot product
    const float* xsm = P.xsum.data() + m * P.G_pad;
    vf a = vf{};
    for (int64_t g = 0; g < P.G_pad; g += LANES) a += load_f32(sz + g) * load_f32(xsm + g);
    zterm[i] = a * zsym;
  }
  float dots[MT];
  dot_row<BITS, MT>(q, Kb, qend, xp, n_blocks(P.K, BITS), srow, sm, zterm, dots);
  for (int i = 0; i < MT; ++i) put(P, t.rows[first + i] * P.N + t.col0 + r, dots[i]);
}

template <int BITS>
void quant_rows(const Problem& P, const Task& t, int64_t r0, int64_t r1, std::vector<float>& sbuf) {
#ifdef MOE_AO_INT16
  if (P.ipath[width_index(BITS)] == 16) return int16_rows<BITS>(P, t, r0, r1, sbuf);
  if constexpr (BITS <= 4)
    if (P.ipath[width_index(BITS)] == 8) return int8_rows<BITS>(P, t, r0, r1, sbuf);
#endif
  const Buffers& B = P.buf[width_index(BITS)];
  const ScaleMap sm(BITS, P.gs, n_blocks(P.K, BITS));
  const int64_t SP = P.G_pad + LANES;
  // Per tile row: its scales, then s_g z_g (asymmetric; symmetric uses the scales and zsym).
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = t.pos * P.R + r;
    float* srow = sbuf.data() + 2 * (r - r0) * SP;
    load_scales(P, B, row, srow);
    if (B.z) {
      const uint8_t* zrow = B.z + row * P.G;
      for (int64_t g = 0; g < P.G_pad; ++g) srow[SP + g] = g < P.G ? srow[g] * float(zrow[g]) : 0.f;
    }
  }
  const float zsym = B.z ? 1.f : float(1 << (BITS - 1));
  by_passes(t.nrows, [&](int first, auto mt) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* srow = sbuf.data() + 2 * (r - r0) * SP;
      quant_rows_mt<BITS, decltype(mt)::value>(P, t, r, srow, B.z ? srow + SP : srow, zsym, sm, first);
    }
  });
}

template <int DT, int MT>
void dense_rows_mt(const Problem& P, const Task& t, int64_t r, int first) {
  const int64_t esize = DT == F32 ? 4 : 2;
  const void* wrow = static_cast<const char*>(P.buf[N_WIDTHS - 1].d16) + (t.pos * P.R + r) * P.K * esize;
  const float* x[MT];
  for (int i = 0; i < MT; ++i) x[i] = P.x + t.rows[first + i] * P.Kx;
  float dots[MT];
  dense_row<DT, MT>(wrow, P.K, x, dots);
  for (int i = 0; i < MT; ++i) put(P, t.rows[first + i] * P.N + t.col0 + r, dots[i]);
}

template <int DT>
void dense_rows(const Problem& P, const Task& t, int64_t r0, int64_t r1) {
  by_passes(t.nrows, [&](int first, auto mt) {
    for (int64_t r = r0; r < r1; ++r) dense_rows_mt<DT, decltype(mt)::value>(P, t, r, first);
  });
}

// Rows r0..r1 (at most TILE) of the task's slice times all its x rows, by GEMV passes.
void run_tile(const Problem& P, const Task& t, int64_t r0, int64_t r1, std::vector<float>& sbuf) {
  switch (t.bits) {
    case 2: quant_rows<2>(P, t, r0, r1, sbuf); break;
    case 3: quant_rows<3>(P, t, r0, r1, sbuf); break;
    case 4: quant_rows<4>(P, t, r0, r1, sbuf); break;
    case 8: quant_rows<8>(P, t, r0, r1, sbuf); break;
    default:
      if (P.wdtype == BF16) dense_rows<BF16>(P, t, r0, r1);
      else if (P.wdtype == F16) dense_rows<F16>(P, t, r0, r1);
      else dense_rows<F32>(P, t, r0, r1);
  }
}

}  // namespace

#include "packed_driver.h"
