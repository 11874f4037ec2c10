// The prefix-caching checkpoint arguments of the chunked scans (Mamba2's mamba2_chunk_scan, Mamba-1's
// selective_scan): one check for both families' params (fields N, state_indices, cu_seqlens,
// state.num_slots, checkpoint_offsets, checkpoint_slots).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <utility>
#include <vector>

#include "common/checks.h"

namespace gdn {

// checkpoint_offsets / checkpoint_slots: both or neither, int32 [N]; offsets in [0, len]; the
// slots of the entries that write one (o > 0, not padding) in range, distinct from each other and
// from state_indices.
template <class Params>
inline void check_checkpoints(const std::optional<at::Tensor>& offsets,
                              const std::optional<at::Tensor>& slots, Params& p, const char* op) {
  TORCH_CHECK_VALUE(offsets.has_value() == slots.has_value(), op, ": arguments 'checkpoint_offsets' and "
                    "'checkpoint_slots' must be given together");
  if (!offsets.has_value()) return;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{*offsets, "checkpoint_offsets"},
                                {*slots, "checkpoint_slots"}}) {
    check_dim(t, 1, op, name, "[N]");
    check_shape(t, {p.N}, op, name);
    TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": argument '", name, "' must be int32, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": argument '", name, "' must be contiguous");
  }
  const int32_t* o = offsets->data_ptr<int32_t>();
  const int32_t* c = slots->data_ptr<int32_t>();
  std::vector<int32_t> used;
  for (int64_t i = 0; i < p.N; ++i) {
    if (p.state_indices[i] >= 0) used.push_back(p.state_indices[i]);
  }
  const size_t num_indices = used.size();
  for (int64_t i = 0; i < p.N; ++i) {
    const int64_t len = p.cu_seqlens[i + 1] - p.cu_seqlens[i];
    TORCH_CHECK_VALUE(o[i] >= 0 && o[i] <= len, op, ": argument 'checkpoint_offsets' has ", o[i], " at position ",
                      i, ", outside [0, ", len, "] (the sequence's length)");
    if (o[i] == 0 || p.state_indices[i] < 0) continue;
    TORCH_CHECK_INDEX(c[i] >= 0 && c[i] < p.state.num_slots, op, ": argument 'checkpoint_slots' has ", c[i],
                      " at position ", i, ", out of range for a state pool of ", p.state.num_slots, " slots");
    for (size_t k = 0; k < used.size(); ++k) {
      TORCH_CHECK_VALUE(used[k] != c[i], op, ": argument 'checkpoint_slots' names slot ", c[i], " at position ", i,
                        ", which is ", k < num_indices ? "in state_indices" : "another checkpoint's slot");
    }
    used.push_back(c[i]);
  }
  p.checkpoint_offsets = o;
  p.checkpoint_slots = c;
}

}  // namespace gdn
