// decode_ab: the decode kernel (kernels/gdn/fused_recurrent.cpp) of this tree and of a base revision,
// each compiled for avx2 / avx512 / avx512_bf16 into its own namespace, timed side by side in one
// process over cold states (as `bench decode`: pools stepped in turn), interleaved round by round
// with an in-place stream probe (kernels/common/stream_scale.cpp, AVX2). Reports the best wall time
// and the best CPU time (slowest thread's) per layer, each as GB/s and % of the stream probe timed
// the same way: on a shared, loaded machine the CPU-time figures leave out the time other
// processes held the cores. Built and run by ci/kernel_ab/decode_ab.sh; no torch needed.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <algorithm>
#include <ctime>
#include <map>
#include <string>
#include <thread>
#include <vector>
#include "common/params.h"
#include "common/parallel.h"

namespace gdn {
#define DECL(ns) namespace ns { void fused_recurrent(const RecurrentParams&); }
namespace avx2 { void stream_scale(float*, int64_t, float); }
DECL(avx2) DECL(avx2base) DECL(avx512_bf16) DECL(avx512) DECL(avx512base) DECL(avx512_bf16base)
static int g_threads = 1;
double g_cpu = 0;  // sum over calls of the slowest thread's CPU time
static double thread_cpu() { timespec ts; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); return ts.tv_sec + ts.tv_nsec * 1e-9; }
void parallel_for_impl(int64_t n, int64_t grain, const void* ctx, RangeFn fn) {
  if (n <= 0) return;
  std::vector<double> cpu(g_threads, 0.0);
  std::vector<std::thread> ts;
  for (int t = 0; t < g_threads; ++t) {
    int64_t b = n * t / g_threads, e = n * (t + 1) / g_threads;
    auto body = [=, &cpu] { double c0 = thread_cpu(); if (b < e) fn(ctx, b, e); cpu[t] = thread_cpu() - c0; };
    if (t == g_threads - 1) body(); else ts.emplace_back(body);
  }
  for (auto& t : ts) t.join();
  double m = 0; for (double c : cpu) m = std::max(m, c);
  g_cpu += m;
}
int num_threads() { return g_threads; }
float* thread_scratch(size_t n) {
  thread_local float* p = nullptr; thread_local size_t cap = 0;
  if (n > cap) { free(p); p = (float*)aligned_alloc(64, (n * 4 + 63) / 64 * 64); cap = n; }
  return p;
}
}  // namespace gdn
using namespace gdn;
int main(int argc, char** argv) {
  // decode_ab <variants, comma-separated> <f32|bf16|f16> <batch> <rounds> <pools> [threads [Hk Hv K V]]
  if (argc < 6) {
    fprintf(stderr, "usage: decode_ab avx2base,avx2,... f32|bf16|f16 batch rounds pools [threads [Hk Hv K V]]\n");
    return 2;
  }
  std::map<std::string, void (*)(const RecurrentParams&)> all = {
    {"avx2", avx2::fused_recurrent}, {"avx2base", avx2base::fused_recurrent},
    {"avx512", avx512::fused_recurrent}, {"avx512base", avx512base::fused_recurrent},
    {"avx512_bf16", avx512_bf16::fused_recurrent}, {"avx512_bf16base", avx512_bf16base::fused_recurrent},
  };
  std::vector<std::string> names;
  { std::string s = argv[1]; size_t i = 0; while (i <= s.size()) { size_t j = s.find(',', i); if (j == std::string::npos) j = s.size(); names.push_back(s.substr(i, j - i)); i = j + 1; } }
  const bool bf16 = std::string(argv[2]) != "f32"; const bool f16 = std::string(argv[2]) == "f16";
  const int64_t B = atoi(argv[3]), rounds = atoi(argv[4]), pools = atoi(argv[5]);
  g_threads = argc > 6 ? atoi(argv[6]) : 1;
  const int64_t Hk = argc > 7 ? atoi(argv[7]) : 16, Hv = argc > 8 ? atoi(argv[8]) : 32, K = argc > 9 ? atoi(argv[9]) : 128, V = argc > 10 ? atoi(argv[10]) : 128;
  const size_t es = bf16 ? 2 : 4;
  std::vector<uint16_t> q(B * Hk * K), k(B * Hk * K), v(B * Hv * V), o(B * Hv * V), a(B * Hv), b(B * Hv);
  srand(1);
  auto rb = [] { float f = (rand() / (float)RAND_MAX) * 2 - 1; uint32_t u; memcpy(&u, &f, 4); return (uint16_t)(u >> 16); };
  for (auto* vec : {&q, &k, &v, &a, &b}) for (auto& x : *vec) x = rb();
  std::vector<float> A_log(Hv, 0.f), dt_bias(Hv, 0.f);
  std::vector<int32_t> idx(B);
  for (int i = 0; i < B; ++i) idx[i] = i;
  const size_t pool_bytes = B * Hv * K * V * es;
  std::vector<char*> P(pools);
  for (auto& p : P) { p = (char*)aligned_alloc(64, pool_bytes); memset(p, 0, pool_bytes); }
  RecurrentParams p{};
  p.N = B; p.Hk = Hk; p.Hv = Hv; p.K = K; p.V = V;
  p.q = Mat3{q.data(), DType::kBFloat16, Hk * K, K};
  p.k = Mat3{k.data(), DType::kBFloat16, Hk * K, K};
  p.v = Mat3{v.data(), DType::kBFloat16, Hv * V, V};
  p.out = Mat3{o.data(), DType::kBFloat16, Hv * V, V};
  p.gate = GatingParams{B, Hv, Mat2{a.data(), DType::kBFloat16, Hv}, Mat2{b.data(), DType::kBFloat16, Hv},
                        A_log.data(), dt_bias.data(), 1.f, 20.f, false, nullptr, nullptr};
  p.state_indices = idx.data(); p.cu_seqlens = nullptr; p.scale = 1.f / sqrtf(K); p.use_qk_l2norm = true;
  std::vector<double> best(names.size(), 1e30), bestcpu(names.size(), 1e30);
  const int64_t sn = (1ll << 30) / 4;
  float* sx = (float*)aligned_alloc(64, sn * 4);
  for (int64_t i = 0; i < sn; ++i) sx[i] = 1.f;
  double sw = 1e30, sc = 1e30;
  for (int64_t r = 0; r < rounds; ++r) {
    for (int rep = 0; rep < 2; ++rep) {
      auto t0 = std::chrono::steady_clock::now(); g_cpu = 0;
      avx2::stream_scale(sx, sn, 1.0f);
      double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      sw = std::min(sw, dt); sc = std::min(sc, g_cpu);
    }
    for (size_t vi = 0; vi < names.size(); ++vi) {
      auto fn = all.at(names[vi]);
      for (int rep = 0; rep < 3; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        g_cpu = 0;
        for (auto* pp : P) {
          p.state = StatePool{pp, f16 ? DType::kFloat16 : bf16 ? DType::kBFloat16 : DType::kFloat32, Hv * K * V, B};
          fn(p);
        }
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / pools;
        if (dt < best[vi]) best[vi] = dt;
        if (g_cpu / pools < bestcpu[vi]) bestcpu[vi] = g_cpu / pools;
      }
    }
  }
  const double stream_w = 2.0 * sn * 4 / sw / 1e9, stream_c = 2.0 * sn * 4 / sc / 1e9;
  printf("stream (AVX2 probe, 1 GiB in place): wall %.1f GB/s | cpu %.1f GB/s\n", stream_w, stream_c);
  for (size_t vi = 0; vi < names.size(); ++vi) {
    const double gw = 2.0 * pool_bytes / best[vi] / 1e9, gc = 2.0 * pool_bytes / bestcpu[vi] / 1e9;
    printf("%-12s %s B=%-3ld wall %8.1f us/layer %6.1f GB/s %5.1f%% | cpu %8.1f us %6.1f GB/s %5.1f%%\n", names[vi].c_str(), argv[2], (long)B, best[vi] * 1e6,
           gw, 100 * gw / stream_w, bestcpu[vi] * 1e6, gc, 100 * gc / stream_c);
  }
}
