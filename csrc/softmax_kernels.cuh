// CUDA softmax kernels (forward and backward) and the choice between them.
//
// Each row of n elements is handled by one of three kernels, chosen by n:
//   n <= 1024            a warp per row, the row in registers (32 floats per thread);
//   n fits shared memory a block per row, the row kept in shared memory: fp32 z = scale * x +
//                        mask; for 16-bit rows too long for that, the raw x and mask values (2
//                        bytes per element unmasked, 3 with a bool mask, 4 additive), z recomputed
//                        from them on each pass, so that rows up to twice as long are still read
//                        once (backward: y and dy kept raw);
//   longer rows          the row split into pieces of kSplitChunkBytes: one kernel computes each
//                        piece's online (max, sum of exp) (backward: its sum(dy * y)), a second one
//                        combines the pieces of its row and writes its piece. No length cap.
// Traffic: the first two read x (and the mask) once and write y once (backward: read y and dy,
// write dx), the ideal; the split path reads its inputs twice. A causal row reads only up to its
// diagonal, in whole vectors, and writes 0s past it.
// Loads and stores are 16-byte vectors when the row's address and length allow it (per row, at
// run time), element-wise otherwise. All arithmetic is fp32; offsets are 64-bit.
//
// Semantics (the CPU kernel in softmax.cpp computes the same): z = scale * x, the bool mask
// (False -> -inf) or the additive mask (+ mask), the causal mask (key j > query row % nq ->
// -inf); y = exp(z - max) / sum. A row whose z are all -inf has max -inf: softmax gives NaN there
// (as torch.softmax), scaled_masked_softmax shifts by 0 instead so that every exp is 0 and
// 1 / sum is taken as 0. NaN anywhere in a row makes the sum, hence the whole row, NaN; +inf makes
// exp(inf - inf) NaN, as in PyTorch. fmaxf skips NaNs in the max: harmless, for that reason.
//
// This header holds device code and the host-side plan only; softmax_cuda.cu binds it to tensors.
// It avoids CUDA-only types in the kernels' logic (no float4, half2...) so that a host emulation
// of the CUDA built-ins can compile it to check the logic without a GPU.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "softmax.h"

#if !defined(LIGHTLLM_EMULATE_CUDA)
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

// Every kernel's dynamic shared memory, as floats (one declaration, 16-byte aligned).
#define LL_DYNAMIC_SMEM(name)                                  \
  extern __shared__ float4 lightllm_dynamic_smem[];            \
  float* name = reinterpret_cast<float*>(lightllm_dynamic_smem)

#define LL_LAUNCH(kernel, blocks, threads, smem, stream, ...)               \
  do {                                                                      \
    kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                         \
  } while (0)

// Shared memory beyond the default 48 KiB must be asked for, per kernel.
#define LL_ALLOW_SMEM(kernel, bytes)                                                   \
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                      static_cast<int>(bytes)))
#endif

namespace lightllm {
namespace cuda {

constexpr int kWarp = 32;
constexpr int64_t kWarpRowMax = 1024;      // longest row of the warp kernel (32 floats/thread)
constexpr int kWarpRowsPerBlock = 4;
constexpr int kBlockThreadsMax = 1024;
constexpr int kSplitThreads = 512;
constexpr int64_t kSplitChunkBytes = 64 * 1024;  // input bytes per block on the split path
constexpr int64_t kMaxBlocks = INT_MAX;          // grid-stride loops cover anything beyond
constexpr size_t kDefaultSmem = 48 * 1024;       // dynamic shared memory allowed without opt-in

// Elements per 16-byte vector.
template <typename T>
constexpr int vec_of() {
  return static_cast<int>(16 / sizeof(T));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Online softmax statistics of a set of values: their max and the sum of exp(value - max).
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// exp(m_old - m_new) as the factor rescaling a sum taken against m_old; 1 when they are equal
// (which covers -inf == -inf, where the difference would be NaN).
__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_old == m_new ? 1.0f : __expf(m_old - m_new);
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  return {m, a.s * rescale(a.m, m) + b.s * rescale(b.m, m)};
}

__device__ __forceinline__ MaxSum warp_combine(MaxSum v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const MaxSum other = {__shfl_xor_sync(0xffffffffu, v.m, o),
                          __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = combine(v, other);
  }
  return v;
}

// Block-wide reductions; every thread gets the result. `red` is 32 slots of shared memory. The
// leading barrier keeps a previous reduction's readers from seeing this one's writes.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* red) {
  v = kMax ? warp_max(v) : warp_sum(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / kWarp) ? red[lane] : (kMax ? -INFINITY : 0.0f);
  return kMax ? warp_max(v) : warp_sum(v);
}

__device__ __forceinline__ MaxSum block_combine(MaxSum v, MaxSum* red) {
  v = warp_combine(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / kWarp) ? red[lane] : MaxSum{-INFINITY, 0.0f};
  return warp_combine(v);
}

// Add a vector of values to running statistics. exp(-inf - m) is taken as 0 even when m is -inf.
template <int VEC>
__device__ __forceinline__ MaxSum accumulate(MaxSum acc, const float (&z)[VEC]) {
  float vm = z[0];
#pragma unroll
  for (int k = 1; k < VEC; ++k) vm = fmaxf(vm, z[k]);
  const float m = fmaxf(acc.m, vm);
  float s = acc.s * rescale(acc.m, m);
#pragma unroll
  for (int k = 0; k < VEC; ++k) s += z[k] == -INFINITY ? 0.0f : __expf(z[k] - m);
  return {m, s};
}

// ---------------------------------------------------------------------------------------------
// Loads and stores of one vector's worth of a row, at element j (a multiple of VEC, j < n)
// ---------------------------------------------------------------------------------------------

// v = p[j .. j + VEC) as fp32; elements at or past n read as `pad`. `vec`: one 16-byte load
// (it implies n % VEC == 0, so the whole vector is in the row).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, bool vec, int64_t j, int64_t n, float pad,
                                         float (&v)[VEC]) {
  if (vec) {
    const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p + j);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = static_cast<float>(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = j + k < n ? static_cast<float>(p[j + k]) : pad;
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, bool vec, int64_t j, int64_t n,
                                          const float (&v)[VEC]) {
  if (vec) {
    Pack<T, VEC> pk;
#pragma unroll
    for (int k = 0; k < VEC; ++k) pk.v[k] = static_cast<T>(v[k]);
    *reinterpret_cast<Pack<T, VEC>*>(p + j) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (j + k < n) p[j + k] = static_cast<T>(v[k]);
    }
  }
}

// Raw elements (no conversion), padded with zeros past n.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_raw(const T* p, bool vec, int64_t j, int64_t n) {
  if (vec) return *reinterpret_cast<const Pack<T, VEC>*>(p + j);
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = j + k < n ? p[j + k] : static_cast<T>(0.0f);
  return pk;
}

// fp32 vectors in shared memory, in 16-byte pieces (j is a multiple of VEC, hence of 4).
template <int VEC>
__device__ __forceinline__ void smem_store(float* s, int64_t j, const float (&v)[VEC]) {
#pragma unroll
  for (int q = 0; q < VEC / 4; ++q) {
    Pack<float, 4> pk;
#pragma unroll
    for (int k = 0; k < 4; ++k) pk.v[k] = v[4 * q + k];
    *reinterpret_cast<Pack<float, 4>*>(s + j + 4 * q) = pk;
  }
}

template <int VEC>
__device__ __forceinline__ void smem_load(const float* s, int64_t j, float (&v)[VEC]) {
#pragma unroll
  for (int q = 0; q < VEC / 4; ++q) {
    const Pack<float, 4> pk = *reinterpret_cast<const Pack<float, 4>*>(s + j + 4 * q);
#pragma unroll
    for (int k = 0; k < 4; ++k) v[4 * q + k] = pk.v[k];
  }
}

// ---------------------------------------------------------------------------------------------
// The forward's input: z = scale * x, masked
// ---------------------------------------------------------------------------------------------

template <typename T>
struct FwdRow {
  const T* x;
  const void* mask;  // this row's mask values (uint8_t for bool, T for additive)
  int64_t q;         // query index, for the causal mask
  int64_t live;      // elements before it may be kept: n, or up to the diagonal (causal)
  bool x_vec;
  bool mask_vec;
};

template <typename T>
__device__ __forceinline__ FwdRow<T> fwd_row(const SoftmaxFwdArgs& a, int64_t row) {
  constexpr int VEC = vec_of<T>();
  FwdRow<T> r;
  r.x = static_cast<const T*>(a.x) + row * a.x_row_stride;
  r.x_vec = a.n % VEC == 0 && aligned16(r.x);
  r.q = a.causal ? row % a.nq : 0;
  r.live = a.causal ? std::min(a.n, r.q + 1) : a.n;
  r.mask = nullptr;
  r.mask_vec = false;
  if (a.mask_kind != kNoMask) {
    const int64_t offset = mask_row_offset(a, row);
    const size_t bytes = a.mask_kind == kBoolMask ? 1 : sizeof(T);
    r.mask = static_cast<const char*>(a.mask) + offset * static_cast<int64_t>(bytes);
    r.mask_vec = a.mask_col_stride == 1 && a.n % VEC == 0 &&
                 (reinterpret_cast<uintptr_t>(r.mask) % (VEC * bytes)) == 0;
  }
  return r;
}

// The raw inputs z is computed from at j .. j + VEC (j < n): x, and the mask's values (the bool
// mask's keep flags or the additive mask, broadcast when it has one value per row). Elements past
// n read as 0 (x, add) or 1 (keep); z_of makes them -inf.
template <typename T, int VEC>
struct FwdInputs {
  Pack<T, VEC> x;
  Pack<uint8_t, VEC> keep;
  Pack<T, VEC> add;
};

template <typename T, int VEC>
__device__ __forceinline__ FwdInputs<T, VEC> load_inputs(const SoftmaxFwdArgs& a,
                                                         const FwdRow<T>& r, int64_t j) {
  const int64_t n = a.n;
  FwdInputs<T, VEC> in;
  in.x = load_raw<T, VEC>(r.x, r.x_vec, j, n);
  if (a.mask_kind == kBoolMask) {
    const uint8_t* m = static_cast<const uint8_t*>(r.mask);
    if (r.mask_vec) {
      in.keep = *reinterpret_cast<const Pack<uint8_t, VEC>*>(m + j);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) in.keep.v[k] = j + k < n ? m[(j + k) * a.mask_col_stride] : 1;
    }
  } else if (a.mask_kind == kAdditiveMask) {
    const T* m = static_cast<const T*>(r.mask);
    if (a.mask_col_stride == 0) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) in.add.v[k] = m[0];
    } else {
      in.add = load_raw<T, VEC>(m, r.mask_vec, j, n);
    }
  }
  return in;
}

// z = the masked, scaled inputs at j .. j + VEC; -inf past the end of the row. A function of the
// raw inputs only, so that recomputing it from a copy of them gives the same z bit for bit.
template <typename T, int VEC>
__device__ __forceinline__ void z_of(const SoftmaxFwdArgs& a, const FwdRow<T>& r, int64_t j,
                                     const FwdInputs<T, VEC>& in, float (&z)[VEC]) {
  // Elements k < last of the vector are kept (in the row, and on or before the diagonal):
  // one 64-bit comparison per vector, 32-bit ones per element.
  const int last = static_cast<int>(std::clamp<int64_t>(r.live - j, 0, VEC));
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    float v = static_cast<float>(in.x.v[k]) * a.scale;
    if (a.mask_kind == kBoolMask) v = in.keep.v[k] ? v : -INFINITY;
    if (a.mask_kind == kAdditiveMask) v += static_cast<float>(in.add.v[k]);
    z[k] = k < last ? v : -INFINITY;
  }
}

// z at j .. j + VEC, loaded (the warp and split kernels): the same values as z_of, computed
// straight from the loads (no copy of the raw inputs held in registers); a vector wholly past the
// diagonal (or the row) is -inf without being read.
template <typename T, int VEC>
__device__ __forceinline__ void load_z(const SoftmaxFwdArgs& a, const FwdRow<T>& r, int64_t j,
                                       float (&z)[VEC]) {
  if (j >= r.live) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = -INFINITY;
    return;
  }
  const int64_t n = a.n;
  load_vec<T, VEC>(r.x, r.x_vec, j, n, 0.0f, z);
#pragma unroll
  for (int k = 0; k < VEC; ++k) z[k] *= a.scale;
  if (a.mask_kind == kBoolMask) {
    const uint8_t* m = static_cast<const uint8_t*>(r.mask);
    uint8_t keep[VEC];
    if (r.mask_vec) {
      const Pack<uint8_t, VEC> pk = *reinterpret_cast<const Pack<uint8_t, VEC>*>(m + j);
#pragma unroll
      for (int k = 0; k < VEC; ++k) keep[k] = pk.v[k];
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) keep[k] = j + k < n ? m[(j + k) * a.mask_col_stride] : 1;
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] = keep[k] ? z[k] : -INFINITY;
  } else if (a.mask_kind == kAdditiveMask) {
    const T* m = static_cast<const T*>(r.mask);
    float add[VEC];
    if (a.mask_col_stride == 0) {
      const float m0 = static_cast<float>(m[0]);
#pragma unroll
      for (int k = 0; k < VEC; ++k) add[k] = m0;
    } else {
      load_vec<T, VEC>(m, r.mask_vec, j, n, 0.0f, add);
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) z[k] += add[k];
  }
  // Past the row's end and the diagonal: -inf (after the scale, which may be negative or 0).
  const int last = static_cast<int>(std::clamp<int64_t>(r.live - j, 0, VEC));
#pragma unroll
  for (int k = 0; k < VEC; ++k) z[k] = k < last ? z[k] : -INFINITY;
}

// y = exp(z - shift) * inv: the shift is the max, or 0 for a fully masked row of
// scaled_masked_softmax (so that every exp is 0); inv is 0 when the sum is (that row again).
__device__ __forceinline__ float shift_of(const SoftmaxFwdArgs& a, float m) {
  return (a.zero_masked_rows && m == -INFINITY) ? 0.0f : m;
}

__device__ __forceinline__ float inv_of(float s) { return s == 0.0f ? 0.0f : 1.0f / s; }

// The end of the piece starting at `begin` (the split path cuts rows into pieces of `chunk`).
__device__ __forceinline__ int64_t piece_end(int64_t begin, int64_t chunk, int64_t n) {
  return begin + chunk < n ? begin + chunk : n;
}

// ---------------------------------------------------------------------------------------------
// Forward kernels
// ---------------------------------------------------------------------------------------------

// A warp per row; the row lives in registers: CHUNKS vectors of VEC per lane.
template <typename T>
__global__ void __launch_bounds__(kWarp* kWarpRowsPerBlock)
    softmax_fwd_warp_kernel(const SoftmaxFwdArgs a) {
  constexpr int VEC = vec_of<T>();
  constexpr int CHUNKS = static_cast<int>(kWarpRowMax / (kWarp * VEC));
  const int lane = threadIdx.x % kWarp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpRowsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarp;
       row < a.rows; row += step) {
    const FwdRow<T> r = fwd_row<T>(a, row);
    // Phase 1: load z, the lane's max, the row's max.
    float z[CHUNKS][VEC];
    float m = -INFINITY;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      load_z<T, VEC>(a, r, static_cast<int64_t>(c * kWarp + lane) * VEC, z[c]);  // -inf past n
#pragma unroll
      for (int k = 0; k < VEC; ++k) m = fmaxf(m, z[c][k]);
    }
    m = warp_max(m);
    // Phase 2: exponentials and their sum.
    const float shift = shift_of(a, m);
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        z[c][k] = __expf(z[c][k] - shift);
        s += z[c][k];
      }
    }
    const float inv = inv_of(warp_sum(s));
    // Phase 3: normalise and store.
    T* y = static_cast<T*>(a.y) + row * a.n;
    const bool y_vec = a.n % VEC == 0 && aligned16(y);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t j = static_cast<int64_t>(c * kWarp + lane) * VEC;
      if (j < a.n) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) z[c][k] *= inv;
        store_vec<T, VEC>(y, y_vec, j, a.n, z[c]);
      }
    }
  }
}

// What the forward's block kernel keeps of a row in shared memory (RAW, a template flag): fp32 z
// (4 bytes per element; the exponentials overwrite it for the last pass), or, for 16-bit rows
// too long for that, the raw inputs z is computed from (x and the mask's values: 2 to 4 bytes per
// element). Raw inputs are exact, so z and its exponentials are recomputed from them on each pass
// with the same result as from a copy of z, at the price of a second exponential per element and
// more registers (sm_90 at 1024 threads: 64 with a few spills, against 50): rows that fit as fp32
// z keep that kernel, raw copies only take rows that would otherwise read their inputs twice on
// the split path.
template <typename T>
constexpr int64_t fwd_smem_per_elem(bool raw, int mask_kind) {
  if (!raw) return sizeof(float);
  return sizeof(T) + (mask_kind == kBoolMask ? 1 : mask_kind == kAdditiveMask ? sizeof(T) : 0);
}

// The block kernel's copy of a row: `vectors` vectors of fp32 z, or of raw x followed by as many
// of the mask's values.
template <typename T, int VEC>
struct RowCopy {
  float* zs;
  Pack<T, VEC>* xs;
  Pack<uint8_t, VEC>* keeps;
  Pack<T, VEC>* adds;
};

template <typename T, int VEC>
__device__ __forceinline__ RowCopy<T, VEC> row_copy(float* smem, int64_t vectors) {
  RowCopy<T, VEC> c;
  c.zs = smem;
  c.xs = reinterpret_cast<Pack<T, VEC>*>(smem);
  c.keeps = reinterpret_cast<Pack<uint8_t, VEC>*>(c.xs + vectors);
  c.adds = c.xs + vectors;
  return c;
}

// Keep the raw inputs of the vector at j.
template <typename T, int VEC>
__device__ __forceinline__ void keep_raw(const SoftmaxFwdArgs& a, const RowCopy<T, VEC>& c,
                                         int64_t j, const FwdInputs<T, VEC>& in) {
  c.xs[j / VEC] = in.x;
  if (a.mask_kind == kBoolMask) c.keeps[j / VEC] = in.keep;
  if (a.mask_kind == kAdditiveMask) c.adds[j / VEC] = in.add;
}

// The kept vector at j as z.
template <typename T, int VEC, bool RAW>
__device__ __forceinline__ void kept_z(const SoftmaxFwdArgs& a, const FwdRow<T>& r,
                                       const RowCopy<T, VEC>& c, int64_t j, float (&z)[VEC]) {
  if constexpr (RAW) {
    FwdInputs<T, VEC> in;
    in.x = c.xs[j / VEC];
    if (a.mask_kind == kBoolMask) in.keep = c.keeps[j / VEC];
    if (a.mask_kind == kAdditiveMask) in.add = c.adds[j / VEC];
    z_of<T, VEC>(a, r, j, in, z);
  } else {
    smem_load<VEC>(c.zs, j, z);
  }
}

// A block per row; the row lives in shared memory (fwd_smem_per_elem bytes per element of
// round_up(n, VEC)). Each thread touches only its own vectors of it, so only the reductions need
// barriers. With fp32 z kept, phase 2 overwrites it with its exponentials for phase 3; with raw
// inputs kept, phase 3 recomputes them.
template <typename T, bool RAW>
__global__ void __launch_bounds__(kBlockThreadsMax)
    softmax_fwd_block_kernel(const SoftmaxFwdArgs a) {
  constexpr int VEC = vec_of<T>();
  LL_DYNAMIC_SMEM(smem);
  __shared__ float red[kWarp];
  const RowCopy<T, VEC> copy = row_copy<T, VEC>(smem, (a.n + VEC - 1) / VEC);
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const FwdRow<T> r = fwd_row<T>(a, row);
    // Phase 1: the row up to r.live to shared memory, the max.
    float m = -INFINITY;
#pragma unroll 4
    for (int64_t j = first; j < r.live; j += stride) {
      float z[VEC];
      if constexpr (RAW) {
        const FwdInputs<T, VEC> in = load_inputs<T, VEC>(a, r, j);
        z_of<T, VEC>(a, r, j, in, z);
        keep_raw<T, VEC>(a, copy, j, in);
      } else {
        load_z<T, VEC>(a, r, j, z);
        smem_store<VEC>(copy.zs, j, z);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) m = fmaxf(m, z[k]);
    }
    m = block_reduce<true>(m, red);
    // Phase 2: exponentials and their sum.
    const float shift = shift_of(a, m);
    float s = 0.0f;
#pragma unroll 4
    for (int64_t j = first; j < r.live; j += stride) {
      float z[VEC];
      kept_z<T, VEC, RAW>(a, r, copy, j, z);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        z[k] = __expf(z[k] - shift);
        s += z[k];
      }
      if constexpr (!RAW) smem_store<VEC>(copy.zs, j, z);
    }
    const float inv = inv_of(block_reduce<false>(s, red));
    // Phase 3: normalise and store.
    T* y = static_cast<T*>(a.y) + row * a.n;
    const bool y_vec = a.n % VEC == 0 && aligned16(y);
#pragma unroll 4
    for (int64_t j = first; j < a.n; j += stride) {
      float e[VEC] = {};  // 0 past the diagonal
      if (j < r.live) {
        if constexpr (RAW) {
          kept_z<T, VEC, RAW>(a, r, copy, j, e);
#pragma unroll
          for (int k = 0; k < VEC; ++k) e[k] = __expf(e[k] - shift);
        } else {
          smem_load<VEC>(copy.zs, j, e);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) e[k] *= inv;
      }
      store_vec<T, VEC>(y, y_vec, j, a.n, e);
    }
  }
}

// Split path, pass 1: the (max, sum of exp) of each piece of `chunk` elements.
template <typename T>
__global__ void __launch_bounds__(kSplitThreads)
    softmax_fwd_split_stats_kernel(const SoftmaxFwdArgs a, int64_t chunk, int64_t chunks,
                                   MaxSum* stats) {
  constexpr int VEC = vec_of<T>();
  __shared__ MaxSum red[kWarp];
  for (int64_t b = blockIdx.x; b < a.rows * chunks; b += gridDim.x) {
    const int64_t row = b / chunks;
    const int64_t begin = (b % chunks) * chunk, end = piece_end(begin, chunk, a.n);
    const FwdRow<T> r = fwd_row<T>(a, row);
    MaxSum acc = {-INFINITY, 0.0f};
#pragma unroll 4
    for (int64_t j = begin + static_cast<int64_t>(threadIdx.x) * VEC; j < end;
         j += static_cast<int64_t>(blockDim.x) * VEC) {
      float z[VEC];
      load_z<T, VEC>(a, r, j, z);
      acc = accumulate<VEC>(acc, z);
    }
    acc = block_combine(acc, red);
    if (threadIdx.x == 0) stats[b] = acc;
  }
}

// Split path, pass 2: combine the row's pieces, then write this piece.
template <typename T>
__global__ void __launch_bounds__(kSplitThreads)
    softmax_fwd_split_apply_kernel(const SoftmaxFwdArgs a, int64_t chunk, int64_t chunks,
                                   const MaxSum* stats) {
  constexpr int VEC = vec_of<T>();
  __shared__ MaxSum red[kWarp];
  for (int64_t b = blockIdx.x; b < a.rows * chunks; b += gridDim.x) {
    const int64_t row = b / chunks;
    const int64_t begin = (b % chunks) * chunk, end = piece_end(begin, chunk, a.n);
    MaxSum acc = {-INFINITY, 0.0f};
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      acc = combine(acc, stats[row * chunks + c]);
    }
    acc = block_combine(acc, red);
    const float shift = shift_of(a, acc.m), inv = inv_of(acc.s);
    const FwdRow<T> r = fwd_row<T>(a, row);
    T* y = static_cast<T*>(a.y) + row * a.n;
    const bool y_vec = a.n % VEC == 0 && aligned16(y);
#pragma unroll 4
    for (int64_t j = begin + static_cast<int64_t>(threadIdx.x) * VEC; j < end;
         j += static_cast<int64_t>(blockDim.x) * VEC) {
      float z[VEC];
      load_z<T, VEC>(a, r, j, z);
#pragma unroll
      for (int k = 0; k < VEC; ++k) z[k] = __expf(z[k] - shift) * inv;
      store_vec<T, VEC>(y, y_vec, j, a.n, z);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward kernels: dx = scale * y * (dy - sum(dy * y))
// ---------------------------------------------------------------------------------------------

template <typename T>
struct BwdRow {
  const T* dy;
  const T* y;
  T* dx;
  bool dy_vec, y_vec, dx_vec;
};

template <typename T>
__device__ __forceinline__ BwdRow<T> bwd_row(const SoftmaxBwdArgs& a, int64_t row) {
  constexpr int VEC = vec_of<T>();
  BwdRow<T> r;
  r.dy = static_cast<const T*>(a.dy) + row * a.dy_row_stride;
  r.y = static_cast<const T*>(a.y) + row * a.y_row_stride;
  r.dx = static_cast<T*>(a.dx) + row * a.n;
  const bool whole = a.n % VEC == 0;
  r.dy_vec = whole && aligned16(r.dy);
  r.y_vec = whole && aligned16(r.y);
  r.dx_vec = whole && aligned16(r.dx);
  return r;
}

template <int VEC>
__device__ __forceinline__ void bwd_values(float scale, float dot, const float (&y)[VEC],
                                           const float (&dy)[VEC], float (&dx)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) dx[k] = scale * (y[k] * (dy[k] - dot));
}

template <typename T>
__global__ void __launch_bounds__(kWarp* kWarpRowsPerBlock)
    softmax_bwd_warp_kernel(const SoftmaxBwdArgs a) {
  constexpr int VEC = vec_of<T>();
  constexpr int CHUNKS = static_cast<int>(kWarpRowMax / (kWarp * VEC));
  const int lane = threadIdx.x % kWarp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kWarpRowsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarp;
       row < a.rows; row += step) {
    const BwdRow<T> r = bwd_row<T>(a, row);
    // Phase 1: y and dy to registers, sum(dy * y).
    float y[CHUNKS][VEC], dy[CHUNKS][VEC];
    float dot = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t j = static_cast<int64_t>(c * kWarp + lane) * VEC;
      if (j < a.n) {
        load_vec<T, VEC>(r.y, r.y_vec, j, a.n, 0.0f, y[c]);
        load_vec<T, VEC>(r.dy, r.dy_vec, j, a.n, 0.0f, dy[c]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) dot += y[c][k] * dy[c][k];
      }
    }
    dot = warp_sum(dot);
    // Phase 2: dx.
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int64_t j = static_cast<int64_t>(c * kWarp + lane) * VEC;
      if (j < a.n) {
        float dx[VEC];
        bwd_values<VEC>(a.scale, dot, y[c], dy[c], dx);
        store_vec<T, VEC>(r.dx, r.dx_vec, j, a.n, dx);
      }
    }
  }
}

// A block per row; y and dy kept raw in shared memory (2 * round_up(n, VEC) elements).
template <typename T>
__global__ void __launch_bounds__(kBlockThreadsMax)
    softmax_bwd_block_kernel(const SoftmaxBwdArgs a) {
  constexpr int VEC = vec_of<T>();
  LL_DYNAMIC_SMEM(smem);
  __shared__ float red[kWarp];
  const int64_t n_padded = (a.n + VEC - 1) / VEC * VEC;
  Pack<T, VEC>* ys = reinterpret_cast<Pack<T, VEC>*>(smem);
  Pack<T, VEC>* dys = ys + n_padded / VEC;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * VEC;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * VEC;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const BwdRow<T> r = bwd_row<T>(a, row);
    // Phase 1: y and dy to shared memory, sum(dy * y).
    float dot = 0.0f;
#pragma unroll 4
    for (int64_t j = first; j < a.n; j += stride) {
      const Pack<T, VEC> yp = load_raw<T, VEC>(r.y, r.y_vec, j, a.n);
      const Pack<T, VEC> dyp = load_raw<T, VEC>(r.dy, r.dy_vec, j, a.n);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        dot += static_cast<float>(yp.v[k]) * static_cast<float>(dyp.v[k]);
      }
      ys[j / VEC] = yp;
      dys[j / VEC] = dyp;
    }
    dot = block_reduce<false>(dot, red);
    // Phase 2: dx.
#pragma unroll 4
    for (int64_t j = first; j < a.n; j += stride) {
      const Pack<T, VEC> yp = ys[j / VEC], dyp = dys[j / VEC];
      float y[VEC], dy[VEC], dx[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        y[k] = static_cast<float>(yp.v[k]);
        dy[k] = static_cast<float>(dyp.v[k]);
      }
      bwd_values<VEC>(a.scale, dot, y, dy, dx);
      store_vec<T, VEC>(r.dx, r.dx_vec, j, a.n, dx);
    }
  }
}

// Split path, pass 1: sum(dy * y) of each piece.
template <typename T>
__global__ void __launch_bounds__(kSplitThreads)
    softmax_bwd_split_dot_kernel(const SoftmaxBwdArgs a, int64_t chunk, int64_t chunks,
                                 float* dots) {
  constexpr int VEC = vec_of<T>();
  __shared__ float red[kWarp];
  for (int64_t b = blockIdx.x; b < a.rows * chunks; b += gridDim.x) {
    const int64_t row = b / chunks;
    const int64_t begin = (b % chunks) * chunk, end = piece_end(begin, chunk, a.n);
    const BwdRow<T> r = bwd_row<T>(a, row);
    float dot = 0.0f;
#pragma unroll 4
    for (int64_t j = begin + static_cast<int64_t>(threadIdx.x) * VEC; j < end;
         j += static_cast<int64_t>(blockDim.x) * VEC) {
      float y[VEC], dy[VEC];
      load_vec<T, VEC>(r.y, r.y_vec, j, a.n, 0.0f, y);
      load_vec<T, VEC>(r.dy, r.dy_vec, j, a.n, 0.0f, dy);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dot += y[k] * dy[k];
    }
    dot = block_reduce<false>(dot, red);
    if (threadIdx.x == 0) dots[b] = dot;
  }
}

// Split path, pass 2: the row's sum from its pieces, then dx of this piece.
template <typename T>
__global__ void __launch_bounds__(kSplitThreads)
    softmax_bwd_split_apply_kernel(const SoftmaxBwdArgs a, int64_t chunk, int64_t chunks,
                                   const float* dots) {
  constexpr int VEC = vec_of<T>();
  __shared__ float red[kWarp];
  for (int64_t b = blockIdx.x; b < a.rows * chunks; b += gridDim.x) {
    const int64_t row = b / chunks;
    const int64_t begin = (b % chunks) * chunk, end = piece_end(begin, chunk, a.n);
    float dot = 0.0f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) dot += dots[row * chunks + c];
    dot = block_reduce<false>(dot, red);
    const BwdRow<T> r = bwd_row<T>(a, row);
#pragma unroll 4
    for (int64_t j = begin + static_cast<int64_t>(threadIdx.x) * VEC; j < end;
         j += static_cast<int64_t>(blockDim.x) * VEC) {
      float y[VEC], dy[VEC], dx[VEC];
      load_vec<T, VEC>(r.y, r.y_vec, j, a.n, 0.0f, y);
      load_vec<T, VEC>(r.dy, r.dy_vec, j, a.n, 0.0f, dy);
      bwd_values<VEC>(a.scale, dot, y, dy, dx);
      store_vec<T, VEC>(r.dx, r.dx_vec, j, a.n, dx);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: which kernel, how launched
// ---------------------------------------------------------------------------------------------

enum class Path { kWarp, kBlock, kSplit };

struct Plan {
  Path path;
  bool raw;             // forward block path: the row's raw 16-bit inputs kept, not fp32 z
  int64_t blocks;
  int threads;
  size_t smem;          // dynamic shared memory bytes (block path)
  int64_t chunk;        // split path: elements per piece (a multiple of the vector width)
  int64_t chunks;       // split path: pieces per row
  int64_t workspace;    // split path: floats of workspace
};

// `smem_bytes` is the dynamic shared memory a block may use; `per_elem` the bytes the block
// kernel keeps per element (fwd: fwd_smem_per_elem, bwd: 2 * sizeof(T), raw y and dy);
// `ws_per_piece` the floats of workspace the split path needs per piece.
template <typename T>
Plan make_plan(int64_t rows, int64_t n, int64_t smem_bytes, int64_t per_elem,
               int64_t ws_per_piece) {
  constexpr int VEC = vec_of<T>();
  Plan p{};
  const int64_t vectors = (n + VEC - 1) / VEC;
  if (n <= kWarpRowMax) {
    p.path = Path::kWarp;
    p.threads = kWarp * kWarpRowsPerBlock;
    p.blocks = std::min((rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock, kMaxBlocks);
  } else if (vectors * VEC * per_elem <= smem_bytes) {
    p.path = Path::kBlock;
    // About four vectors per thread, whole warps, between 128 and 1024 threads.
    const int64_t threads = ((vectors + 3) / 4 + kWarp - 1) / kWarp * kWarp;
    p.threads = static_cast<int>(std::clamp<int64_t>(threads, 128, kBlockThreadsMax));
    p.smem = static_cast<size_t>(vectors * VEC * per_elem);
    p.blocks = std::min(rows, kMaxBlocks);
  } else {
    p.path = Path::kSplit;
    p.threads = kSplitThreads;
    p.chunk = kSplitChunkBytes / static_cast<int64_t>(sizeof(T));  // a multiple of VEC
    p.chunks = (n + p.chunk - 1) / p.chunk;
    p.blocks = std::min(rows * p.chunks, kMaxBlocks);
    p.workspace = rows * p.chunks * ws_per_piece;
  }
  return p;
}

// The block kernel keeping fp32 z where the row fits as that, else (16-bit inputs) its raw
// inputs where those fit, else the split path.
template <typename T>
Plan plan_fwd(const SoftmaxFwdArgs& a, int64_t smem_bytes) {
  constexpr int64_t ws = sizeof(MaxSum) / sizeof(float);
  Plan p = make_plan<T>(a.rows, a.n, smem_bytes, fwd_smem_per_elem<T>(false, a.mask_kind), ws);
  if (p.path == Path::kSplit && sizeof(T) < sizeof(float)) {
    const Plan raw =
        make_plan<T>(a.rows, a.n, smem_bytes, fwd_smem_per_elem<T>(true, a.mask_kind), ws);
    if (raw.path == Path::kBlock) {
      p = raw;
      p.raw = true;
    }
  }
  return p;
}

template <typename T>
Plan plan_bwd(const SoftmaxBwdArgs& a, int64_t smem_bytes) {
  return make_plan<T>(a.rows, a.n, smem_bytes, 2 * sizeof(T), 1);
}

// `workspace`: plan.workspace floats of device memory (split path only).
template <typename T>
void launch_fwd(const SoftmaxFwdArgs& a, const Plan& p, float* workspace, cudaStream_t stream) {
  switch (p.path) {
    case Path::kWarp:
      LL_LAUNCH(softmax_fwd_warp_kernel<T>, p.blocks, p.threads, 0, stream, a);
      break;
    case Path::kBlock: {
      auto* kernel = &softmax_fwd_block_kernel<T, false>;
      if constexpr (sizeof(T) < sizeof(float)) {
        if (p.raw) kernel = &softmax_fwd_block_kernel<T, true>;
      }
      if (p.smem > kDefaultSmem) LL_ALLOW_SMEM(kernel, p.smem);
      LL_LAUNCH(kernel, p.blocks, p.threads, p.smem, stream, a);
      break;
    }
    case Path::kSplit: {
      MaxSum* stats = reinterpret_cast<MaxSum*>(workspace);
      LL_LAUNCH(softmax_fwd_split_stats_kernel<T>, p.blocks, p.threads, 0, stream, a, p.chunk,
                p.chunks, stats);
      LL_LAUNCH(softmax_fwd_split_apply_kernel<T>, p.blocks, p.threads, 0, stream, a, p.chunk,
                p.chunks, stats);
      break;
    }
  }
}

template <typename T>
void launch_bwd(const SoftmaxBwdArgs& a, const Plan& p, float* workspace, cudaStream_t stream) {
  switch (p.path) {
    case Path::kWarp:
      LL_LAUNCH(softmax_bwd_warp_kernel<T>, p.blocks, p.threads, 0, stream, a);
      break;
    case Path::kBlock:
      if (p.smem > kDefaultSmem) LL_ALLOW_SMEM(softmax_bwd_block_kernel<T>, p.smem);
      LL_LAUNCH(softmax_bwd_block_kernel<T>, p.blocks, p.threads, p.smem, stream, a);
      break;
    case Path::kSplit:
      LL_LAUNCH(softmax_bwd_split_dot_kernel<T>, p.blocks, p.threads, 0, stream, a, p.chunk,
                p.chunks, workspace);
      LL_LAUNCH(softmax_bwd_split_apply_kernel<T>, p.blocks, p.threads, 0, stream, a, p.chunk,
                p.chunks, workspace);
      break;
  }
}

}  // namespace cuda
}  // namespace lightllm
