// The per-step matmul of a recurrent loop, C (B, N) += A (B, K) op(W), T times with one W, four
// ways: OpenBLAS's cblas_sgemm (what rnnjax's loops called every step), oneDNN's matmul on W
// packed once (its blocked layout, the reorder timed too; what StepGemm in
// rnnjax/_native/matmul.cc does now), dnnl_sgemm, and oneDNN's matmul on the plain W.
// Each way: 9 repetitions of T steps after a 0.3 s pause (the other library's idle threads
// stop spinning), median and minimum; the whole comparison twice.
//
// Build and run from the repository root, in the venv the README installs:
//   SP=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
//   c++ -O2 -std=c++17 benchmarks/ab/step_matmul.cc -I"$VIRTUAL_ENV/include" \
//     -L"$VIRTUAL_ENV/lib" -l:libdnnl.so.3 -L"$SP/scipy_openblas32/lib" -lscipy_openblas \
//     -Wl,-rpath,"$VIRTUAL_ENV/lib" -Wl,-rpath,"$SP/scipy_openblas32/lib" -o /tmp/step_matmul
//   /tmp/step_matmul 64 512 1536 64      # B K N T: h (64, 512) @ W_h (512, 1536), GRU forward
//   /tmp/step_matmul 64 1536 512 64 1    # ... dz (64, 1536) @ W_h^T, GRU backward
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

extern "C" void scipy_cblas_sgemm(int, int, int, int, int, int, float, const float*, int,
                                  const float*, int, float, float*, int);

using dnnl::memory;
using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s B K N T [trans]\n", argv[0]);
    return 2;
  }
  const int B = std::atoi(argv[1]), K = std::atoi(argv[2]), N = std::atoi(argv[3]);
  const int T = std::atoi(argv[4]);
  const bool trans = argc > 5 && std::atoi(argv[5]) != 0;  // W stored (N, K), used as W^T
  std::vector<float> A(B * K, 0.01f), W(K * N, 0.02f), C(B * N, 0.0f);
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(engine);
  const auto f32 = memory::data_type::f32;
  const memory::desc src({B, K}, f32, memory::format_tag::ab);
  const memory::desc plain({K, N}, f32, trans ? memory::format_tag::ba : memory::format_tag::ab);
  const memory::desc any({K, N}, f32, memory::format_tag::any);
  const memory::desc dst({B, N}, f32, memory::format_tag::ab);
  dnnl::primitive_attr attr;
  dnnl::post_ops ops;
  ops.append_sum(1.0f);
  attr.set_post_ops(ops);
  const dnnl::matmul::primitive_desc packed_pd(engine, src, any, dst, attr);
  const dnnl::matmul packed_mm(packed_pd);
  const dnnl::matmul::primitive_desc plain_pd(engine, src, plain, dst, attr);
  const dnnl::matmul plain_mm(plain_pd);
  memory packed(packed_pd.weights_desc(), engine);
  memory w(plain, engine, W.data()), a(src, engine, A.data()), c(dst, engine, C.data());
  std::printf("oneDNN matmul on packed weights: %s\n", packed_pd.impl_info_str());

  const auto bench = [&](const char* name, auto steps) {
    usleep(300000);
    std::vector<double> ms;
    for (int rep = 0; rep < 9; ++rep) {
      const auto start = Clock::now();
      steps();
      ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
    }
    std::sort(ms.begin(), ms.end());
    std::printf("%-32s median %.2f ms  min %.2f ms\n", name, ms[4], ms[0]);
  };
  for (int round = 0; round < 2; ++round) {
    bench("openblas cblas_sgemm", [&] {
      for (int t = 0; t < T; ++t) {
        scipy_cblas_sgemm(101, 111, trans ? 112 : 111, B, N, K, 1.0f, A.data(), K, W.data(),
                          trans ? K : N, 1.0f, C.data(), N);
      }
    });
    bench("onednn matmul, packed W", [&] {
      dnnl::reorder(w, packed).execute(stream, w, packed);
      stream.wait();
      for (int t = 0; t < T; ++t) {
        packed_mm.execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, packed}, {DNNL_ARG_DST, c}});
        stream.wait();
      }
    });
    bench("dnnl_sgemm", [&] {
      for (int t = 0; t < T; ++t) {
        dnnl_sgemm('N', trans ? 'T' : 'N', B, N, K, 1.0f, A.data(), K, W.data(), trans ? K : N,
                   1.0f, C.data(), N);
      }
    });
    bench("onednn matmul, plain W", [&] {
      for (int t = 0; t < T; ++t) {
        plain_mm.execute(stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, c}});
        stream.wait();
      }
    });
  }
  return 0;
}
