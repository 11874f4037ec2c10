// How an op is registered with the PyTorch dispatcher: its schema and its implementation side by
// side, in a TORCH_LIBRARY_FRAGMENT(vllm_gdn_cpu, m) block at the end of the file that defines its
// host entry point (kernels/<family>/ops.cpp); kernels/registration.cpp holds the library's one
// TORCH_LIBRARY. Mutated arguments are marked (a!) in the schemas so torch.compile and
// functionalization see the in-place updates; the fake implementations live beside the Python
// wrappers (vllm_gdn_cpu/ops/).
#pragma once
#include <torch/library.h>

#include "common/fp_env.h"

namespace gdn {

// Fn run with denormals flushed on the calling thread (the worker threads set it in
// parallel_for_impl), the caller's setting given back afterwards.
template <auto Fn>
struct Flushed;
template <class R, class... Args, R (*Fn)(Args...)>
struct Flushed<Fn> {
  static R call(Args... args) {
    const DenormalsFlushed flushed;
    return Fn(args...);
  }
};

// An op on CPU tensors: the schema and its CPU implementation.
template <auto Fn>
void def_cpu_op(torch::Library& m, const char* schema) {
  m.def(schema, torch::dispatch(c10::DispatchKey::CPU, &Flushed<Fn>::call));
}

// An op with no tensor argument (run-time report, counters, probes): nothing to dispatch on, one
// implementation for every backend.
template <auto Fn>
void def_plain_op(torch::Library& m, const char* schema) {
  m.def(schema, torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd, Fn));
}

}  // namespace gdn
