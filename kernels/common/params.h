// Plain-data descriptions of each kernel call, shared by the host layer (ops.cpp, which fills
// them from checked tensors) and the per-ISA kernels (which include no ATen headers).
#pragma once
#include <cstdint>

namespace gdn {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// A [rows, cols] matrix of the given dtype whose columns are contiguous.
struct Mat2 {
  const void* data;
  DType dtype;
  int64_t row_stride;  // in elements
};

// A [tokens, heads, dim] tensor with a contiguous last dim.
struct Mat3 {
  void* data;
  DType dtype;
  int64_t token_stride;  // in elements
  int64_t head_stride;   // in elements
};

struct GatingParams {
  int64_t T, Hv;
  Mat2 a, b;
  const float* A_log;    // [Hv] fp32
  const float* dt_bias;  // [Hv] fp32
  float softplus_beta, softplus_threshold;
  bool allow_neg_eigval;
  float* g;     // [T, Hv] contiguous
  float* beta;  // [T, Hv] contiguous
};

// State pool [num_slots, Hv, K, V]; each slot is contiguous, slots may be further apart.
struct StatePool {
  void* data;
  DType dtype;
  int64_t slot_stride;  // in elements
  int64_t num_slots;
};

struct RecurrentParams {
  int64_t N, Hk, Hv, K, V;
  Mat3 q, k, v, out;
  GatingParams gate;        // a, b, A_log, dt_bias, softplus params (g/beta pointers unused)
  StatePool state;
  const int32_t* state_indices;  // [N]
  const int32_t* cu_seqlens;     // [N+1] or nullptr: sequence i is token i
  float scale;
  bool use_qk_l2norm;
};

struct ChunkParams {
  int64_t N, Hk, Hv, K, V;
  Mat3 q, k, v, out;
  const float* g;     // [T, Hv], row stride g_stride
  const float* beta;  // [T, Hv], row stride beta_stride
  int64_t g_stride, beta_stride;
  StatePool state;
  const int32_t* state_indices;      // [N]
  const int32_t* cu_seqlens;         // [N+1]
  const bool* has_initial_state;     // [N] or nullptr (all true)
  float scale;
  bool use_qk_l2norm;
};

// One entry per compiled ISA (kernels/runtime.cpp picks one at run time).
struct KernelTable {
  const char* isa;
  void (*gdn_gating)(const GatingParams&);
  void (*fused_recurrent)(const RecurrentParams&);
  void (*chunk_gated_delta_rule)(const ChunkParams&);
};

}  // namespace gdn
