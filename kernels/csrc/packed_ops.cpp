// The CPU implementations of the ops moe_ao::packed_linear and moe_ao::packed_experts_linear
// (schemas and fake implementations: kernels/_registry.py), registered with the dispatcher.
//
// They check the buffers (the kernel trusts them) and call the plain C kernel in
// packed_gemv.cpp, which takes x and writes y in x's dtype. Registered from C++, a call on
// a 192-wide linear takes ~20 us in all, ~5 us of it dispatch; behind a Python
// implementation it took ~76 us (argument boxing, ctypes, Python-side checks, dtype
// conversions), more than a small expert's GEMV.
//
// Only the light headers: torch/extension.h would triple the first build's time.

#include <ATen/Parallel.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <optional>

extern "C" int moe_ao_packed_mm(const void* x, int xdtype, int64_t M, int64_t K, const int64_t* ids,
                                const int32_t* slot, int64_t n_slices, int64_t n_seg, int64_t R, int64_t group_size,
                                int wdtype, const void* const* bufs, const int64_t* counts, int act_bits,
                                int n_threads, void* out, char* err, int64_t err_len);

namespace {

// kernels/_registry.py BUFFER_NAMES: (q, s, z) for 2, 3, 4 and 8 bits, then d16.
constexpr int N_BUFFERS = 13;
constexpr const char* NAMES[N_BUFFERS] = {"q2", "s2", "z2", "q3", "s3", "z3", "q4",
                                          "s4", "z4", "q8", "s8", "z8", "d16"};
constexpr int COUNTED[5] = {0, 3, 6, 9, 12};  // q2, q3, q4, q8, d16: dim 0 = slices per width

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: return -1;
  }
}

at::Tensor run(const at::Tensor& x, const std::optional<at::Tensor>& ids, const at::Tensor& slot,
               int64_t out_features, int64_t n_seg, int64_t group_size,
               const c10::List<std::optional<at::Tensor>>& buffers, int64_t act_bits) {
  TORCH_CHECK(act_bits == 0 || act_bits == 8, "moe_ao packed CPU kernel: act_bits must be 0 (none) or 8, got ",
              act_bits);
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && dtype_code(x.scalar_type()) >= 0,
              "moe_ao packed CPU kernel: x must be a 2D float32/bfloat16/float16 CPU tensor, got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(buffers.size() == N_BUFFERS, "moe_ao packed CPU kernel: ", N_BUFFERS, " buffers expected, got ",
              buffers.size());
  TORCH_CHECK(n_seg > 0 && out_features % n_seg == 0 && group_size > 0,
              "moe_ao packed CPU kernel: bad out_features/n_seg/group_size ", out_features, "/", n_seg, "/",
              group_size);
  TORCH_CHECK(slot.scalar_type() == at::kInt && slot.dim() == 2 && slot.size(1) == 3 && slot.is_contiguous() &&
                  slot.device().is_cpu(),
              "moe_ao packed CPU kernel: slot must be a contiguous int32 [slices, 3] CPU tensor, got ", slot.sizes());
  const int64_t M = x.size(0), K = x.size(1), R = out_features / n_seg;
  TORCH_CHECK(K % group_size == 0, "moe_ao packed CPU kernel: group_size ", group_size, " does not divide K = ", K);
  std::array<const void*, N_BUFFERS> ptrs{};
  std::array<int64_t, N_BUFFERS> rows{};
  int wdtype = -1;
  for (int i = 0; i < N_BUFFERS; ++i) {
    const std::optional<at::Tensor> t = buffers.get(i);
    if (!t.has_value()) continue;
    const char kind = NAMES[i][0];
    const int bits = i == 12 ? 16 : (i / 3 == 0 ? 2 : i / 3 == 1 ? 3 : i / 3 == 2 ? 4 : 8);
    const int64_t width = kind == 'd' ? K : kind == 'q' ? (K + 7) / 8 * bits : K / group_size;
    TORCH_CHECK(t->dim() == 3 && t->size(1) == R && t->size(2) == width && t->is_contiguous() && t->device().is_cpu(),
                "moe_ao packed CPU kernel: buffer ", NAMES[i], " must be a contiguous CPU tensor [n, ", R, ", ",
                width, "], got ", t->sizes());
    if (kind == 'q' || kind == 'z') {
      TORCH_CHECK(t->scalar_type() == at::kByte, "moe_ao packed CPU kernel: buffer ", NAMES[i], " must be uint8");
    } else {
      const int code = dtype_code(t->scalar_type());
      TORCH_CHECK(code >= 0 && (wdtype < 0 || code == wdtype), "moe_ao packed CPU kernel: buffer ", NAMES[i],
                  " has dtype ", t->scalar_type(), "; scales and 16-bit slices share one float dtype");
      wdtype = code;
    }
    ptrs[i] = t->data_ptr();
    rows[i] = t->size(0);
  }
  TORCH_CHECK(wdtype >= 0, "moe_ao packed CPU kernel: no scales or float slices among the buffers");
  std::array<int64_t, 5> counts{};
  for (int i = 0; i < 5; ++i) counts[i] = rows[COUNTED[i]];

  // Tensors that already fit pass through: every torch conversion op costs ~3 us of dispatch.
  const at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  std::optional<at::Tensor> ids64;
  if (ids.has_value()) {
    TORCH_CHECK(ids->dim() == 1 && ids->size(0) == M && ids->device().is_cpu(),
                "moe_ao packed CPU kernel: ids must be a CPU vector of x's ", M, " rows, got ", ids->sizes());
    ids64 = ids->scalar_type() == at::kLong && ids->is_contiguous() ? *ids : ids->to(at::kLong).contiguous();
  }
  at::Tensor out = at::empty({M, out_features}, x.options());
  char err[256] = {0};
  const int rc = moe_ao_packed_mm(xc.data_ptr(), dtype_code(x.scalar_type()), M, K,
                                  ids64 ? ids64->data_ptr<int64_t>() : nullptr, slot.data_ptr<int32_t>(), slot.size(0),
                                  n_seg, R, group_size, wdtype, ptrs.data(), counts.data(), int(act_bits),
                                  at::get_num_threads(), out.data_ptr(), err, sizeof(err));
  TORCH_CHECK(rc == 0, "moe_ao packed CPU kernel: ", err);
  return out;
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& slot, int64_t out_features, int64_t n_seg,
                         int64_t group_size, const c10::List<std::optional<at::Tensor>>& buffers, int64_t act_bits) {
  return run(x, std::nullopt, slot, out_features, n_seg, group_size, buffers, act_bits);
}

at::Tensor packed_experts_linear(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& slot,
                                 int64_t out_features, int64_t n_seg, int64_t group_size,
                                 const c10::List<std::optional<at::Tensor>>& buffers, int64_t act_bits) {
  return run(x, ids, slot, out_features, n_seg, group_size, buffers, act_bits);
}

}  // namespace

TORCH_LIBRARY_IMPL(moe_ao, CPU, m) {
  m.impl("packed_linear", &packed_linear);
  m.impl("packed_experts_linear", &packed_experts_linear);
}
