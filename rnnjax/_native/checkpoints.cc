// Checkpointed passes (rnn_cpu.h: Segment): the checks and the input-side gradients that both
// cells' backward passes share, and the replay calls that recompute a checkpointed forward
// pass's outputs from its checkpoints.

#include <algorithm>
#include <cstring>
#include <vector>

#include "gates.h"
#include "rnn_cpu.h"

namespace rnnjax {

ffi::Error CheckCheckpoints(ffi::Span<const int64_t> ckpt, int64_t B, int64_t T, int64_t k,
                            int64_t width) {
  if (k < 1 || ckpt.size() != 3 || ckpt[0] != B || ckpt[1] != (T + k - 1) / k ||
      ckpt[2] != width) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "rnnjax native kernels: expected checkpoints (B, ceil(T / k), carry size)");
  }
  return ffi::Error::Success();
}

void SegmentInputGradients(bool dnnl, int64_t B, int64_t T, int64_t I, int64_t G, Segment seg,
                           const float* x, const float* dz, const float* w_i, bool need_dx,
                           float* xg, float* gx, float* gw_i, float* gb) {
  const int64_t n = seg.n();
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(xg + b * n * I, x + (b * T + seg.first) * I, sizeof(float) * n * I);
  }
  float* gxg = xg + B * n * I;
  WeightGradients(dnnl, B * n, I, G, xg, dz, w_i, need_dx, gxg, gw_i, gb, true);
  if (!need_dx) return;
  for (int64_t b = 0; b < B; ++b) {
    std::memcpy(gx + (b * T + seg.first) * I, gxg + b * n * I, sizeof(float) * n * I);
  }
}

// Replay: the outputs ys of a checkpointed forward pass, recomputed from its checkpoints
// ckpt (B, S, width). Each segment starts from its own carry, so all segments advance together:
// step j of every segment is one matmul over (segments x B) rows, in chunks of segments that keep
// the working arrays near kReplayFloats. It is a call of its own, apart from the pass that makes
// the checkpoints, so that ys is a custom call's only output: XLA computes a cotangent that is
// elementwise in ys (sum(ys ** 2), a squared error) in place over such an output, and beside it
// when ys is one element of a tuple (measured: 256 MiB more at T = 65,536, B = 4, H = 256).
constexpr int64_t kReplayFloats = int64_t{8} << 20;

namespace {

// The rows of one chunk: segment `first + i` of example b is row i * B + b.
struct Chunk {
  int64_t first, count;
};

// A replay call's sizes, checked: ys (B, T, H), w_h (H, G H), x (B, T, I) and the
// checkpoints (B, S, width H) of k = checkpoint steps each.
struct ReplayDims {
  int64_t B, T, H, I, k, S;
};

ffi::Error CheckReplay(ffi::Span<const int64_t> ys, const ffi::Buffer<ffi::F32>& w_h,
                       int64_t gates, ffi::Span<const int64_t> x, ffi::Span<const int64_t> ckpt,
                       int64_t checkpoint, int64_t width, ReplayDims* r) {
  Dims d;
  if (auto err = CheckDims(ys, 1, w_h, &d, gates); err.failure()) return err;
  if (x.size() != 3 || x[0] != d.batch || x[1] != d.steps) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "rnnjax native replay: expected x (B, T, I) for ys (B, T, H)");
  }
  const int64_t k = checkpoint, S = k > 0 ? (d.steps + k - 1) / k : 0;
  *r = {d.batch, d.steps, d.hidden, x[2], k, S};
  return CheckCheckpoints(ckpt, d.batch, d.steps, k, width * d.hidden);
}

// Segments per chunk for rows of `row_floats` working floats each.
int64_t ChunkSegments(int64_t B, int64_t S, int64_t row_floats) {
  return std::max<int64_t>(1, std::min(S, kReplayFloats / std::max<int64_t>(1, B * row_floats)));
}

// Calls fn(row, i, b, t, live) for each row of `chunk` at step j of its segments: segment
// first + i, example b, position t; `live` is false where the segment has ended (the last one
// may be short), and t is then clamped to a valid position for the row to compute on.
template <class Fn>
void ForRows(Chunk chunk, int64_t j, int64_t k, int64_t B, int64_t T, bool reverse, Fn fn) {
  for (int64_t i = 0; i < chunk.count; ++i) {
    const int64_t s = (chunk.first + i) * k + j;
    const int64_t t = Position(std::min(s, T - 1), T, reverse);
    for (int64_t b = 0; b < B; ++b) fn(i * B + b, i, b, t, s < T);
  }
}

// Calls step(chunk, j) for every chunk of segments and every step j the chunk has.
template <class Step>
void Replay(int64_t B, int64_t T, int64_t k, int64_t row_floats, Step step) {
  const int64_t S = (T + k - 1) / k, per_chunk = ChunkSegments(B, S, row_floats);
  for (int64_t first = 0; first < S; first += per_chunk) {
    const Chunk chunk{first, std::min(per_chunk, S - first)};
    for (int64_t j = 0; j < k && chunk.first * k + j < T; ++j) step(chunk, j);
  }
}

}  // namespace

// The LSTM's ys from checkpoints [h, c] (B, S, 2H).
ffi::Error LstmReplayImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                          ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> w_h,
                          ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> ckpt, bool reverse,
                          int64_t checkpoint, ffi::ResultBuffer<ffi::F32> ys) {
  ReplayDims d;
  if (auto err = CheckReplay(ys->dimensions(), w_h, 4, x.dimensions(), ckpt.dimensions(),
                             checkpoint, 2, &d);
      err.failure()) {
    return err;
  }
  const int64_t B = d.B, T = d.T, H = d.H, G = 4 * H, I = d.I, K = I + H, k = d.k, S = d.S;
  const bool dnnl = DnnlMatmul(B, H);
  if (dnnl) CountPass(kLoopsOnednnMatmul);
  CountPass(kReplay);
  return OnMatmulThread(dnnl, [&]() -> ffi::Error {
    Work w_work(0, K * G);
    const float* w = Stacked(w_work, w_i.typed_data(), w_h.typed_data(), I, H, G);
    const int64_t row_floats = K + G + 2 * H;
    const int64_t rows_max = B * ChunkSegments(B, S, row_floats);
    Work work(1, rows_max * row_floats);
    float* xh = work.data();
    float* z = xh + rows_max * K;
    float* h = z + rows_max * G;
    float* c = h + rows_max * H;
    std::vector<float> r(6 * H);
    const float* px = x.typed_data();
    const float* pc = ckpt.typed_data();
    const bool* pm = mask.typed_data();
    float* py = ys->typed_data();
    HugePages(py, ys->size_bytes());
    Replay(B, T, k, row_floats, [&](Chunk chunk, int64_t j) {
      ForRows(chunk, j, k, B, T, reverse, [&](int64_t row, int64_t i, int64_t b, int64_t t, bool) {
        if (j == 0) {
          const float* at = pc + (b * S + chunk.first + i) * 2 * H;
          std::memcpy(h + row * H, at, sizeof(float) * H);
          std::memcpy(c + row * H, at + H, sizeof(float) * H);
        }
        std::memcpy(xh + row * K, px + (b * T + t) * I, sizeof(float) * I);
        std::memcpy(xh + row * K + I, h + row * H, sizeof(float) * H);
        std::memcpy(z + row * G, bias.typed_data(), sizeof(float) * G);
      });
      const int64_t R = chunk.count * B;
      if (K > 0) Gemm(dnnl, false, false, R, G, K, xh, K, w, G, 1.0f, z, G);
      ForRows(chunk, j, k, B, T, reverse, [&](int64_t row, int64_t, int64_t b, int64_t t,
                                              bool live) {
        if (!live) return;
        LstmRow(z + row * G, c + row * H, h + row * H, r.data(), py + (b * T + t) * H,
                pm[b * T + t], H);
      });
    });
    return ffi::Error::Success();
  });
}

// The GRU's ys from checkpoints h (B, S, H).
ffi::Error GruReplayImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                         ffi::Buffer<ffi::F32> b_i, ffi::Buffer<ffi::F32> w_h,
                         ffi::Buffer<ffi::F32> b_h, ffi::Buffer<ffi::PRED> mask,
                         ffi::Buffer<ffi::F32> ckpt, bool reverse, int64_t checkpoint,
                         ffi::ResultBuffer<ffi::F32> ys) {
  ReplayDims d;
  if (auto err = CheckReplay(ys->dimensions(), w_h, 3, x.dimensions(), ckpt.dimensions(),
                             checkpoint, 1, &d);
      err.failure()) {
    return err;
  }
  const int64_t B = d.B, T = d.T, H = d.H, G = 3 * H, I = d.I, k = d.k, S = d.S;
  const bool dnnl = DnnlMatmul(B, H);
  if (dnnl) CountPass(kLoopsOnednnMatmul);
  CountPass(kReplay);
  return OnMatmulThread(dnnl, [&]() -> ffi::Error {
    const int64_t row_floats = I + 2 * G + H;
    const int64_t rows_max = B * ChunkSegments(B, S, row_floats);
    Work work(1, rows_max * row_floats);
    float* xr = work.data();
    float* gi = xr + rows_max * I;
    float* gh = gi + rows_max * G;
    float* h = gh + rows_max * G;
    std::vector<float> r(4 * H);
    const float* px = x.typed_data();
    const float* pc = ckpt.typed_data();
    const bool* pm = mask.typed_data();
    float* py = ys->typed_data();
    HugePages(py, ys->size_bytes());
    Replay(B, T, k, row_floats, [&](Chunk chunk, int64_t j) {
      ForRows(chunk, j, k, B, T, reverse, [&](int64_t row, int64_t i, int64_t b, int64_t t, bool) {
        if (j == 0) {
          std::memcpy(h + row * H, pc + (b * S + chunk.first + i) * H, sizeof(float) * H);
        }
        std::memcpy(xr + row * I, px + (b * T + t) * I, sizeof(float) * I);
        std::memcpy(gi + row * G, b_i.typed_data(), sizeof(float) * G);
        std::memcpy(gh + row * G, b_h.typed_data(), sizeof(float) * G);
      });
      const int64_t R = chunk.count * B;
      if (I > 0) Gemm(dnnl, false, false, R, G, I, xr, I, w_i.typed_data(), G, 1.0f, gi, G);
      if (H > 0) Gemm(dnnl, false, false, R, G, H, h, H, w_h.typed_data(), G, 1.0f, gh, G);
      ForRows(chunk, j, k, B, T, reverse, [&](int64_t row, int64_t, int64_t b, int64_t t,
                                              bool live) {
        if (!live) return;
        GruRow(gi + row * G, gh + row * G, h + row * H, r.data(), py + (b * T + t) * H,
               pm[b * T + t], H);
      });
    });
    return ffi::Error::Success();
  });
}

}  // namespace rnnjax
