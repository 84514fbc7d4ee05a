// Loads and dtype conversions of packed_gemv.cpp (included by it, inside its namespace):
// fp32 vectors of LANES lanes from fp32/bf16/fp16 arrays, and fp32 results back to 16 bits.

inline vf load_f32(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float hsum(vf v) {  // a tree: log2(LANES) dependent adds, not LANES - 1
  float a[LANES];
  std::memcpy(a, &v, sizeof v);
  for (int w = LANES / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) a[i] += a[i + w];
  return a[0];
}

// LANES values of a 16-bit or 32-bit float array as fp32.
template <int DT> inline vf loadv(const void* p, int64_t i);
template <> inline vf loadv<F32>(const void* p, int64_t i) {
  return load_f32(static_cast<const float*>(p) + i);
}
template <> inline vf loadv<BF16>(const void* p, int64_t i) {
  vh h;
  std::memcpy(&h, static_cast<const uint16_t*>(p) + i, sizeof h);
  vu w = __builtin_convertvector(h, vu) << 16;  // bf16 is the top half of an fp32
  vf v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
template <> inline vf loadv<F16>(const void* p, int64_t i) {
  vhf h;
  std::memcpy(&h, static_cast<const _Float16*>(p) + i, sizeof h);
  return __builtin_convertvector(h, vf);
}

template <int DT> inline float load1(const void* p, int64_t i);
template <> inline float load1<F32>(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
template <> inline float load1<BF16>(const void* p, int64_t i) {
  uint32_t w = uint32_t(static_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}
template <> inline float load1<F16>(const void* p, int64_t i) { return float(static_cast<const _Float16*>(p)[i]); }

// n values -> fp32 dst (dst has room for a multiple of 16 beyond n, zero-filled).
template <int DT> void to_f32(const void* src, int64_t n, float* dst, int64_t padded) {
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    vf v = loadv<DT>(src, i);
    std::memcpy(dst + i, &v, sizeof v);
  }
  for (; i < n; ++i) dst[i] = load1<DT>(src, i);
  for (; i < padded; ++i) dst[i] = 0.f;
}

// fp32 -> n values of dtype dt (1 bf16, 2 fp16), rounded to nearest even as torch rounds.
void from_f32(int dt, const float* src, int64_t n, void* dst) {
  if (dt == F16) {
    for (int64_t i = 0; i < n; ++i) static_cast<_Float16*>(dst)[i] = _Float16(src[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &src[i], sizeof u);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    static_cast<uint16_t*>(dst)[i] = nan ? uint16_t(0x7fc0) : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
}

void scales_to_f32(int dt, const void* src, int64_t n, float* dst, int64_t padded) {
  if (dt == BF16) to_f32<BF16>(src, n, dst, padded);
  else if (dt == F16) to_f32<F16>(src, n, dst, padded);
  else to_f32<F32>(src, n, dst, padded);
}
