#include "gdn/prefill_schedule.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/op_registration.h"

namespace gdn {
namespace {

std::atomic<int64_t> g_counts[2];
std::mutex g_phase_mutex;
double g_phases[kPhaseCount];

// The sequential walk's share of its busiest thread over a fair share (>= 1): at::parallel_for
// splits its task range [0, N * Hv / G) into contiguous pieces of ceil(tasks / threads), and a
// task costs its sequence's chunks (padding: none).
double sequential_imbalance(const ChunkParams& p, int64_t G, int64_t threads) {
  constexpr int64_t C = 64;
  const int64_t tasks = p.N * (p.Hv / G);
  if (tasks == 0 || threads <= 1) return 1.0;
  const int64_t per = (tasks + threads - 1) / threads;
  int64_t total = 0, busiest = 0, piece = 0;
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t seq = task % p.N;
    const int64_t len = p.cu_seqlens[seq + 1] - p.cu_seqlens[seq];
    const int64_t work = p.state_indices[seq] < 0 ? 0 : (len + C - 1) / C;
    total += work, piece += work;
    if ((task + 1) % per == 0 || task + 1 == tasks) busiest = std::max(busiest, piece), piece = 0;
  }
  if (total == 0) return 1.0;
  return static_cast<double>(busiest) * threads / total;
}

}  // namespace

PrefillSchedule choose_prefill_schedule(const ChunkParams& p, int64_t G, int64_t threads) {
  const char* v = std::getenv(kPrefillScheduleEnv);
  const std::string want = (v && *v) ? v : "auto";
  PrefillSchedule s;
  if (want == "sequential") {
    s = PrefillSchedule::kSequential;
  } else if (want == "chunk_parallel") {
    s = PrefillSchedule::kChunkParallel;
  } else {
    TORCH_CHECK_VALUE(want == "auto", kPrefillScheduleEnv, "=", want,
                      " is not a known prefill schedule; expected auto, sequential or chunk_parallel");
    s = sequential_imbalance(p, G, threads) > 1.25 ? PrefillSchedule::kChunkParallel : PrefillSchedule::kSequential;
  }
  g_counts[static_cast<int>(s)].fetch_add(1, std::memory_order_relaxed);
  return s;
}

std::vector<int64_t> prefill_schedule_counts() {
  return {g_counts[0].load(std::memory_order_relaxed), g_counts[1].load(std::memory_order_relaxed)};
}

}  // namespace gdn

namespace gdn {

bool prefill_phases_enabled() {
  const char* v = std::getenv(kPrefillPhasesEnv);
  return v != nullptr && v[0] == '1';
}

bool prefill_output_tasks_enabled() {
  const char* v = std::getenv(kPrefillOutputTasksEnv);
  return v == nullptr || v[0] != '0';
}

void add_prefill_phase_times(const double* values) {
  std::lock_guard<std::mutex> lock(g_phase_mutex);
  for (int i = 0; i < kPhaseCount; ++i) g_phases[i] += values[i];
}

std::vector<double> prefill_phase_times(bool reset) {
  std::lock_guard<std::mutex> lock(g_phase_mutex);
  std::vector<double> r(g_phases, g_phases + kPhaseCount);
  if (reset) std::fill(g_phases, g_phases + kPhaseCount, 0.0);
  return r;
}

}  // namespace gdn

TORCH_LIBRARY_FRAGMENT(vllm_gdn_cpu, m) {
  gdn::def_plain_op<&gdn::prefill_schedule_counts>(m, "prefill_schedule_counts() -> int[]");
  gdn::def_plain_op<&gdn::prefill_phase_times>(m, "prefill_phase_times(bool reset) -> float[]");
}
