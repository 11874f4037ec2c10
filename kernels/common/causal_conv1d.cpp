// causal_conv1d: depthwise causal convolution of GDN's mixed q/k/v channels (width W, typically 4),
// optionally followed by SiLU, over a varlen batch. Each sequence continues from the W-1 inputs
// cached in its conv-state slot (or zeros) and leaves its own last W-1 inputs there. Decode is the
// case of sequences of length 1. One task = one (sequence, block of channels); channels are the
// vector dimension, the taps a short loop, and the history a small ring buffer per task.
#include <algorithm>

#include "common/parallel.h"
#include "common/vec.h"

namespace gdn {
namespace GDN_ISA {
namespace {

constexpr int64_t kChannelBlock = 256;

template <class TX, class TS>
void conv_kernel(const ConvParams& p) {
  const int64_t D = p.D, W = p.W, H = W - 1, n_blocks = (D + kChannelBlock - 1) / kChannelBlock;
  const int64_t CB = kChannelBlock;
  // State rows are contiguous over channels in vLLM's default layout ("SD"): vector loads/stores.
  const bool contiguous_state = p.state_dim_stride == 1;
  parallel_for(p.N * n_blocks, 1, [&](int64_t begin, int64_t end) {
    float* hist = thread_scratch(H * CB);  // the history ring [H][CB]
    for (int64_t task = begin; task < end; ++task) {
      const int64_t seq = task / n_blocks, c0 = (task % n_blocks) * CB, nc = std::min(CB, D - c0);
      const int64_t bos = p.cu_seqlens[seq], eos = p.cu_seqlens[seq + 1];
      const int64_t slot = p.state_indices[seq];
      const bool from_state = slot >= 0 && (p.has_initial_state == nullptr || p.has_initial_state[seq]);
      TS* state = slot >= 0 ? static_cast<TS*>(p.state) + slot * p.state_slot_stride : nullptr;
      const float* taps = p.weight + c0;  // tap j of channel c0 + c at taps[j * D + c]

      for (int64_t j = 0; j < H; ++j) {
        float* row = hist + j * CB;
        if (!from_state) {
          std::fill(row, row + nc, 0.f);
        } else if (contiguous_state) {
          load_row(state + j * p.state_tap_stride + c0, row, nc);
        } else {
          for (int64_t c = 0; c < nc; ++c) row[c] = to_float(state[j * p.state_tap_stride + (c0 + c) * p.state_dim_stride]);
        }
      }

      int64_t oldest = 0;  // ring position of the oldest history row
      for (int64_t t = bos; t < eos; ++t) {
        const TX* x = static_cast<const TX*>(p.x.data) + t * p.x.row_stride + c0;
        TX* out = static_cast<TX*>(p.out.data) + t * p.out.row_stride + c0;
        int64_t c = 0;
        for (; c + kVecWidth <= nc; c += kVecWidth) {
          const vfloat xv = vload_float(x + c);
          vfloat s = p.bias ? vload(p.bias + c0 + c) : vfloat{};
          for (int64_t j = 0; j < H; ++j) s += vload(taps + j * D + c) * vload(hist + ((oldest + j) % H) * CB + c);
          s += vload(taps + H * D + c) * xv;
          vstore_float(out + c, p.silu ? vsilu(s) : s);
          vstore(hist + oldest * CB + c, xv);  // the newest input replaces the oldest
        }
        for (; c < nc; ++c) {
          const float xv = to_float(x[c]);
          float s = p.bias ? p.bias[c0 + c] : 0.f;
          for (int64_t j = 0; j < H; ++j) s += taps[j * D + c] * hist[((oldest + j) % H) * CB + c];
          s += taps[H * D + c] * xv;
          out[c] = from_float<TX>(p.silu ? s / (1.f + std::exp(-s)) : s);
          hist[oldest * CB + c] = xv;
        }
        oldest = (oldest + 1) % H;
      }

      if (state != nullptr) {
        for (int64_t j = 0; j < H; ++j) {
          const float* row = hist + ((oldest + j) % H) * CB;
          if (contiguous_state) {
            store_row(row, state + j * p.state_tap_stride + c0, nc);
          } else {
            for (int64_t c = 0; c < nc; ++c) state[j * p.state_tap_stride + (c0 + c) * p.state_dim_stride] = from_float<TS>(row[c]);
          }
        }
      }
    }
  });
}

}  // namespace

void causal_conv1d(const ConvParams& p) {
  dispatch_dtype(p.x.dtype, [&](auto x_tag) {
    dispatch_dtype(p.state_dtype, [&](auto s_tag) { conv_kernel<decltype(x_tag), decltype(s_tag)>(p); });
  });
}

}  // namespace GDN_ISA
}  // namespace gdn
