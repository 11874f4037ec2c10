// VLLM_GDN_CPU_DECODE_SPLIT (decode_split.h), host side.
#include "common/decode_split.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

namespace gdn {
namespace {

struct Split {
  enum Mode { kAuto, kHeads, kVBlocks } mode = kAuto;
  int64_t cols = 0;  // vblocks:C
};

Split parse(const char* value) {
  const std::string v = value == nullptr ? "" : value;
  if (v.empty() || v == "auto") return {};
  if (v == "heads") return {Split::kHeads, 0};
  if (v == "vblocks") return {Split::kVBlocks, 0};
  if (v.rfind("vblocks:", 0) == 0) {
    const std::string n = v.substr(8);
    char* end = nullptr;
    const long long cols = n.empty() ? 0 : std::strtoll(n.c_str(), &end, 10);
    if (end != nullptr && *end == '\0' && cols > 0 && cols <= (1 << 20)) return {Split::kVBlocks, cols};
  }
  TORCH_CHECK_VALUE(false, kDecodeSplitEnv, " must be auto, heads, vblocks or vblocks:<columns> (a positive ",
                    "integer), got '", v, "'");
  return {};
}

enum class Claim { kAuto, kStatic, kDynamic };

Claim parse_claim(const char* value) {
  const std::string v = value == nullptr ? "" : value;
  if (v.empty() || v == "auto") return Claim::kAuto;
  if (v == "static") return Claim::kStatic;
  if (v == "dynamic") return Claim::kDynamic;
  TORCH_CHECK_VALUE(false, kDecodeClaimEnv, " must be auto, static or dynamic, got '", v, "'");
  return Claim::kAuto;
}

// An environment variable read once per call (the tests switch it between calls): a string compare
// with the last value seen, parsed again only when it changed. Each thread keeps its own copy.
template <class T, T (*Parse)(const char*)>
T current(const char* name) {
  thread_local std::string last = "\x01";
  thread_local T parsed{};
  const char* value = std::getenv(name);
  const char* v = value == nullptr ? "" : value;
  if (std::strcmp(v, last.c_str()) != 0) {
    parsed = Parse(v);  // throws before `last` changes: a bad value raises on every call
    last = v;
  }
  return parsed;
}
Split current_split() { return current<Split, parse>(kDecodeSplitEnv); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int64_t decode_v_block(int64_t units, int64_t V, int64_t quantum, int64_t threads, int64_t column_bytes) {
  const Split split = current_split();
  threads = std::max<int64_t>(threads, 1);
  quantum = std::max<int64_t>(quantum, 1);
  switch (split.mode) {
    case Split::kHeads:
      return V;
    case Split::kVBlocks: {
      if (split.cols > 0) return std::min(split.cols, V);
      const int64_t want = 4 * threads, q = 4 * quantum;  // the earlier releases' rule
      int64_t vb = V;
      while (units * ceil_div(V, vb) < want && vb > q) vb = std::max(q, ceil_div(vb / 2, q) * q);
      return vb;
    }
    case Split::kAuto:
      break;
  }
  // auto: whole heads, unless the busiest thread would stream more than kSplitMinBytes of state
  // with them and narrower blocks cut its columns (ceil(tasks / threads) * vb, as at::parallel_for
  // hands each thread ceil(tasks / threads) consecutive tasks) by more than an eighth. Measured on
  // the 16-core host (docs/performance.md): at equal balance whole heads streamed 2-7% faster than
  // half heads (Qwen3-Next batch 1), and a TP=8 shard (4 heads of 64 KiB fp32 on 16 threads) ran
  // 6-20% faster on 4 threads with whole heads than split over all 16: below a few hundred KiB per
  // thread the call's fixed cost and fork/join (~15 us there), not bandwidth, set the time. The
  // threshold itself is not measured (no shape measured reached it): at 10-20 GB/s per core it is
  // 25-50 us of streaming, several times that fixed cost.
  constexpr int64_t kSplitMinBytes = 512 << 10;
  int64_t best_vb = V, best_load = ceil_div(units, threads) * V;
  if (V % quantum != 0 || best_load * column_bytes <= kSplitMinBytes) return V;
  for (int64_t vb = V - quantum; vb >= quantum; vb -= quantum) {
    if (V % vb != 0) continue;
    const int64_t load = ceil_div(units * (V / vb), threads) * vb;
    if (8 * load < 7 * best_load) best_vb = vb, best_load = load;
  }
  return best_vb;
}

// Whether auto claims dynamically where there are at most 4 tasks per thread (not yet measured on a
// many-core host: static until it is).
constexpr bool kAutoDynamic = false;

bool decode_dynamic_claim(int64_t tasks, int64_t threads) {
  switch (current<Claim, parse_claim>(kDecodeClaimEnv)) {
    case Claim::kStatic: return false;
    case Claim::kDynamic: return true;
    case Claim::kAuto: break;
  }
  return kAutoDynamic && threads > 1 && tasks <= 4 * threads;
}

}  // namespace gdn
