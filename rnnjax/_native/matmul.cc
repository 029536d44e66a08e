// The own loops' matrix products: OpenBLAS's cblas_sgemm (whose address Python passes in, from
// the scipy-openblas32 wheel) or, in builds with oneDNN and for large enough steps, oneDNN's
// matmul; and the weight gradients after a backward loop, as large matmuls over all its rows.

#include <algorithm>
#include <cstring>
#include <exception>
#include <string>

#ifdef RNNJAX_WITH_DNNL
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "onednn.h"
#endif
#include "rnn_cpu.h"

namespace rnnjax {

namespace {
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };
}  // namespace

SgemmFn g_sgemm = nullptr;

// ------------------------------------------------------------------ the own loops' matmuls
// Whether a pass of rnnjax's own loops over B rows of H units does its matmuls with oneDNN: a
// build with it, a step of at least kDnnlUnits (B x H), and neither RNNJAX_ONEDNN nor
// RNNJAX_ONEDNN_MATMUL is 0 (read per call). Such a pass runs on the oneDNN thread: the
// per-step matmuls on weights packed once per pass (StepGemm), the others with dnnl_sgemm, the
// per-row work spread over the same OpenMP team (Parallel), and no OpenBLAS threads spin
// beside it. Smaller steps keep OpenBLAS
// on the calling thread: a oneDNN matmul call costs ~5 us, OpenBLAS's 1.5-3 us at
// (16, 32..64) @ (32..64, 192), and per step that is most of the work (a GRU
// forward+backward at 16x256x32x64 took 9.2 ms vs 6.2 ms).
constexpr int64_t kDnnlUnits = 4096;

bool DnnlMatmul(int64_t B, int64_t H) {
#ifdef RNNJAX_WITH_DNNL
  return B * H >= kDnnlUnits && EnvOn("RNNJAX_ONEDNN") && EnvOn("RNNJAX_ONEDNN_MATMUL");
#else
  (void)B;
  (void)H;
  return false;
#endif
}

ffi::Error OnMatmulThread(bool dnnl, const std::function<ffi::Error()>& pass) {
#ifdef RNNJAX_WITH_DNNL
  if (dnnl) {
    return OnDnnlThread([&]() -> ffi::Error {
      try {
        return pass();
      } catch (const std::exception& e) {
        return ffi::Error(ffi::ErrorCode::kInternal,
                          std::string("rnnjax native loops (oneDNN matmul): ") + e.what());
      }
    });
  }
#endif
  return pass();
}

void Gemm(bool dnnl, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#ifdef RNNJAX_WITH_DNNL
  if (dnnl && dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb,
                         beta, c, ldc) == dnnl_success) {
    return;
  }  // (where oneDNN refuses, OpenBLAS does it)
#endif
  g_sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, m, n, k, 1.0f, a,
          lda, b, ldb, beta, c, ldc);
}

// StepGemm (rnn_cpu.h). With oneDNN each step runs a matmul primitive made once per shape, on W
// packed once per pass. OpenBLAS's sgemm packs both operands on every call (at a GRU's (64, 512)
// @ (512, 1536) its packing of W_h was 10% of a forward+backward's samples): 64 such steps took
// 20.5 ms packed vs 28.9 ms with OpenBLAS, 128 steps of (32, 1024) @ W^T, W (256, 1024), 7.1
// vs 16.8 ms (benchmarks/ab/step_matmul.cc, 2-core AVX-512 CPU; BENCHMARKS.md).
#ifdef RNNJAX_WITH_DNNL
namespace {

// A matmul primitive for one shape, made once (oneDNN generates its code).
struct MatmulPlan {
  memory::desc src, w, dst;
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul matmul;
  dnnl::reorder pack;
};

MatmulPlan& GetMatmulPlan(bool trans, int64_t M, int64_t K, int64_t N, int64_t lda, int64_t ldc,
                          float beta) {
  static std::mutex mutex;
  static std::map<std::tuple<bool, int64_t, int64_t, int64_t, int64_t, int64_t, bool>,
                  std::unique_ptr<MatmulPlan>>
      plans;
  std::lock_guard<std::mutex> lock(mutex);
  auto& kept = plans[{trans, M, K, N, lda, ldc, beta != 0.0f}];
  if (!kept) {  // made whole before it is kept: a throw leaves no half-made plan behind
    auto plan = std::make_unique<MatmulPlan>();
    plan->src = memory::desc({M, K}, kF32, memory::dims{lda, 1});
    plan->w = trans ? memory::desc({K, N}, kF32, memory::dims{1, K})
                    : memory::desc({K, N}, kF32, memory::dims{N, 1});
    plan->dst = memory::desc({M, N}, kF32, memory::dims{ldc, 1});
    dnnl::primitive_attr attr;
    if (beta != 0.0f) {
      dnnl::post_ops ops;
      ops.append_sum(beta);
      attr.set_post_ops(ops);
    }
    const memory::desc any({K, N}, kF32, Tag::any);
    plan->pd = dnnl::matmul::primitive_desc(Engine(), plan->src, any, plan->dst, attr);
    plan->matmul = dnnl::matmul(plan->pd);
    plan->pack = Reorder(plan->w, plan->pd.weights_desc());
    kept = std::move(plan);
  }
  return *kept;
}

}  // namespace

// A pass's W packed for its matmul plan, and the plan's operands, whose data are set per step.
struct StepGemm::Packed {
  Packed(MatmulPlan* p, int slot)
      : plan(p),
        work(slot, Floats(p->pd.weights_desc())),
        packed(p->pd.weights_desc(), Engine(), work.data()),
        src(p->src, Engine(), nullptr),
        dst(p->dst, Engine(), nullptr) {}
  MatmulPlan* plan;
  Work work;
  memory packed, src, dst;
};
#else
struct StepGemm::Packed {};
#endif

StepGemm::StepGemm(bool dnnl, int slot, const float* w, int64_t K, int64_t N, bool trans,
                   int64_t M, int64_t lda, int64_t ldc, float beta)
    : w_(w), K_(K), N_(N), M_(M), lda_(lda), ldc_(ldc), beta_(beta), trans_(trans) {
#ifdef RNNJAX_WITH_DNNL
  if (dnnl && M > 0 && K > 0 && N > 0) {
    try {
      auto packed = std::make_unique<Packed>(&GetMatmulPlan(trans, M, K, N, lda, ldc, beta), slot);
      Convert(packed->plan->pack, Wrap(packed->plan->w, w), packed->packed);
      packed_ = std::move(packed);
    } catch (const std::exception&) {
      packed_ = nullptr;  // oneDNN has no matmul for this case: OpenBLAS does it
    }
  }
#else
  (void)dnnl;
  (void)slot;
#endif
}

StepGemm::~StepGemm() = default;

void StepGemm::operator()(const float* a, float* c) {
  if (M_ == 0 || N_ == 0) return;
#ifdef RNNJAX_WITH_DNNL
  if (packed_ != nullptr) {
    packed_->src.set_data_handle(const_cast<float*>(a));
    packed_->dst.set_data_handle(c);
    Run(packed_->plan->matmul,
        {{DNNL_ARG_SRC, packed_->src}, {DNNL_ARG_WEIGHTS, packed_->packed},
         {DNNL_ARG_DST, packed_->dst}});
    return;
  }
#endif
  if (K_ == 0) {
    if (beta_ == 0.0f) {
      for (int64_t i = 0; i < M_; ++i) std::memset(c + i * ldc_, 0, sizeof(float) * N_);
    }
    return;
  }
  Gemm(false, false, trans_, M_, N_, K_, a, lda_, w_, trans_ ? K_ : N_, beta_, c, ldc_);
}

void WeightGradients(bool dnnl, int64_t rows, int64_t K, int64_t G, const float* in,
                     const float* dz, const float* w, bool need_dx, float* dx, float* dw,
                     float* db, bool accumulate) {
  if (rows > 0 && K > 0) {
    Gemm(dnnl, true, false, K, G, rows, in, K, dz, G, accumulate ? 1.0f : 0.0f, dw, G);
  } else if (!accumulate) {
    std::memset(dw, 0, sizeof(float) * K * G);
  }
  if (db != nullptr) {
    if (!accumulate) std::memset(db, 0, sizeof(float) * G);
    constexpr int64_t kColumns = 256;  // per task: all rows of a block of columns
#pragma omp parallel for if (dnnl && rows * G >= (int64_t{1} << 16)) schedule(static)
    for (int64_t first = 0; first < G; first += kColumns) {
      const int64_t last = std::min(G, first + kColumns);
      for (int64_t row = 0; row < rows; ++row) {
        const float* __restrict__ zr = dz + row * G;
        float* __restrict__ sum = db;
#pragma omp simd
        for (int64_t j = first; j < last; ++j) sum[j] += zr[j];
      }
    }
  }
  if (need_dx && rows > 0 && K > 0) {
    Gemm(dnnl, false, true, rows, K, G, dz, G, w, G, 0.0f, dx, K);
  } else if (need_dx) {
    std::memset(dx, 0, sizeof(float) * rows * K);
  }
}

float* Stacked(const Work& work, const float* w_i, const float* w_h, int64_t I, int64_t H,
               int64_t G) {
  float* w = work.data();
  std::memcpy(w, w_i, sizeof(float) * I * G);
  std::memcpy(w + I * G, w_h, sizeof(float) * H * G);
  return w;
}

}  // namespace rnnjax
