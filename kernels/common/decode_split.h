// How the decode kernels split their work into tasks: VLLM_GDN_CPU_DECODE_SPLIT. Declared here for
// the per-ISA kernels, implemented on the host side (decode_split.cpp, baseline ISA), as parallel.h.
//
// A decode task owns the columns [v0, v0 + vb) of one (sequence, head) state: columns are
// independent in every step, so any split gives the same arithmetic per column, bit for bit.
//   auto       whole heads, unless with them the busiest thread would stream more than 512 KiB of
//              state and narrower V-blocks (multiples of `quantum` columns that divide V) cut its
//              columns by more than 1/8 (few large heads on many threads). Below that, at batch 1-2
//              the call's fixed cost and fork/join, not bandwidth, set the time (measured:
//              docs/performance.md), and whole heads stream contiguously.
//   heads      one task per (sequence, head): vb = V.
//   vblocks    the rule of earlier releases: V halved (in steps of `quantum`) until there are at
//              least 4 tasks per thread.
//   vblocks:C  V-blocks of C columns (for tests and tuning; a multiple of the vector width keeps the
//              vector paths).
// VLLM_GDN_CPU_DECODE_CLAIM: how the threads get their tasks.
//   auto       static (dynamic where there are at most 4 tasks per thread is the candidate, pending
//              a measurement on a many-core host: kAutoDynamic in decode_split.cpp).
//   static     at::parallel_for's consecutive ranges (neighbouring blocks: linear streams).
//   dynamic    one task at a time from a shared counter: threads that the fork wakes first take
//              more of the work.
// A bad value of either raises ValueError naming the variable.
#pragma once
#include <cstdint>

namespace gdn {

constexpr const char* kDecodeSplitEnv = "VLLM_GDN_CPU_DECODE_SPLIT";
constexpr const char* kDecodeClaimEnv = "VLLM_GDN_CPU_DECODE_CLAIM";

// The V-block width (1..V) for `units` (sequence, head) states of V columns on `threads` threads.
// `quantum`: the narrowest block auto and vblocks choose (the kernel's narrowest vector tile);
// `column_bytes`: the state bytes of one column (K x the state's element size).
int64_t decode_v_block(int64_t units, int64_t V, int64_t quantum, int64_t threads, int64_t column_bytes);

// Whether `tasks` decode tasks on `threads` threads are claimed dynamically (VLLM_GDN_CPU_DECODE_CLAIM).
bool decode_dynamic_claim(int64_t tasks, int64_t threads);

}  // namespace gdn
