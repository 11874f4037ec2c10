// Argument checks shared by every op's host entry point: each failure names the op, the argument
// and what was expected, and surfaces in Python as ValueError / TypeError / IndexError. Only then are
// the checked tensors described to the ISA kernels as plain structs (params.h).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "common/params.h"

namespace gdn {

inline DType to_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": argument '", name, "' must be float32, bfloat16 or float16, got ",
                       t.scalar_type());
  }
  return DType::kFloat32;
}

inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": argument '", name, "' must be a CPU tensor, got ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* layout) {
  check_cpu(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": argument '", name, "' must be ", dim, "-D ", layout, ", got shape ",
                    t.sizes());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef want, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == want, op, ": argument '", name, "' must have shape ", want, ", got ", t.sizes());
}

inline void check_last_dim_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": argument '", name,
                    "' must be contiguous in its last dim, got strides ", t.strides());
}

// A tensor an op writes must give every element memory of its own: no stride-0 dim, no slot of a
// state pool overlapping another (a pool whose slot stride is smaller than a slot would carry one
// slot's update into slots the call was never given). Checked by the sufficient rule that each
// dim's stride is at least the extent of the dims with smaller strides.
inline void check_no_self_overlap(const at::Tensor& t, const char* op, const char* name) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t extent = 1;  // elements spanned by the dims taken so far
  for (const auto& [stride, size] : dims) {
    TORCH_CHECK_VALUE(stride >= extent, op, ": argument '", name, "' has elements that share memory (shape ",
                      t.sizes(), ", strides ", t.strides(), "): every slot and element it writes needs memory of "
                      "its own (a state pool's slot stride must be at least one slot)");
    extent += stride * (size - 1);
  }
}

// Two tensors an op reads and writes (out and a state pool) must not share memory: compared by the
// address ranges they span.
inline void check_disjoint(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                           const char* op) {
  if (a.numel() == 0 || b.numel() == 0) return;
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* begin = static_cast<const char*>(t.data_ptr());
    return std::pair<const char*, const char*>{begin, begin + (last + 1) * t.element_size()};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  TORCH_CHECK_VALUE(a1 <= b0 || b1 <= a0, op, ": arguments '", a_name, "' and '", b_name,
                    "' share memory; the op writes both");
}

// A float parameter the math needs finite (scales, bounds, decay rates).
inline void check_finite(double x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(x), op, ": argument '", name, "' must be finite, got ", x);
}

// Every entry of a small fp32 parameter vector (per head) finite.
inline void check_finite_entries(const float* x, int64_t n, const char* op, const char* name) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(x[i]), op, ": argument '", name, "' must be finite, got ", x[i], " at index ",
                      i);
  }
}

inline Mat3 mat3(const at::Tensor& t, const char* op, const char* name) {
  check_last_dim_contiguous(t, op, name);
  return Mat3{t.data_ptr(), to_dtype(t, op, name), t.stride(0), t.stride(1)};
}

inline Mat2 mat2(const at::Tensor& t, const char* op, const char* name) {
  check_last_dim_contiguous(t, op, name);
  return Mat2{t.data_ptr(), to_dtype(t, op, name), t.stride(0)};
}

// Slot indices: int32 [N], each < num_slots, non-negative ones distinct (two sequences writing one
// slot in one call would race). Negative entries are padding.
inline const int32_t* check_state_indices(const at::Tensor& idx, int64_t num_slots, const char* op) {
  check_dim(idx, 1, op, "state_indices", "[N]");
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kInt, op, ": argument 'state_indices' must be int32, got ",
                   idx.scalar_type());
  TORCH_CHECK_VALUE(idx.is_contiguous(), op, ": argument 'state_indices' must be contiguous");
  const int32_t* p = idx.data_ptr<int32_t>();
  const int64_t n = idx.size(0);
  std::vector<int32_t> used;
  used.reserve(n);
  for (const auto i : c10::irange(n)) {
    TORCH_CHECK_INDEX(p[i] < num_slots, op, ": argument 'state_indices' has ", p[i], " at position ", i,
                      ", out of range for a state pool of ", num_slots, " slots");
    if (p[i] >= 0) used.push_back(p[i]);
  }
  std::sort(used.begin(), used.end());
  const auto dup = std::adjacent_find(used.begin(), used.end());
  TORCH_CHECK_VALUE(dup == used.end(), op, ": argument 'state_indices' names slot ", dup == used.end() ? 0 : *dup,
                    " more than once");
  return p;
}

// cu_seqlens: int32 [N+1], starting at 0, non-decreasing, ending at most at T.
inline const int32_t* check_cu_seqlens(const at::Tensor& cu, int64_t N, int64_t T, const char* op) {
  check_dim(cu, 1, op, "cu_seqlens", "[N+1]");
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, op, ": argument 'cu_seqlens' must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.is_contiguous(), op, ": argument 'cu_seqlens' must be contiguous");
  TORCH_CHECK_VALUE(cu.size(0) == N + 1, op, ": argument 'cu_seqlens' must have N+1=", N + 1,
                    " entries (N = len(state_indices)), got ", cu.size(0));
  const int32_t* p = cu.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(p[0] == 0, op, ": argument 'cu_seqlens' must start at 0, got ", p[0]);
  for (const auto i : c10::irange(N)) {
    TORCH_CHECK_VALUE(p[i + 1] >= p[i], op, ": argument 'cu_seqlens' must be non-decreasing, got ", p[i], " then ",
                      p[i + 1], " at position ", i);
  }
  TORCH_CHECK_VALUE(p[N] <= T, op, ": argument 'cu_seqlens' ends at ", p[N], ", beyond T=", T, " tokens");
  return p;
}

// The token rows of a recurrent (decode-style) call over N sequences: with cu_seqlens (checked,
// stored in *cu) the sequences' own lengths, else one token per sequence (*cu = nullptr). Returns
// how many leading rows of the T tokens the sequences cover.
inline int64_t check_recurrent_sequences(const std::optional<at::Tensor>& cu_seqlens, int64_t N, int64_t T,
                                         const char* op, const int32_t** cu) {
  if (cu_seqlens.has_value()) {
    *cu = check_cu_seqlens(*cu_seqlens, N, T, op);
    return (*cu)[N];
  }
  TORCH_CHECK_VALUE(N <= T, op, ": argument 'state_indices' has N=", N, " entries but there are only T=", T,
                    " tokens (one token per sequence without cu_seqlens)");
  *cu = nullptr;
  return N;
}

inline const bool* check_has_initial_state(const at::Tensor& h, int64_t N, const char* op) {
  check_dim(h, 1, op, "has_initial_state", "[N]");
  check_shape(h, {N}, op, "has_initial_state");
  TORCH_CHECK_TYPE(h.scalar_type() == at::kBool, op, ": argument 'has_initial_state' must be bool, got ",
                   h.scalar_type());
  TORCH_CHECK_VALUE(h.is_contiguous(), op, ": argument 'has_initial_state' must be contiguous");
  return h.data_ptr<bool>();
}

// Rows of out that belong to no sequence are zeroed, so the result never depends on garbage.
inline void zero_trailing_rows(at::Tensor& out, int64_t covered) {
  if (covered < out.size(0)) out.narrow(0, covered, out.size(0) - covered).zero_();
}

// A_log / dt_bias: [Hv] of any float dtype, used as fp32.
inline at::Tensor per_head_f32(const at::Tensor& t, int64_t Hv, const char* op, const char* name) {
  check_dim(t, 1, op, name, "[Hv]");
  check_shape(t, {Hv}, op, name);
  to_dtype(t, op, name);
  return t.to(at::kFloat).contiguous();
}

// Delta-rule operands (GDN, KDA): q, k [T, Hk, K] and v [T, Hv, V] of one float dtype. grouped: Hv is
// a multiple of Hk (GDN's grouped value heads); otherwise Hv == Hk, written H (KDA).
struct QKVShape {
  int64_t T, Hk, Hv, K, V;
  bool grouped;
};
inline QKVShape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const char* op,
                          bool grouped) {
  check_dim(q, 3, op, "q", grouped ? "[T, Hk, K]" : "[T, H, K]");
  check_dim(k, 3, op, "k", grouped ? "[T, Hk, K]" : "[T, H, K]");
  check_dim(v, 3, op, "v", grouped ? "[T, Hv, V]" : "[T, H, V]");
  check_shape(k, q.sizes(), op, "k");
  const QKVShape s{q.size(0), q.size(1), v.size(1), q.size(2), v.size(2), grouped};
  if (grouped) {
    TORCH_CHECK_VALUE(v.size(0) == s.T, op, ": argument 'v' must have T=", s.T, " tokens like q, got shape ",
                      v.sizes());
  } else {
    TORCH_CHECK_VALUE(v.size(0) == s.T && s.Hv == s.Hk, op, ": argument 'v' must have shape [", s.T, ", ", s.Hk,
                      ", V] (q's tokens and heads), got ", v.sizes());
  }
  TORCH_CHECK_VALUE(s.Hk > 0 && s.K > 0 && s.V > 0, op, ": argument 'q'/'v' must have non-empty heads, got q ",
                    q.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(s.Hv % s.Hk == 0, op, ": argument 'v' must have a number of heads (", s.Hv,
                    ") that is a multiple of q/k's (", s.Hk, ")");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": arguments 'q', 'k', 'v' must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(),
                   ", ", v.scalar_type());
  to_dtype(q, op, "q");
  return s;
}

// out [T, Hv, V] in q's dtype.
inline void check_out(const at::Tensor& out, const at::Tensor& q, const QKVShape& s, const char* op) {
  check_dim(out, 3, op, "out", s.grouped ? "[T, Hv, V]" : "[T, H, V]");
  check_shape(out, {s.T, s.Hv, s.V}, op, "out");
  TORCH_CHECK_TYPE(out.scalar_type() == q.scalar_type(), op, ": argument 'out' must have q's dtype ",
                   q.scalar_type(), ", got ", out.scalar_type());
  check_no_self_overlap(out, op, "out");
}

// A recurrent state pool [num_slots, heads, rows, cols] (layout names the dims for messages),
// contiguous within each slot; every family's states are such pools.
inline StatePool check_state_pool(const at::Tensor& state, int64_t heads, int64_t rows, int64_t cols,
                                  const char* layout, const char* op, const char* name = "state") {
  check_dim(state, 4, op, name, layout);
  TORCH_CHECK_VALUE(state.size(1) == heads && state.size(2) == rows && state.size(3) == cols, op,
                    ": argument '", name, "' must have shape [num_slots, ", heads, ", ", rows, ", ", cols, "], got ",
                    state.sizes());
  TORCH_CHECK_VALUE(state.stride(3) == 1 && state.stride(2) == cols && state.stride(1) == rows * cols, op,
                    ": argument '", name, "' must be contiguous within each slot, got strides ", state.strides());
  check_no_self_overlap(state, op, name);
  return StatePool{state.data_ptr(), to_dtype(state, op, name), state.stride(0), state.size(0)};
}

// The delta rule's state pool [num_slots, Hv, K, V].
inline StatePool check_state(const at::Tensor& state, const QKVShape& s, const char* op,
                             const char* name = "state") {
  return check_state_pool(state, s.Hv, s.K, s.V, s.grouped ? "[num_slots, Hv, K, V]" : "[num_slots, H, K, V]", op,
                          name);
}

}  // namespace gdn
