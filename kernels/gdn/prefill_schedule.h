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

// Per-phase timers of the chunk-parallel schedule, for the bench (`bench prefill --phases`): on
// while VLLM_GDN_CPU_PREFILL_PHASES=1 (read once per call; off, a call reads no clock).
constexpr const char* kPrefillPhasesEnv = "VLLM_GDN_CPU_PREFILL_PHASES";
bool prefill_phases_enabled();
// What one call adds, in the order of prefill_phase_times() (kernels/ops.h): seconds, then counts.
enum PrefillPhase : int {
  kPhaseCalls,      // calls timed
  kPhaseWall,       // the calling thread's time in the schedule (fork to join)
  kPhasePrepare,    // summed over threads: chunk_load_qk + chunk_prepare
  kPhasePass,       // summed over threads: state pass steps (and the state's loads and stores)
  kPhaseWait,       // summed over threads: waiting for a dependency (spin) or at a join barrier
  kPhaseStart,      // summed over threads: from the fork to the thread's first instruction of work
  kPhaseEnd,        // summed over threads: from the thread's last task to the join
  kPhaseBusiestPass,// the busiest thread's state-pass time (the critical path when chains bound it)
  kPhasePrepareTasks,
  kPhasePassSteps,  // (chunk, value head, column block) steps
  kPhaseThreads,    // threads that took part
  kPhaseRegions,    // parallel regions (fork/joins)
  kPhaseOutput,     // summed over threads: output tasks (o = exp(gc) q S + P v_new off the chains)
  kPhaseOutputTasks,
  kPhaseCount
};
void add_prefill_phase_times(const double* values);

// Whether the chunk-parallel schedule runs the output rows as separate tasks off the state-pass
// chains (default) or inside the chain's steps: VLLM_GDN_CPU_PREFILL_OUTPUT_TASKS=0 for the latter
// (an A/B switch for the bench; read once per call).
constexpr const char* kPrefillOutputTasksEnv = "VLLM_GDN_CPU_PREFILL_OUTPUT_TASKS";
bool prefill_output_tasks_enabled();

}  // namespace gdn
