// LayerNorm and RMSNorm row kernels for one instruction set; the template flag kRms selects
// RMSNorm. norm.cpp includes this file once per ISA, each time inside a `#pragma GCC target`
// region and a namespace of its own, after defining FwdArgs / BwdArgs and LIGHTLLM_VEC_ISA: no
// include guard on purpose (see cpu_vec.h).

#include "cpu_vec.h"

// The loop bodies (lambdas) are always inlined: only then are they compiled for the enclosing
// function's target.
#define LIGHTLLM_LAMBDA_INLINE __attribute__((always_inline))

// RMSNorm's 1 / sqrt(ssq / n + eps) for the fp32 row v whose sum of squares is ssq. Where ssq
// overflowed though every element is finite (|v| past ~1e17), the squares are summed again in
// units of the row's largest magnitude (two more passes, from L1/L2), so the row normalises
// instead of giving 0. An inf or NaN element keeps PyTorch's answer (0 / NaN).
inline float rms_rstd(const float* v, int64_t n, float ssq, float eps) {
  const float inv_n = 1.0f / static_cast<float>(n);
  if (!(ssq == std::numeric_limits<float>::infinity())) return 1.0f / std::sqrt(ssq * inv_n + eps);
  Vec peak = {};
  for_each_block<1>(n, [&](int64_t j, auto k, auto) LIGHTLLM_LAMBDA_INLINE {
    const Vec a = (Vec)((UVec)load_n(v + j, k) & 0x7FFFFFFFu);  // |v|
    peak = select(a > peak, a, peak);
  });
  float amax = 0.0f;
  for (int l = 0; l < kLanes; ++l) amax = std::max(amax, peak[l]);
  if (!(amax < std::numeric_limits<float>::infinity())) return 1.0f / std::sqrt(ssq * inv_n + eps);
  const float scale = 1.0f / amax;
  Vec acc[2] = {};
  for_each_block<2>(n, [&](int64_t j, auto k, auto chain) LIGHTLLM_LAMBDA_INLINE {
    const Vec u = load_n(v + j, k) * scale;  // lanes past the end are 0
    acc[chain] += u * u;
  });
  const float scaled = lane_sum(acc[0] + acc[1]);
  return 1.0f / (std::sqrt(scaled * inv_n + eps * scale * scale) * amax);
}

// Rows [begin, end) of the forward, LayerNorm or (kRms) RMSNorm. `scratch` holds one fp32 row; it
// is unused for fp32, whose row is read back from memory (x, or the sum s just written). The
// output TY is T, or float for RMSNorm's cast-before-weight beside an fp32 weight.
template <typename T, typename TY, bool kRms>
void layer_norm_fwd_rows(const FwdArgs<T, TY>& args, int64_t begin, int64_t end, float* scratch) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  const FwdArgs<T, TY> a = args;  // a local copy: no store through a row pointer can alias it
  const int64_t n = a.n;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = a.x + row * a.x_stride;
    const T* r = a.r ? a.r + row * a.r_stride : nullptr;
    T* s = a.s ? a.s + row * n : nullptr;
    // -- pass 1: s = x (+ residual, rounded to T and stored), kept as fp32, and its sum (of
    // squares, for RMSNorm) --
    Vec acc[4] = {};
    for_each_block<4>(n, [&](int64_t j, auto k, auto chain) LIGHTLLM_LAMBDA_INLINE {
      Vec v = load_n(x + j, k);  // lanes past the end are 0
      if (r) v = store_n(s + j, v + load_n(r + j, k), k);
      if constexpr (!kFloat) store_n(scratch + j, v, k);
      if constexpr (kRms) {
        acc[chain] += v * v;
      } else {
        acc[chain] += v;
      }
    });
    const float* v = scratch;
    if constexpr (kFloat) v = s ? s : x;
    const float total = lane_sum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    float mean = 0.0f, rstd;
    if constexpr (kRms) {
      rstd = rms_rstd(v, n, total, a.eps);
    } else {
      mean = total / static_cast<float>(n);
      // -- pass 2: the centred sum of squares, from L1/L2 --
      for (Vec& c : acc) c = Vec{};
      for_each_block<4>(n, [&](int64_t j, auto k, auto chain) LIGHTLLM_LAMBDA_INLINE {
        const Vec d = keep_n(load_n(v + j, k) - mean, k);
        acc[chain] += d * d;
      });
      const float var = lane_sum((acc[0] + acc[1]) + (acc[2] + acc[3])) / static_cast<float>(n);
      rstd = 1.0f / std::sqrt(var + a.eps);
    }
    // -- pass 3: normalise, the affine parameters, store; the next row's inputs start to load --
    TY* y = a.y + row * n;
    for_each_block<1>(n, [&](int64_t j, auto k, auto) LIGHTLLM_LAMBDA_INLINE {
      __builtin_prefetch(x + a.x_stride + j);  // past the last row: a prefetch never faults
      if (r) __builtin_prefetch(r + a.r_stride + j);
      Vec out;
      if constexpr (kRms) {
        out = load_n(v + j, k) * rstd;
        if (a.cast_before_weight) out = round_to<T>(out);  // LlamaRMSNorm's order
      } else {
        out = (load_n(v + j, k) - mean) * rstd;
      }
      if (a.w) out *= load_n(a.w + j, k);
      if (a.b) out += load_n(a.b + j, k);
      store_n(y + j, out, k);
    });
    if constexpr (!kRms) a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
}

// Rows [begin, end) of the backward, adding dy * xhat and dy into the fp32 rows dw and db (this
// chunk's partials; nullptr when not needed). RMSNorm (kRms) has mean 0 and no mean(g) term.
template <typename T, bool kRms>
void layer_norm_bwd_rows(const BwdArgs<T>& args, int64_t begin, int64_t end, float* dw,
                         float* db) {
  const BwdArgs<T> a = args;  // a local copy: no store through a row pointer can alias it
  const int64_t n = a.n;
  for (int64_t row = begin; row < end; ++row) {
    const T* x = a.x + row * a.x_stride;
    const T* dy = a.dy + row * a.dy_stride;
    const float mean = kRms ? 0.0f : a.mean[row * a.mean_stride];
    const float rstd = a.rstd[row * a.rstd_stride];
    // xhat (0 past the row's end), dy and g = w * dy of one block, recomputed in each pass (the
    // row is in L1/L2 for the second).
    const auto tile = [&](int64_t j, auto k) LIGHTLLM_LAMBDA_INLINE {
      const Vec dyv = load_n(dy + j, k);  // lanes past the end are 0
      const Vec xhat = keep_n((load_n(x + j, k) - mean) * rstd, k);
      return std::array<Vec, 3>{xhat, dyv, a.w ? dyv * load_n(a.w + j, k) : dyv};
    };
    // -- pass 1: sum(xhat * g), sum(g) (LayerNorm), and this chunk's dw / db --
    Vec acc_xg[2] = {}, acc_g[2] = {};
    for_each_block<2>(n, [&](int64_t j, auto k, auto chain) LIGHTLLM_LAMBDA_INLINE {
      const auto [xhat, dyv, g] = tile(j, k);
      acc_xg[chain] += xhat * g;
      if constexpr (!kRms) acc_g[chain] += g;
      if (dw) store_n(dw + j, load_n(dw + j, k) + dyv * xhat, k);
      if (db) store_n(db + j, load_n(db + j, k) + dyv, k);
    });
    const float c1 = lane_sum(acc_xg[0] + acc_xg[1]) / static_cast<float>(n);
    const float c2 = kRms ? 0.0f : lane_sum(acc_g[0] + acc_g[1]) / static_cast<float>(n);
    // -- pass 2: dx (+ the gradient of the returned sum); the next row's inputs start to load --
    const T* ds = a.ds ? a.ds + row * a.ds_stride : nullptr;
    T* dx = a.dx + row * n;
    for_each_block<1>(n, [&](int64_t j, auto k, auto) LIGHTLLM_LAMBDA_INLINE {
      __builtin_prefetch(x + a.x_stride + j);  // past the last row: a prefetch never faults
      __builtin_prefetch(dy + a.dy_stride + j);
      if (ds) __builtin_prefetch(ds + a.ds_stride + j);
      const auto [xhat, _, g] = tile(j, k);
      Vec out = (g - (xhat * c1 + c2)) * rstd;
      if (ds) out += load_n(ds + j, k);
      store_n(dx + j, out, k);
    });
  }
}

// out[j] = sum over c of partial[c * n + j], c in order, for j in [begin, end): the same bits for
// any split of the columns.
inline void sum_partials(float* out, const float* partial, int64_t chunks, int64_t n,
                         int64_t begin, int64_t end) {
  for_each_block<1>(end - begin, [&](int64_t j, auto k, auto) LIGHTLLM_LAMBDA_INLINE {
    const float* p = partial + begin + j;
    Vec acc = load_n(p, k);
    for (int64_t c = 1; c < chunks; ++c) acc += load_n(p + c * n, k);
    store_n(out + begin + j, acc, k);
  });
}

#undef LIGHTLLM_LAMBDA_INLINE
