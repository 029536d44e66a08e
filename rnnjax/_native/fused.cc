// The AVX-512 loops ("fused"): a forward pass of the LSTM or the GRU in one loop nest per step, on
// 512-bit vectors: for 16 hidden units and up to 6 batch rows at a time, the gates' pre-activations
// from x_t and h accumulate in 24 registers (4 per row: the LSTM's i, f, g, o; the GRU's r, z, and
// the input and recurrent parts of n), and the gates, the new carry and y_t are computed from those
// registers before the next 16 units: no gate array, no separate input projection, weights packed
// once per call into panels of 16 units. The threads of the OpenMP team (in builds with oneDNN,
// which have one) share a pass by batch rows (each runs its rows through all steps alone) or by
// panels (each keeps its panels in its cache; a spin barrier ends each step): FusedByRows. For
// inference (nothing saved) and for the forward pass of training (saving h_prev and the gates of
// every step, not checkpoints), it replaces rnnjax's own loops (a matmul call and a gate pass per
// step: lstm_loops.cc, gru_loops.cc) and oneDNN's RNN primitives (BENCHMARKS.md has the timings).
// Built where the compiler targets AVX-512 (-march=native on such a CPU); RNNJAX_AVX512=0 (read per
// call) turns it off.

#if defined(__AVX512F__)
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "gates.h"
#endif
#include "rnn_cpu.h"

namespace rnnjax {

#if defined(__AVX512F__)
namespace {

constexpr int kTileRows = 6;  // 6 rows x 4 accumulators = 24 of the 32 vector registers

// One call's operands. Hp is H rounded up to whole panels; the carry (h, and the LSTM's c)
// lives in (B, Hp) arrays whose padding units stay zero (their weights and biases are zero:
// an LSTM's gates are 0.5 there and c stays 0; a GRU's h' = (n + h) / 2 = 0).
struct Fused {
  int64_t B, T, I, H, Hp;
  bool reverse;
  const float* x;       // (B, T, I)
  const bool* mask;     // (B, T)
  const float* panels;  // Hp / 16 panels of I + Hp rows of G x 16 floats (PackPanels)
  const float* bias;    // (Hp / 16, 4 x 16): four bias vectors per panel
  float* c;             // the LSTM's cell state (B, Hp); null for the GRU
  float* ys;            // (B, T, H)
  float* h_prev;        // (B, T, H), h entering each step; null unless saving
  float* res;           // (B, T, W H), the gates of each step (as the loops save them) or null
  bool ahead;           // prefetch panel rows (Accumulate): a panel is larger than 32 KiB
};

// Panels [first, last) of a cell with G gates: panel j's row k holds the weights from input k
// (k < I, of W_i) or from unit k - I of h (of W_h) to units 16 j .. 16 j + 15 of each gate, in
// gate order. Its four bias vectors come from bias4 (4 H: the cell's, FusedLstmCell/GruCell).
void PackPanels(int64_t G, const float* w_i, const float* w_h, const float* bias4, int64_t I,
                int64_t H, int64_t Hp, int64_t first, int64_t last, float* panels,
                float* panel_bias) {
  const int64_t K = I + Hp, GH = G * H;
  for (int64_t j = first; j < last; ++j) {
    float* p = panels + j * K * G * kUnits;
    for (int64_t k = 0; k < K; ++k) {
      const float* w = k < I ? w_i + k * GH : (k - I < H ? w_h + (k - I) * GH : nullptr);
      for (int64_t q = 0; q < G; ++q) {
        for (int64_t u = 0; u < kUnits; ++u) {
          const int64_t unit = j * kUnits + u;
          p[(k * G + q) * kUnits + u] = w != nullptr && unit < H ? w[q * H + unit] : 0.0f;
        }
      }
    }
    for (int64_t q = 0; q < 4; ++q) {
      for (int64_t u = 0; u < kUnits; ++u) {
        const int64_t unit = j * kUnits + u;
        panel_bias[(j * 4 + q) * kUnits + u] = unit < H ? bias4[q * H + unit] : 0.0f;
      }
    }
  }
}

// acc[r] += a[r][0 .. n) @ the panel rows p (n rows of V vectors): vectors 0, 1 into
// accumulators 0, 1, vector 2 into accumulator kThird, vector 3 (V = 4) into 3. With kAhead,
// each row is asked for 8 rows before it is used: a panel larger than L1 streams from L2 or
// beyond, and the hardware's prefetch alone left it waiting (LSTM inference 8x64x32x512: 6.1
// vs 5.6 ms; 64x64x128x512: 34.3 vs 32.8 ms; no gain where a panel stays in L1).
template <int R, int V, int kThird, bool kAhead>
inline void Accumulate(__m512 (&acc)[R][4], const float* const (&a)[R], const float* p,
                       int64_t n) {
  for (int64_t k = 0; k < n; ++k, p += V * kUnits) {
    if (kAhead) {
      for (int q = 0; q < V; ++q) {
        _mm_prefetch(reinterpret_cast<const char*>(p + (8 * V + q) * kUnits), _MM_HINT_T0);
      }
    }
    __m512 w[V];
    for (int q = 0; q < V; ++q) w[q] = _mm512_load_ps(p + q * kUnits);
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_set1_ps(a[r][k]);
      acc[r][0] = _mm512_fmadd_ps(v, w[0], acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(v, w[1], acc[r][1]);
      acc[r][kThird] = _mm512_fmadd_ps(v, w[2], acc[r][kThird]);
      if (V == 4) acc[r][3] = _mm512_fmadd_ps(v, w[V - 1], acc[r][3]);
    }
  }
}

// Rows b0 .. b0 + R - 1 of panel j at position t: h_in is the carry entering the step, h_out
// gets the carry leaving it ((B, Hp) each); c, y_t and, when saving, h_prev and res are written.
template <class Cell, int R>
inline void FusedTile(const Fused& f, int64_t t, int64_t b0, int64_t j, const float* h_in,
                      float* h_out) {
  constexpr int G = Cell::kGates;
  const int64_t I = f.I, Hp = f.Hp;
  const float* p = f.panels + j * (I + Hp) * G * kUnits;
  __m512 acc[R][4];  // not from the bias: GCC made that a store and a stalling reload
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < 4; ++q) acc[r][q] = _mm512_setzero_ps();
  }
  const float* a[R];
  for (int r = 0; r < R; ++r) a[r] = f.x + ((b0 + r) * f.T + t) * I;
  if (f.ahead) {
    Accumulate<R, G, 2, true>(acc, a, p, I);
  } else {
    Accumulate<R, G, 2, false>(acc, a, p, I);
  }
  for (int r = 0; r < R; ++r) a[r] = h_in + (b0 + r) * Hp;
  p += I * G * kUnits;
  if (f.ahead) {
    Accumulate<R, G, Cell::kThirdFromH, true>(acc, a, p, Hp);
  } else {
    Accumulate<R, G, Cell::kThirdFromH, false>(acc, a, p, Hp);
  }
  const int64_t u0 = j * kUnits, H = f.H;
  const int64_t left = H - u0;
  const __mmask16 units = left >= kUnits ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
  for (int r = 0; r < R; ++r) {
    const int64_t b = b0 + r, at = b * f.T + t;
    const RowStep s{h_in + b * Hp + u0,
                    h_out + b * Hp + u0,
                    f.ys + at * H + u0,
                    f.h_prev != nullptr ? f.h_prev + at * H + u0 : nullptr,
                    f.res != nullptr ? f.res + at * Cell::kResWidth * H + u0 : nullptr,
                    units,
                    f.mask[at]};
    Cell::Row(acc[r], f.bias + j * 4 * kUnits, f.c != nullptr ? f.c + b * Hp + u0 : nullptr,
              H, s);
  }
}

// FusedTile for R = 1 .. kTileRows rows.
template <class Cell>
inline void FusedRows(const Fused& f, int64_t t, int64_t b0, int64_t R, int64_t j,
                      const float* h_in, float* h_out) {
  switch (R) {
    case 1: return FusedTile<Cell, 1>(f, t, b0, j, h_in, h_out);
    case 2: return FusedTile<Cell, 2>(f, t, b0, j, h_in, h_out);
    case 3: return FusedTile<Cell, 3>(f, t, b0, j, h_in, h_out);
    case 4: return FusedTile<Cell, 4>(f, t, b0, j, h_in, h_out);
    case 5: return FusedTile<Cell, 5>(f, t, b0, j, h_in, h_out);
    default: return FusedTile<Cell, kTileRows>(f, t, b0, j, h_in, h_out);
  }
}

// A barrier for the threads of one pass that spins (a step lasts microseconds; a futex wake-up
// would cost more), yielding the core now and then in case it is oversubscribed.
class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void Reset(int n) { n_ = n; }  // before anyone waits
  void Wait() {
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spins = 1; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins % 4096 == 0) {
        std::this_thread::yield();
      } else {
        _mm_pause();
      }
    }
  }

 private:
  int n_;
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> gen_{0};
};

// Thread `id` of `n`: packs its share of the panels, then runs every step on its share of the
// work, which is either some of the rows with all panels (`by_rows`: the threads never wait
// for each other) or all rows with some of the panels (every step ends at the barrier, as
// each thread's carry feeds the others'). h holds two (B, Hp) carries, the one entering step
// s at s % 2.
template <class Cell>
void FusedThread(const Fused& f, const float* w_i, const float* w_h, const float* bias4,
                 float* panels, float* panel_bias, float* h, int id, int n, bool by_rows,
                 SpinBarrier& barrier) {
  const int64_t panels_n = f.Hp / kUnits;
  PackPanels(Cell::kGates, w_i, w_h, bias4, f.I, f.H, f.Hp, panels_n * id / n,
             panels_n * (id + 1) / n, panels, panel_bias);
  const int64_t first = by_rows ? 0 : panels_n * id / n;
  const int64_t last = by_rows ? panels_n : panels_n * (id + 1) / n;
  const int64_t row0 = by_rows ? f.B * id / n : 0;
  const int64_t rows = by_rows ? f.B * (id + 1) / n - row0 : f.B;
  // Row tiles of near-equal height (e.g. 32 rows: 5, 5, 5, 5, 6, 6 rather than 6 x 5 and 2).
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  barrier.Wait();  // every panel packed
  for (int64_t s = 0; s < f.T; ++s) {
    const int64_t t = Position(s, f.T, f.reverse);
    const float* h_in = h + (s % 2) * f.B * f.Hp;
    float* h_out = h + ((s + 1) % 2) * f.B * f.Hp;
    if (!by_rows) {
      // The carry entering the step was written by every thread: ask for all of its lines at
      // once (each tile would otherwise wait for the other cores' lines one by one).
      for (const float* at = h_in; at < h_in + f.B * f.Hp; at += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(at), _MM_HINT_T0);
      }
    }
    if (s + 1 < f.T) {  // and the next step's inputs
      const int64_t next = Position(s + 1, f.T, f.reverse);
      for (int64_t b = row0; b < row0 + rows; ++b) {
        const float* row = f.x + (b * f.T + next) * f.I;
        for (int64_t i = 0; i < f.I; i += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(row + i), _MM_HINT_T0);
        }
      }
    }
    for (int64_t j = first; j < last; ++j) {
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t b0 = row0 + rows * tile / tiles, b1 = row0 + rows * (tile + 1) / tiles;
        FusedRows<Cell>(f, t, b0, b1 - b0, j, h_in, h_out);
      }
    }
    if (!by_rows) barrier.Wait();
  }
}

// Threads for a pass of B rows and H units: at most one per panel or per row (the larger), and
// one alone when a step is too small to share (below kFusedShareUnits batch x hidden units) or
// when RNNJAX_ONEDNN is 0 (which keeps the kernels off OpenMP's threads, e.g. beside PyTorch's
// own OpenMP runtime).
constexpr int64_t kFusedShareUnits = 256;

int FusedThreads(int64_t B, int64_t Hp) {
#ifdef _OPENMP
  if (B * Hp < kFusedShareUnits || !EnvOn("RNNJAX_ONEDNN")) return 1;
  return static_cast<int>(std::min<int64_t>(omp_get_max_threads(), std::max(Hp / kUnits, B)));
#else
  (void)B;
  (void)Hp;
  return 1;
#endif
}

// How `threads` share a pass (FusedThread): by rows where every thread can keep all the
// panels in its L2 cache (at most 3/4 of it) and either the panels are few (H <= 128: per
// step, the barrier would cost about as much as the arithmetic) or each thread has two full
// row tiles; otherwise by panels. Measured on a 2-core AVX-512 CPU (2 MiB L2 per core), LSTM
// inference ms by panels / by rows: 16x256x32x64 0.98 / 0.85, 32x128x64x256 8.6 / 8.1,
// 64x64x128x512 32.8 / 36.7 (5.2 MiB of panels), 16x42x32x256 1.44 / 1.59, 2x339x32x256
// 2.03 / 2.87.
bool FusedByRows(int64_t G, int64_t B, int64_t I, int64_t Hp, int threads) {
  static const int64_t l2 = [] {
    const long bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return bytes > 0 ? int64_t{bytes} : int64_t{1} << 20;
  }();
  const int64_t panel_bytes = (I + Hp) * Hp * G * int64_t{sizeof(float)};
  return threads > 1 && 4 * panel_bytes <= 3 * l2 &&
         (Hp <= 128 || B >= 2 * kTileRows * threads);
}

}  // namespace

template <class Cell>
ffi::Error FusedForward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse,
                        const float* x, const float* w_i, const float* w_h, const float* bias4,
                        const float* h0, const float* c0, const bool* mask, float* ys,
                        float* h_prev, float* res, float* h_last, float* c_last) {
  CountPass(kFused);
  const int64_t Hp = (H + kUnits - 1) / kUnits * kUnits;
  const int threads = FusedThreads(B, Hp);
  return OnMatmulThread(threads > 1, [&]() -> ffi::Error {
    Work panels(0, (I + Hp) * Hp * Cell::kGates), panel_bias(1, Hp * 4), carry(2, 3 * B * Hp);
    float* h = carry.data();  // two h arrays, then the LSTM's c
    float* c = c0 != nullptr ? h + 2 * B * Hp : nullptr;
    std::fill(h, h + 3 * B * Hp, 0.0f);
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(h + b * Hp, h0 + b * H, sizeof(float) * H);
      if (c != nullptr) std::memcpy(c + b * Hp, c0 + b * H, sizeof(float) * H);
    }
    const bool ahead = (I + Hp) * Cell::kGates * kUnits * sizeof(float) > (size_t{32} << 10);
    const Fused f{B,  T,  I,      H,   Hp, reverse, x, mask, panels.data(), panel_bias.data(),
                  c,  ys, h_prev, res, ahead};
    SpinBarrier barrier(threads);
    if (threads > 1) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
      {
        // OpenMP may start fewer threads than asked for: the work and the barrier are the
        // team's.
        const int n = omp_get_num_threads();
        const bool by_rows = FusedByRows(Cell::kGates, B, I, Hp, n);
#pragma omp single
        {
          barrier.Reset(n);  // (single ends in OpenMP's barrier: no one waits before this)
          if (n > 1) CountPass(by_rows ? kFusedByRows : kFusedByPanels);
        }
        FusedThread<Cell>(f, w_i, w_h, bias4, panels.data(), panel_bias.data(), h,
                          omp_get_thread_num(), n, by_rows, barrier);
      }
#endif
    } else {
      FusedThread<Cell>(f, w_i, w_h, bias4, panels.data(), panel_bias.data(), h, 0, 1, false,
                        barrier);
    }
    const float* h_end = h + (T % 2) * B * Hp;
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(h_last + b * H, h_end + b * Hp, sizeof(float) * H);
      if (c != nullptr) std::memcpy(c_last + b * H, c + b * Hp, sizeof(float) * H);
    }
    return ffi::Error::Success();
  });
}

// The instantiations ffi.cc calls.
template ffi::Error FusedForward<FusedLstmCell>(
    int64_t, int64_t, int64_t, int64_t, bool, const float*, const float*, const float*,
    const float*, const float*, const float*, const bool*, float*, float*, float*, float*,
    float*);
template ffi::Error FusedForward<FusedGruCell>(
    int64_t, int64_t, int64_t, int64_t, bool, const float*, const float*, const float*,
    const float*, const float*, const float*, const bool*, float*, float*, float*, float*,
    float*);
#endif  // __AVX512F__

// Whether a forward pass over B rows of H units runs FusedForward: built with it,
// RNNJAX_AVX512 is not 0, and the pass saves nothing (inference) or saves every step in
// rnnjax's layout (neither checkpoints nor oneDNN's workspace) for a backward pass that will
// run on the oneDNN thread (DnnlMatmul). Below that the backward pass runs OpenBLAS on the
// calling thread, whose threads and the OpenMP team then spin against each other on the cores:
// forward+backward at 16x256x32x64 took 12.5-13.2 ms instead of 4.7-4.9 (with one thread, the
// fused forward pass measured no faster than the loops').
bool FusedOn(bool save, bool dense, int64_t checkpoint, int64_t B, int64_t H) {
  const bool saving_all = save && !dense && checkpoint == 0 && DnnlMatmul(B, H);
  return kFusedBuilt && (!save || saving_all) && EnvOn("RNNJAX_AVX512");
}

}  // namespace rnnjax
