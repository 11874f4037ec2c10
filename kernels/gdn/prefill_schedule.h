// Which schedule chunk_gated_delta_rule runs (host side, baseline ISA; called by the per-ISA
// kernels like num_threads()). VLLM_GDN_CPU_PREFILL_SCHEDULE forces one:
//   auto (default) | sequential | chunk_parallel
// auto takes chunk_parallel when the sequential walk, whose tasks are (sequence, value head
// group), would leave threads idle: its busiest thread would have more than 1.25x its fair share
// of the chunks (one long prompt with fewer heads than threads, or a few long prompts beside many
// short ones).
#pragma once
#include <cstdint>

#include "common/params.h"

namespace gdn {

constexpr const char* kPrefillScheduleEnv = "VLLM_GDN_CPU_PREFILL_SCHEDULE";

enum class PrefillSchedule : int { kSequential = 0, kChunkParallel = 1 };

// The schedule of one call (G: value heads per sequential task), counted for
// prefill_schedule_counts(). Raises ValueError naming the variable on an unknown value.
PrefillSchedule choose_prefill_schedule(const ChunkParams& p, int64_t G, int64_t threads);

}  // namespace gdn
