// Denormal handling of our kernels: every op runs with flush-to-zero and denormals-are-zero on
// every thread that executes its work, and puts the thread's previous setting back afterwards, so
// the caller's floating-point environment is the same after an op as before.
//
// Why: the recurrences multiply states by decays exp(g) that users meet at strong values (a head
// decaying by 5 nats a token is e^-320 over a 64-token chunk), and their products land in the
// denormal range, where every fp32 multiply-add on Intel cores takes a microcode assist (tens to
// hundreds of cycles): a prefill slowed 5-8x by values of ordinary checkpoints. Results below
// FLT_MIN (1.2e-38) become 0; nothing of the numerics contract (relative tolerances against float64
// references) changes. x86: MXCSR FTZ (bit 15) and DAZ (bit 6). aarch64: FPCR.FZ (bit 24; flushes
// single and double inputs and outputs). Other targets: nothing to do.
#pragma once
#include <cstdint>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace gdn {

class DenormalsFlushed {
 public:
  DenormalsFlushed() {
    saved_ = read();
    if ((saved_ & kBits) != kBits) write(saved_ | kBits);
  }
  ~DenormalsFlushed() {
    if ((saved_ & kBits) != kBits) write(saved_);
  }
  DenormalsFlushed(const DenormalsFlushed&) = delete;
  DenormalsFlushed& operator=(const DenormalsFlushed&) = delete;

  // Whether the calling thread flushes now (what tests observe from inside a kernel).
  static bool active() { return (read() & kBits) == kBits; }

 private:
#if defined(__x86_64__) || defined(__i386__)
  static constexpr uint64_t kBits = 0x8040;  // FTZ | DAZ
  static uint64_t read() { return _mm_getcsr(); }
  static void write(uint64_t v) { _mm_setcsr(static_cast<unsigned int>(v)); }
#elif defined(__aarch64__)
  static constexpr uint64_t kBits = uint64_t{1} << 24;  // FPCR.FZ
  static uint64_t read() {
    uint64_t v;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(v));
    return v;
  }
  static void write(uint64_t v) { __asm__ __volatile__("msr fpcr, %0" : : "r"(v)); }
#else
  static constexpr uint64_t kBits = 0;
  static uint64_t read() { return 0; }
  static void write(uint64_t) {}
#endif
  uint64_t saved_;
};

}  // namespace gdn
