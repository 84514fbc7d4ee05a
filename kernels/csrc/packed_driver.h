// The driver of packed_gemv.cpp (included by it at its end): groups x rows into tasks, picks
// each task's path, prepares the copies of x the paths read, runs the work items on OpenMP
// threads, and the plain C entry points.
//
// Legend: as in packed_gemv.cpp.

namespace {

int fail(char* err, int64_t err_len, const char* msg) {
  std::snprintf(err, size_t(err_len), "%s", msg);
  return 1;
}

// Which path serves a slice with n rows routed to it (measured with
// benchmarks/bench_cpu_prefill.py --switch-over, 14336 x 4096 and 4096 x 14336, 2 and 4 bits,
// one thread: benchmarks/results/cpu_prefill_switch_over.md). On AVX2 the integer GEMV
// passes (16 code x int16 products per instruction, 32 with int8 activations) beat the
// fp32 GEMM (8 per FMA) at every n up to 256, by 1.4-2x, so slices they serve never take
// the GEMM; fp32 slices take it from 32 rows (break-even there, 1.1-1.4x at 256). AVX-512
// has no integer path here and its 16-lane FMAs favour the GEMM sooner: its 16 is an
// estimate, unmeasured (no AVX-512 machine was available).
#if defined(__AVX512F__)
constexpr int GEMM_MIN_ROWS = 16;
#else
constexpr int GEMM_MIN_ROWS = 32;
#endif
int g_gemm_rows_override = 0;  // > 0: every slice with at least this many rows takes the GEMM (tests, benchmarks)

// The integer GEMV passes that serve a slice of `bits` for this call: 8 (int8 x), 16 (int16 x) or 0 (none).
int integer_path(const Problem& P, int bits, bool x_16bit) {
#ifdef MOE_AO_INT16
  if (P.gs == Q_HALF && P.K % Q_CHUNK != 0) return 0;  // group size 32 reads whole 64-code chunks
  if (P.act_bits == 8 && int8_path(bits, P.gs)) return 8;
  if ((P.act_bits == 8 || x_16bit) && int16_path(bits, P.gs)) return 16;
#else
  (void)P, (void)bits, (void)x_16bit;
#endif
  return 0;
}

bool use_gemm(const Problem& P, int bits, int nrows, bool x_16bit) {
  if (bits != 16 && P.gs % codes_per_lane(bits) != 0) return true;  // the GEMV needs whole 32-bit code words
  if (g_gemm_rows_override > 0) return nrows >= g_gemm_rows_override;
  return integer_path(P, bits, x_16bit) == 0 && nrows >= GEMM_MIN_ROWS;
}

// Groups x rows by expert, so each selected slice is read once per call: one task per slice
// and its rows. Returns an error message or nullptr.
const char* build_tasks(const Problem& P, const int64_t* ids, const int32_t* slot, int64_t E, int64_t n_seg,
                        bool x_16bit, std::vector<int64_t>& order, std::vector<Task>& tasks) {
  const int64_t M = P.M;
  order.resize(size_t(M));
  std::iota(order.begin(), order.end(), int64_t(0));
  if (ids) {
    for (int64_t m = 0; m < M; ++m)
      if (ids[m] < 0 || ids[m] >= E) return "expert id out of range";
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  }
  for (int64_t i = 0; i < M;) {
    const int64_t e = ids ? ids[order[size_t(i)]] : 0;
    int64_t j = i;
    while (j < M && (ids ? ids[order[size_t(j)]] : 0) == e) ++j;
    for (int64_t seg = 0; seg < n_seg; ++seg) {
      const int32_t* sl = slot + 3 * (e * n_seg + seg);
      const int wi = width_index(sl[0]);
      if (wi < 0 || sl[1] < 0 || sl[1] >= P.buf[wi].n) return "slot table entry out of range";
      if (wi < N_WIDTHS - 1 && (!P.buf[wi].q || !P.buf[wi].s)) return "missing buffer";
      const int nrows = int(j - i);
      tasks.push_back(Task{sl[0], sl[1], seg * P.R, order.data() + i, nrows, use_gemm(P, sl[0], nrows, x_16bit)});
    }
    i = j;
  }
  return nullptr;
}

// x [K] -> xi [K] int8 (per-token symmetric, rounded as moe_ao.kernels.activations rounds), returns xs; isum [G] = sum of xi per group.
float quantize_x8(const float* x, int64_t K, int64_t gs, int8_t* xi, int32_t* isum) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  for (int64_t g = 0; g < K / gs; ++g) {
    int32_t s = 0;
    for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
      const float v = std::max(-127.f, std::min(127.f, std::nearbyint(x[k] / scale)));
      xi[k] = int8_t(v);
      s += xi[k];
    }
    isum[g] = s;
  }
  return scale;
}

// x as fp32 rows of Kx (zero-padded), which every fp32 path reads: converted from 16 bits
// here (each torch conversion op cost ~3 us of dispatch per call); with act_bits = 8 the
// per-token int8 rounding xi (kept in xi8 for the integer paths) times its scale.
void prepare_x(Problem& P, const void* x, int xdtype, AlignedFloats& xbuf, RawArray<int8_t>& xi8) {
  const int64_t M = P.M, K = P.K;
  const bool x_16bit = xdtype != F32;
  if (!x_16bit && P.Kx == K && P.act_bits == 0) {
    P.x = static_cast<const float*>(x);
    return;
  }
  xbuf.assign(size_t(M * P.Kx), 0.f);
  for (int64_t m = 0; m < M; ++m)
    scales_to_f32(xdtype, static_cast<const char*>(x) + m * K * (x_16bit ? 2 : 4), K, xbuf.data() + m * P.Kx, P.Kx);
  P.x = xbuf.data();
  if (P.act_bits != 8) return;
  xi8.allocate(size_t(M * K));
  P.xtok.allocate(size_t(M));
  P.xisum.allocate(size_t(M * P.G));
  for (int64_t m = 0; m < M; ++m) {
    float* row = xbuf.data() + m * P.Kx;
    const float s = P.xtok.data()[m] = quantize_x8(row, K, P.gs, xi8.data() + m * K, P.xisum.data() + m * P.G);
    for (int64_t k = 0; k < K; ++k) row[k] = float(xi8.data()[m * K + k]) * s;
  }
}

// What the GEMV tasks read besides x: x in lane order per width and its group sums, or for
// the integer paths x as int8 / int16 in each width's order; only for their rows.
void prepare_gemv_x(Problem& P, const std::vector<Task>& tasks, bool x_16bit, const RawArray<int8_t>& xi8) {
  const int64_t M = P.M, K = P.K;
  std::vector<char> need(size_t(N_WIDTHS * M), 0);  // [width, row]
  bool any = false;
  for (const Task& t : tasks)
    if (!t.gemm && t.bits != 16)
      for (int i = 0; i < t.nrows; ++i) {
        need[size_t(width_index(t.bits) * M + t.rows[i])] = 1;
        any = true;
      }
  if (!any) return;
  (void)xi8;
  P.xsum.assign(size_t(M * P.G_pad), 0.f);
#ifdef MOE_AO_INT16
  std::vector<int16_t> xi(static_cast<size_t>(K));  // one row of x as int16, before arranging
#endif
  for (int wi = 0; wi < N_WIDTHS - 1; ++wi) {
    const char* rows = need.data() + wi * M;
    if (std::find(rows, rows + M, 1) == rows + M) continue;
    const int bits = WIDTHS[wi], path = integer_path(P, bits, x_16bit);
#ifdef MOE_AO_INT16
    if (path) {
      if (path == 8) P.xq8[wi].allocate(size_t(M * K));
      else P.xq[wi].allocate(size_t(M * K));
      if (path == 16 && !P.xs.data()) {
        P.xs.allocate(size_t(M * P.G));
        if (P.act_bits != 8) P.xisum.allocate(size_t(M * P.G));
      }
      P.ipath[wi] = path;
      const bool lanes = P.gs == Q_HALF;  // group 32: lane_terms per x row
      const int32_t zsym = P.buf[wi].z ? 1 : 1 << (bits - 1);  // asymmetric: z_g multiplies per weight row
      if (lanes) {
        P.lzi[wi].allocate(size_t(M * 4 * P.G));
        P.lxs[wi].allocate(size_t(M * 4 * P.G));
      }
      for (int64_t m = 0; m < M; ++m) {
        if (!rows[m]) continue;
        if (path == 8) {
          arrange_x8(xi8.data() + m * K, K, bits, P.xq8[wi].data() + m * K);
          if (lanes)
            lane_terms(split8(bits), zsym, P.G, P.xisum.data() + m * P.G, nullptr, P.xtok.data()[m],
                       P.lzi[wi].data() + m * 4 * P.G, P.lxs[wi].data() + m * 4 * P.G);
          continue;
        }
        int16_t* xim = xi.data();
        if (P.act_bits == 8) {  // int8 values as int16, the token's scale for every group
          for (int64_t k = 0; k < K; ++k) xim[k] = xi8.data()[m * K + k];
          for (int64_t g = 0; g < P.G; ++g) P.xs.data()[m * P.G + g] = P.xtok.data()[m];
        } else {
          quantize_x(P.x + m * P.Kx, K, P.gs, xim, P.xs.data() + m * P.G, P.xisum.data() + m * P.G);
        }
        arrange_x(xim, K, bits, P.xq[wi].data() + m * K);
        if (lanes)
          lane_terms(split16(bits), zsym, P.G, P.xisum.data() + m * P.G, P.xs.data() + m * P.G, 0.f,
                     P.lzi[wi].data() + m * 4 * P.G, P.lxs[wi].data() + m * 4 * P.G);
      }
      continue;
    }
#endif
    (void)path;
    const int64_t nblk = n_blocks(K, bits);
    P.xp_stride[wi] = nblk * LANES * codes_per_lane(bits);  // a multiple of 16: rows stay aligned
    P.xp[wi].allocate(size_t(M * P.xp_stride[wi]));
    for (int64_t m = 0; m < M; ++m) {
      if (!rows[m]) continue;
      permute_x(P.x + m * P.Kx, K, bits, nblk, P.xp[wi].data() + m * P.xp_stride[wi]);
      for (int64_t g = 0; g < P.G; ++g) P.xsum[size_t(m * P.G_pad + g)] = sum(P.x + m * P.Kx + g * P.gs, P.gs);
    }
  }
}

struct Item {  // one OpenMP work item: rows r0..r1 of a task's slice
  int32_t task;
  int64_t r0, r1;
};

void run_items(const Problem& P, const std::vector<Task>& tasks, int n_threads) {
  std::vector<Item> items;
  int64_t weights = 0;
  for (size_t i = 0; i < tasks.size(); ++i) {
    const int64_t tile = tasks[i].gemm ? GEMM_NC : TILE;
    for (int64_t r0 = 0; r0 < P.R; r0 += tile) items.push_back(Item{int32_t(i), r0, std::min(P.R, r0 + tile)});
    weights += P.R * P.K * (tasks[i].gemm ? tasks[i].nrows : 1);
  }
  const int64_t n_items = int64_t(items.size());
  // Below ~1M weight reads a call takes a few us, less than waking a second thread costs.
  const int threads = weights < SERIAL_WEIGHTS ? 1 : int(std::max<int64_t>(1, std::min<int64_t>(n_threads, n_items)));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    std::vector<float> sbuf(size_t(2 * TILE * (P.G_pad + LANES)), 0.f);  // scales (and s z) of a tile's rows
    GemmScratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < n_items; ++n) {
      const Item& it = items[size_t(n)];
      const Task& t = tasks[size_t(it.task)];
      if (t.gemm) gemm_item(P, t, it.r0, it.r1, sbuf, scratch);
      else run_tile(P, t, it.r0, it.r1, sbuf);
    }
  }
}

}  // namespace

// 1 if an integer path serves `bits`-bit codes at `group_size` on this build, else 0:
// x_bits 16 asks for the int16 path (16-bit x), 8 for the int8 one (act_bits = 8).
extern "C" int moe_ao_integer_path(int x_bits, int bits, int64_t group_size) {
#ifdef MOE_AO_INT16
  return (x_bits == 16 ? int16_path(bits, group_size) : x_bits == 8 && int8_path(bits, group_size)) ? 1 : 0;
#else
  (void)x_bits, (void)bits, (void)group_size;
  return 0;
#endif
}

// From `rows` rows routed to a slice, every slice takes the tiled GEMM, else the GEMV passes
// (0 restores the measured defaults); returns the previous setting. For tests and
// benchmarks that compare the two paths at the same shapes.
extern "C" int moe_ao_set_gemm_min_rows(int rows) {
  const int old = g_gemm_rows_override;
  g_gemm_rows_override = std::max(0, rows);
  return old;
}

// Rows per slice from which fp32 slices take the tiled GEMM by default (the switch-over).
extern "C" int moe_ao_gemm_min_rows() { return GEMM_MIN_ROWS; }

// fp32 lanes of this build's vectors (8: AVX2 or NEON pairs, 16: AVX-512).
extern "C" int moe_ao_lanes() { return LANES; }

// y[m, seg*R + r] = x[m] . W[ids[m]][seg*R + r]  for every x row m, segment seg, row r.
//
// x: [M, K] in xdtype (0 fp32, 1 bf16, 2 fp16); ids: int64 [M] expert of each x row, or
// NULL (a 2D weight: expert 0); slot: int32 [n_slices, 3] (bits, row in its buffer, -),
// n_slices = E * n_seg; bufs: 13 pointers q2 s2 z2 q3 s3 z3 q4 s4 z4 q8 s8 z8 d16 (NULL
// when absent); counts: entries n_b of the 2, 3, 4, 8, 16-bit buffers; wdtype: dtype of
// the scales and d16, coded as xdtype; act_bits: 0, or 8 to round x per token to int8
// first (W+A8); out: [M, n_seg*R] in xdtype, rounded to nearest even from the fp32 sums.
// Slices with few rows take the GEMV passes, where a 16-bit x may take the integer path
// (rounded to int16, which such an x cannot tell apart); slices with many rows, and fp32 x
// everywhere, exact fp32 arithmetic. Returns 0, or 1 with a message in err.
extern "C" int moe_ao_packed_mm(const void* x, int xdtype, int64_t M, int64_t K, const int64_t* ids,
                                const int32_t* slot, int64_t n_slices, int64_t n_seg, int64_t R, int64_t group_size,
                                int wdtype, const void* const* bufs, const int64_t* counts, int act_bits,
                                int n_threads, void* out, char* err, int64_t err_len) {
  if (M <= 0 || K <= 0 || R <= 0 || n_seg <= 0 || n_slices % n_seg != 0) return fail(err, err_len, "bad shapes");
  if (group_size <= 0 || K % group_size != 0) return fail(err, err_len, "group_size must divide K");
  if (act_bits != 0 && act_bits != 8) return fail(err, err_len, "act_bits must be 0 or 8");
  Problem P;
  P.M = M;
  P.K = K;
  P.Kx = (K + LANES - 1) / LANES * LANES;
  P.R = R;
  P.N = n_seg * R;
  P.gs = group_size;
  P.G = K / group_size;
  P.G_pad = (P.G + LANES - 1) / LANES * LANES;
  P.wdtype = wdtype;
  P.act_bits = act_bits;
  P.out = out;
  P.odtype = xdtype;
  for (int i = 0; i < N_WIDTHS - 1; ++i) {
    P.buf[i].q = static_cast<const uint8_t*>(bufs[3 * i]);
    P.buf[i].s = bufs[3 * i + 1];
    P.buf[i].z = static_cast<const uint8_t*>(bufs[3 * i + 2]);
    P.buf[i].n = counts[i];
  }
  P.buf[N_WIDTHS - 1].d16 = bufs[12];
  P.buf[N_WIDTHS - 1].n = counts[N_WIDTHS - 1];
  AlignedFloats xbuf;
  RawArray<int8_t> xi8;
  prepare_x(P, x, xdtype, xbuf, xi8);

  std::vector<int64_t> order;
  std::vector<Task> tasks;
  if (const char* msg = build_tasks(P, ids, slot, n_slices / n_seg, n_seg, xdtype != F32, order, tasks))
    return fail(err, err_len, msg);
  prepare_gemv_x(P, tasks, xdtype != F32, xi8);
  run_items(P, tasks, n_threads);
  return 0;
}
