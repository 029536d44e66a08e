// rnnjax's own loops for the GRU, as lstm_loops.cc's for the LSTM: per step two matmuls (the
// input and the recurrent side) and one pass over the gates (GruRow, gates.h).
//
// PyTorch's (reset-after) GRU, gates r, z, n:
//   gi = x_t W_i + b_i, gh = h W_h + b_h (each (B, 3H)),
//   r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r gh_n),
//   h' = (1 - z) n + z h.
// Residuals: h_prev (B, T, H) and res (B, T, 4H) = [r, z, n, gh_n].

#include <cstring>
#include <vector>

#include "gates.h"
#include "rnn_cpu.h"

namespace rnnjax {

namespace {

struct GruPass {
  int64_t B, T, I, H;
  bool reverse;
  const float* x;     // (B, T, I)
  const bool* mask;   // (B, T)
  const float* w_i;   // (I, 3H)
  const float* b_i;   // (3H)
  const float* w_h;   // (H, 3H)
  const float* b_h;   // (3H)
  bool dnnl;          // matmuls with oneDNN (DnnlMatmul), on the oneDNN thread
};

// Steps [begin, end) of a forward pass from the carry h, which they advance; ys, h_prev, res
// (at `rows`) and ckpt (B, S, H) are written when given, as in LstmSteps.
void GruSteps(const GruPass& p, int64_t begin, int64_t end, float* h, float* ys, float* h_prev,
              float* res, Rows rows, float* ckpt, int64_t k) {
  const int64_t B = p.B, T = p.T, I = p.I, H = p.H, G = 3 * H;
  const bool par = Parallel(p.dnnl, B);
  const int64_t S = ckpt != nullptr ? (T + k - 1) / k : 0;
  // Per step: gi = x_t W_i + b_i and gh = h W_h + b_h. (The input side of all steps as one
  // matmul before the loop measured 18% slower forward+backward at 32x128x64x256.)
  Work gi_work(1, B * G);
  float* gi = gi_work.data();
  Work gh_work(2, B * G);
  float* gh = gh_work.data();
  std::vector<float> gates(res != nullptr ? 0 : B * 4 * H);  // without res: one step's gates
  StepGemm input(p.dnnl, 13, p.w_i, I, G, false, B, T * I, G, 1.0f);
  StepGemm recurrent(p.dnnl, 14, p.w_h, H, G, false, B, H, G, 1.0f);

  for (int64_t s = begin; s < end; ++s) {
    const int64_t t = Position(s, T, p.reverse);
    ForEachRow(par, B, [&](int64_t b) {
      if (ckpt != nullptr && s % k == 0) {
        std::memcpy(ckpt + (b * S + s / k) * H, h + b * H, sizeof(float) * H);
      }
      std::memcpy(gi + b * G, p.b_i, sizeof(float) * G);
      std::memcpy(gh + b * G, p.b_h, sizeof(float) * G);
      if (h_prev != nullptr) {  // zeros at a padded step: dW_h = h_prev^T dz, and dz is 0 there
        float* at = h_prev + rows(b, t) * H;
        if (p.mask[b * T + t]) {
          std::memcpy(at, h + b * H, sizeof(float) * H);
        } else {
          std::memset(at, 0, sizeof(float) * H);
        }
      }
    });
    input(p.x + t * I, gi);
    recurrent(h, gh);
    ForEachRow(par, B, [&](int64_t b) {
      float* r = res != nullptr ? res + rows(b, t) * 4 * H : gates.data() + b * 4 * H;
      float* yb = ys != nullptr ? ys + (b * T + t) * H : nullptr;
      GruRow(gi + b * G, gh + b * G, h + b * H, r, yb, p.mask[b * T + t], H);
    });
  }
}

// Steps end - 1 down to begin of the GRU's BPTT from h_prev and res at `rows`: the running
// cotangent gh of the carry goes back through them; the cotangents of gi (input side) and gh
// (recurrent side) of each step go to dzi and dzh (., 3H) at `rows`.
void GruBackSteps(const GruPass& p, int64_t begin, int64_t end, const float* gys,
                  const float* h_prev, const float* res, Rows rows, float* dzi, float* dzh,
                  float* gh) {
  const int64_t B = p.B, T = p.T, H = p.H, G = 3 * H;
  const bool par = Parallel(p.dnnl, B);
  Work back_work(1, B * H);  // slot 1 as the forward steps': never live at once
  float* back = back_work.data();
  StepGemm recurrent(p.dnnl, 15, p.w_h, G, H, true, B, rows.stride * G, H, 0.0f);
  for (int64_t s = end - 1; s >= begin; --s) {
    const int64_t t = Position(s, T, p.reverse);
    ForEachRow(par, B, [&](int64_t b) {
      const int64_t at = rows(b, t);
      float* __restrict__ zi = dzi + at * G;
      float* __restrict__ zh = dzh + at * G;
      if (!p.mask[b * T + t]) {
        std::memset(zi, 0, sizeof(float) * G);
        std::memset(zh, 0, sizeof(float) * G);
        return;
      }
      const float* __restrict__ r = res + at * 4 * H;
      const float* __restrict__ yb = gys + (b * T + t) * H;
      const float* __restrict__ hp = h_prev + at * H;
      float* __restrict__ ghb = gh + b * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const float reset = r[j], z = r[H + j], n = r[2 * H + j], q = r[3 * H + j];
        const float dh = ghb[j] + yb[j];
        const float dan = dh * (1.0f - z) * (1.0f - n * n);
        const float dar = dan * q * reset * (1.0f - reset);
        const float daz = dh * (hp[j] - n) * z * (1.0f - z);
        zi[j] = dar;
        zi[H + j] = daz;
        zi[2 * H + j] = dan;
        zh[j] = dar;
        zh[H + j] = daz;
        zh[2 * H + j] = dan * reset;
        ghb[j] = dh * z;  // the direct path; the recurrent matmul's part is added below
      }
    });
    recurrent(dzh + rows(0, t) * G, back);
    ForEachRow(par, B, [&](int64_t b) {
      if (!p.mask[b * T + t]) return;
      float* __restrict__ ghb = gh + b * H;
      const float* __restrict__ bk = back + b * H;
      for (int64_t j = 0; j < H; ++j) ghb[j] += bk[j];
    });
  }
}

}  // namespace

ffi::Error GruLoopsForward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse, bool save,
                           int64_t checkpoint, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_i,
                           ffi::Buffer<ffi::F32> b_i, ffi::Buffer<ffi::F32> w_h,
                           ffi::Buffer<ffi::F32> b_h, ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<ffi::PRED> mask, ffi::ResultBuffer<ffi::F32> ys,
                           ffi::ResultBuffer<ffi::F32> h_last, ffi::ResultBuffer<ffi::F32> h_prev,
                           ffi::ResultBuffer<ffi::F32> res) {
  const bool dnnl = DnnlMatmul(B, H);
  if (dnnl) CountPass(kLoopsOnednnMatmul);
  return OnMatmulThread(dnnl, [&]() -> ffi::Error {
    StepOutputs o;
    if (auto err = OwnOutputs(save, checkpoint, B, T, H, ys, h_prev, res, &o); err.failure()) {
      return err;
    }
    float* h = h_last->typed_data();
    std::memcpy(h, h0.typed_data(), sizeof(float) * B * H);
    const GruPass p{B, T, I, H, reverse, x.typed_data(), mask.typed_data(), w_i.typed_data(),
                    b_i.typed_data(), w_h.typed_data(), b_h.typed_data(), dnnl};
    GruSteps(p, 0, T, h, o.ys, o.h_prev, o.res, Rows{T, 0}, o.ckpt, checkpoint);
    return ffi::Error::Success();
  });
}

// BPTT of the GRU: cotangents of x, W_i, b_i, W_h, b_h and h0 from those of ys and h_last.
ffi::Error GruLoopsBackward(int64_t B, int64_t T, int64_t I, int64_t H, bool reverse,
                            bool need_dx, int64_t checkpoint, ffi::Buffer<ffi::F32> gys,
                            ffi::Buffer<ffi::F32> gh_last, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> w_i, ffi::Buffer<ffi::F32> b_i,
                            ffi::Buffer<ffi::F32> w_h, ffi::Buffer<ffi::F32> b_h,
                            ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> h_prev,
                            ffi::Buffer<ffi::F32> res, ffi::ResultBuffer<ffi::F32> gx,
                            ffi::ResultBuffer<ffi::F32> gw_i, ffi::ResultBuffer<ffi::F32> gb_i,
                            ffi::ResultBuffer<ffi::F32> gw_h, ffi::ResultBuffer<ffi::F32> gb_h,
                            ffi::ResultBuffer<ffi::F32> gh0) {
  Dims d;
  const int64_t G = 3 * H, BT = B * T;
  const bool dnnl = DnnlMatmul(B, H);
  if (dnnl) CountPass(kLoopsOnednnMatmul);
  return OnMatmulThread(dnnl, [&]() -> ffi::Error {
    HugePages(gx->typed_data(), gx->size_bytes());
    float* gh = gh0->typed_data();
    std::memcpy(gh, gh_last.typed_data(), sizeof(float) * B * H);
    const GruPass p{B, T, I, H, reverse, x.typed_data(), mask.typed_data(), w_i.typed_data(),
                    b_i.typed_data(), w_h.typed_data(), b_h.typed_data(), dnnl};
    if (checkpoint <= 0) {
      if (auto err = CheckDims(res.dimensions(), 4, w_h, &d, 3); err.failure()) return err;
      // Cotangents of gi (input side) and gh (recurrent side) for all steps.
      Work dz_work(3, 2 * BT * G);
      float* dzi = dz_work.data();
      float* dzh = dzi + BT * G;
      GruBackSteps(p, 0, T, gys.typed_data(), h_prev.typed_data(), res.typed_data(), Rows{T, 0},
                   dzi, dzh, gh);
      WeightGradients(p.dnnl, BT, I, G, x.typed_data(), dzi, w_i.typed_data(), need_dx,
                      gx->typed_data(), gw_i->typed_data(), gb_i->typed_data());
      WeightGradients(p.dnnl, BT, H, G, h_prev.typed_data(), dzh, nullptr, false, nullptr,
                      gw_h->typed_data(), gb_h->typed_data());
      return ffi::Error::Success();
    }
    const int64_t k = checkpoint, S = (T + k - 1) / k;
    if (auto err = CheckCheckpoints(res.dimensions(), B, T, k, H); err.failure()) return err;
    Work seg_work(3, B * k * (2 * G + H + 4 * H) + B * H);  // dzi, dzh, h_prev, res; the carry
    float* dzi = seg_work.data();
    float* dzh = dzi + B * k * G;
    float* hp = dzh + B * k * G;
    float* rs = hp + B * k * H;
    float* h = rs + B * k * 4 * H;
    Work xg_work(4, 2 * B * k * I);  // the segment's x rows and their gradient
    float* xg = xg_work.data();
    std::memset(gw_i->typed_data(), 0, sizeof(float) * I * G);
    std::memset(gw_h->typed_data(), 0, sizeof(float) * H * G);
    std::memset(gb_i->typed_data(), 0, sizeof(float) * G);
    std::memset(gb_h->typed_data(), 0, sizeof(float) * G);
    for (int64_t index = S - 1; index >= 0; --index) {
      const Segment seg = SegmentOf(index, k, T, reverse);
      const int64_t n = seg.n();
      const Rows rows{n, seg.first};
      for (int64_t b = 0; b < B; ++b) {
        std::memcpy(h + b * H, res.typed_data() + (b * S + index) * H, sizeof(float) * H);
      }
      GruSteps(p, seg.begin, seg.end, h, nullptr, hp, rs, rows, nullptr, k);
      GruBackSteps(p, seg.begin, seg.end, gys.typed_data(), hp, rs, rows, dzi, dzh, gh);
      WeightGradients(p.dnnl, B * n, H, G, hp, dzh, nullptr, false, nullptr, gw_h->typed_data(),
                      gb_h->typed_data(), true);
      SegmentInputGradients(p.dnnl, B, T, I, G, seg, x.typed_data(), dzi, w_i.typed_data(),
                            need_dx, xg, gx->typed_data(), gw_i->typed_data(),
                            gb_i->typed_data());
    }
    return ffi::Error::Success();
  });
}

}  // namespace rnnjax
