// Plain-data descriptions of each kernel call, shared by the host layer (the ops.cpp files, which fill
// them from checked tensors) and the per-ISA kernels (which include no ATen headers).
#pragma once
#include <cstdint>

#include "kernel_list.h"

namespace gdn {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// A [rows, cols] matrix of the given dtype whose columns are contiguous.
struct Mat2 {
  void* data;
  DType dtype;
  int64_t row_stride;  // in elements
};

// A [tokens, heads, dim] tensor with a contiguous last dim.
struct Mat3 {
  void* data;
  DType dtype;
  int64_t token_stride;  // in elements
  int64_t head_stride;   // in elements

  // The row of token t, head h, as T (const-qualify T to read).
  template <class T>
  T* row(int64_t t, int64_t h) const {
    return static_cast<T*>(data) + t * token_stride + h * head_stride;
  }
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

// GEMM engines for the chunked prefill. A null pointer means "the ISA kernel's own".
//   f32:  C[M,N] (+)= A[M,K] B[K,N], fp32 row-major.
//   bf16: same with bf16 A (row-major, K even) and B packed in pairs along K ("VNNI":
//         B_packed[p][n] = {B[2p][n], B[2p+1][n]} as one 32-bit word, row stride ldb words).
using GemmF32Fn = void (*)(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                           int64_t ldb, float* C, int64_t ldc, bool accumulate);
using GemmBF16Fn = void (*)(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint32_t* B,
                            int64_t ldb, float* C, int64_t ldc, bool accumulate);
struct GemmBackend {
  const char* name;
  GemmF32Fn f32;         // nullptr: the ISA's fp32 micro-kernel
  GemmBF16Fn bf16;       // nullptr: the ISA's bf16 micro-kernel if use_bf16, else fp32 math
  bool use_bf16;         // run bf16 inputs through bf16 GEMMs (fp32 accumulation)
  void (*release)();     // called by each thread after its GEMMs (AMX tile release), may be null
  // Rows per block when a product with a triangular operand skips its zero triangle; 0: whole
  // products (engines with a fixed cost per call).
  int64_t triangle_block;
};

// The sequences of one call, the same for every family: sequence i's tokens are rows
// [cu_seqlens[i], cu_seqlens[i+1]) and its recurrent state is slot state_indices[i]. Every
// family's params derive from it (kernels read p.N, p.state_indices, ...); the host layer fills it
// through one check (check_varlen_batch / check_decode_batch in common/checks.h).
struct VarlenBatch {
  int64_t N;                          // sequences
  const int32_t* state_indices;       // [N], < 0: padding (skipped, output rows zeroed, no state touched)
  const int32_t* cu_seqlens;          // [N+1]; decode ops: nullptr = sequence i is token i
  const bool* has_initial_state;      // [N] or nullptr (all true); prefill ops
  const int32_t* checkpoint_offsets;  // [N] or nullptr: o > 0 also writes the state after o tokens
  const int32_t* checkpoint_slots;    //   into slot checkpoint_slots[i] (align-mode prefix caching)
};

struct RecurrentParams : VarlenBatch {
  int64_t Hk, Hv, K, V;
  Mat3 q, k, v, out;
  GatingParams gate;        // a, b, A_log, dt_bias, softplus params (g/beta pointers unused)
  StatePool state;
  float scale;
  bool use_qk_l2norm;
};

struct ChunkParams : VarlenBatch {
  int64_t Hk, Hv, K, V;
  Mat3 q, k, v, out;
  const float* g;     // [T, Hv], row stride g_stride
  const float* beta;  // [T, Hv], row stride beta_stride
  int64_t g_stride, beta_stride;
  StatePool state;
  float scale;
  bool use_qk_l2norm;
  GemmBackend gemm;
};

// Depthwise causal conv1d over a varlen batch, continuing from and updating a per-slot history.
struct ConvParams : VarlenBatch {
  int64_t T, D, W;
  Mat2 x;                         // [T, D]
  const float* weight;            // [W, D] fp32 contiguous (tap-major: each tap a vector over channels)
  const float* bias;              // [D] fp32 or nullptr
  void* state;                    // conv_state [slots, W-1, D] (strides below, in elements)
  DType state_dtype;
  int64_t state_slot_stride, state_tap_stride, state_dim_stride;  // padding: history zero, state untouched
  bool silu;
  Mat2 out;                       // [T, D], same dtype as x
};

// Mamba2 (SSD) prefill (mamba2_chunk_scan) and decode (mamba2_state_update): H heads of dim P, G
// groups of B/C with d_state Nst (head h reads group h / (H / G)), state [slots, H, P, Nst].
struct Mamba2Params : VarlenBatch {
  int64_t H, P, G, Nst;        // heads, head dim, groups, d_state
  Mat3 x, B, C, z, out;        // x/z/out [T, H, P], B/C [T, G, Nst]; z.data null if absent
  Mat2 dt;                     // [T, H] raw (before bias/softplus), any float dtype
  const float* A;              // [H] fp32, <= 0
  const float* D;              // [H] fp32 or nullptr
  const float* dt_bias;        // [H] fp32 or nullptr
  bool dt_softplus;
  float dt_min, dt_max;        // dt = clamp(softplus(dt + dt_bias), dt_min, dt_max)
  StatePool state;
  GemmBackend gemm;                   // prefill only
};

// Small-batch linear (kernels/common/linear.cpp): out[M, N] = x[M, K] weight[N, K]^T (+ bias[N]),
// fp32 accumulation, one rounding to out's dtype.
struct LinearParams {
  int64_t M, N, K;
  const float* x;        // [M, K] fp32, row stride x_stride
  int64_t x_stride;
  const void* weight;    // [N, K] contiguous
  DType weight_dtype;
  const float* bias;     // [N] fp32 or nullptr
  Mat2 out;              // [M, N]
  // int8 weights (weight-only quantization): [N] fp32 per-row scales, out = (x w_int8^T) * scale +
  // bias; weight_dtype is then ignored. nullptr: float weights of weight_dtype.
  const float* weight_scale = nullptr;
};

// Rows of a [..., D] tensor whose leading dims collapse to two levels: row r lies at
// (r / inner) * outer_stride + (r % inner) * inner_stride elements from data.
struct RowSet {
  void* data;
  int64_t inner, outer_stride, inner_stride;
  template <class T>
  T* row(int64_t r) const {
    return static_cast<T*>(data) + (r / inner) * outer_stride + (r % inner) * inner_stride;
  }
};

// Gated RMSNorm (kernels/common/gated_rms_norm.cpp), vLLM's RMSNormGated with norm_before_gate and
// one group: out = x * rsqrt(mean(x^2) + eps) * weight * act(z), act = silu or sigmoid, fp32 math.
struct GatedRmsNormParams {
  int64_t rows, D;
  RowSet x, z, out;  // x, z, out share `dtype`
  DType dtype;
  const float* weight;  // [D] fp32
  float eps;
  bool sigmoid;
};

// Kimi Delta Attention (kernels/kda/): the GDN recurrence with a per-channel decay g [T, H, K].
// Gate: g = -exp(A_log[h]) * softplus(f + dt_bias[h*K + d]) (softplus beta 1, linear above 20), or
// with a lower bound lb: g = lb * sigmoid(exp(A_log[h]) * (f + dt_bias)); beta = sigmoid(b).
struct KdaGateParams {
  int64_t T, H, K;
  Mat3 f;                 // [T, H, K]
  Mat2 b;                 // [T, H]
  const float* A_log;     // [H] fp32
  const float* dt_bias;   // [H * K] fp32 or nullptr
  bool has_lower_bound;
  float lower_bound;
  float* g;               // [T, H, K] contiguous (kda_gate only)
  float* beta;            // [T, H] contiguous (kda_gate only)
};

// chunk_kda (prefill) and fused_recurrent_kda (decode, gate computed inside from `gate`).
struct KdaParams : VarlenBatch {
  int64_t H, K, V;
  Mat3 q, k, v, out;                // q, k [T, H, K], v / out [T, H, V]
  Mat3 g;                           // chunk: [T, H, K] fp32 log-decays
  Mat2 beta;                        // chunk: [T, H] fp32
  KdaGateParams gate;               // decode: f, b, A_log, dt_bias, lower bound
  StatePool state;                  // [slots, H, K, V]
  float scale;
  bool use_qk_l2norm;
  GemmBackend gemm;                 // chunk only
};

// Mamba-1 selective scan (kernels/mamba1/): Dm channels with per-channel A [Dm, Nst], one B/C row
// per token shared by every channel, state [slots, Dm, Nst].
struct Mamba1Params : VarlenBatch {
  int64_t Dm, Nst;                    // channels (d_inner), d_state
  Mat2 x, dt, B, C, z, out;           // x/dt/z/out [T, Dm], B/C [T, Nst]; z.data null if absent
  const float* A;                     // [Dm, Nst] fp32 contiguous
  const float* D;                     // [Dm] fp32 or nullptr
  const float* dt_bias;               // [Dm] fp32 or nullptr
  bool dt_softplus;                   // dt = softplus(dt + dt_bias) (threshold 20)
  StatePool state;                    // [slots, Dm, Nst]
};

// One entry per compiled ISA (kernels/common/runtime.cpp picks one at run time): a member per
// kernel of GDN_KERNEL_LIST (kernels/kernel_list.h).
#define GDN_KERNEL_MEMBER(name, ...) void (*name)(__VA_ARGS__);
struct KernelTable {
  const char* isa;
  bool has_bf16_gemm;  // this ISA's kernels include the AVX512-BF16 (vdpbf16ps) GEMM
  GDN_KERNEL_LIST(GDN_KERNEL_MEMBER)
};
#undef GDN_KERNEL_MEMBER

}  // namespace gdn
