// SIMD helpers for the CPU kernels: one register of floats as a GCC/Clang vector, loads and stores
// that convert float16 / bfloat16 to and from fp32 lane-wise, and row loops of whole vectors plus
// one partial vector.
//
// Included once per instruction set, each time inside a `#pragma GCC target` region and a
// namespace of its own, with LIGHTLLM_VEC_ISA set to 512 (AVX-512 F/BW/DQ/VL), 2 (AVX2 + FMA +
// F16C) or 0 (the x86-64 baseline); the kernel picks one at run time (see norm.cpp). So the
// extension needs no -m flags, loads on any x86-64 CPU and still runs AVX-512 where it exists. No
// include guard on purpose, and no #include: the includer includes <immintrin.h>, <cstdint>,
// <cstring>, <type_traits>, <utility> and c10's Half and BFloat16 first.
//
// One Vec is one register: 16, 8 or 4 floats (GCC splits a wider type badly, through the stack).
// No -ffast-math: NaN and inf keep their meaning. float16 uses the hardware conversions (F16C,
// AVX-512) where present and c10's bit-exact algorithm otherwise; bfloat16 is c10's round to
// nearest even with NaN kept, on integer lanes. Every helper is always inlined, so no Vec crosses a
// call between targets (the psABI note is moot).

#ifndef LIGHTLLM_VEC_INLINE
#define LIGHTLLM_VEC_INLINE __attribute__((always_inline)) inline
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

constexpr int kLanes = LIGHTLLM_VEC_ISA == 512 ? 16 : LIGHTLLM_VEC_ISA == 2 ? 8 : 4;
using Vec = float __attribute__((vector_size(4 * kLanes)));
using IVec = int32_t __attribute__((vector_size(4 * kLanes)));
using UVec = uint32_t __attribute__((vector_size(4 * kLanes)));
using HVec = uint16_t __attribute__((vector_size(2 * kLanes)));  // raw float16 / bfloat16 bits

template <typename To, typename From>
LIGHTLLM_VEC_INLINE To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From));
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// NOLINTBEGIN(readability/casting): vector casts reinterpret the bits.
LIGHTLLM_VEC_INLINE UVec select_bits(IVec m, UVec a, UVec b) {
  return ((UVec)m & a) | (~(UVec)m & b);
}

// m ? a : b lane-wise (m is all ones or all zeros per lane).
LIGHTLLM_VEC_INLINE Vec select(IVec m, Vec a, Vec b) {
  return (Vec)select_bits(m, (UVec)a, (UVec)b);
}

LIGHTLLM_VEC_INLINE float lane_sum(Vec v) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// -- fp32 <-> raw 16-bit patterns --------------------------------------------------------------

LIGHTLLM_VEC_INLINE Vec bf16_to_float(HVec h) {
#if LIGHTLLM_VEC_ISA == 512
  // maskz with a full mask: GCC 12's unmasked intrinsics trip -Wmaybe-uninitialized in its header.
  return (Vec)(bits_as<UVec>(_mm512_maskz_cvtepu16_epi32(0xFFFF, bits_as<__m256i>(h))) << 16);
#elif LIGHTLLM_VEC_ISA == 2
  return (Vec)(bits_as<UVec>(_mm256_cvtepu16_epi32(bits_as<__m128i>(h))) << 16);
#else
  return (Vec)(__builtin_convertvector(h, UVec) << 16);
#endif
}

LIGHTLLM_VEC_INLINE HVec float_to_bf16(Vec f) {
  const UVec u = (UVec)f;
  const UVec rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  const UVec bits = select_bits(f != f, UVec{} + 0x7FC0u, rounded);
#if LIGHTLLM_VEC_ISA == 512
  return bits_as<HVec>(_mm512_maskz_cvtepi32_epi16(0xFFFF, bits_as<__m512i>(bits)));
#elif LIGHTLLM_VEC_ISA == 2
  // Pack to 16 bits in each 128-bit half (no value exceeds 0xFFFF), then join the halves' low
  // quadwords.
  const __m256i b = bits_as<__m256i>(bits);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
  return bits_as<HVec>(_mm256_castsi256_si128(packed));
#else
  return __builtin_convertvector(bits, HVec);
#endif
}

LIGHTLLM_VEC_INLINE Vec fp16_to_float(HVec h) {
#if LIGHTLLM_VEC_ISA == 512
  return bits_as<Vec>(_mm512_maskz_cvtph_ps(0xFFFF, bits_as<__m256i>(h)));
#elif LIGHTLLM_VEC_ISA == 2
  return bits_as<Vec>(_mm256_cvtph_ps(bits_as<__m128i>(h)));
#else
  const UVec w = __builtin_convertvector(h, UVec) << 16;
  const UVec sign = w & 0x80000000u;
  const UVec two_w = w + w;
  const Vec normalized = (Vec)((two_w >> 4) + 0x70000000u) * 0x1.0p-112f;
  const Vec denormalized = (Vec)((two_w >> 17) | (126u << 23)) - 0.5f;
  return (Vec)(sign | select_bits((IVec)(two_w < (1u << 27)), (UVec)denormalized,
                                  (UVec)normalized));
#endif
}

LIGHTLLM_VEC_INLINE HVec float_to_fp16(Vec f) {
#if LIGHTLLM_VEC_ISA == 512
  return bits_as<HVec>(_mm512_maskz_cvtps_ph(0xFFFF, bits_as<__m512>(f),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif LIGHTLLM_VEC_ISA == 2
  return bits_as<HVec>(
      _mm256_cvtps_ph(bits_as<__m256>(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  const UVec w = (UVec)f;
  Vec base = ((Vec)(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  const UVec shl1_w = w + w;
  const UVec sign = w & 0x80000000u;
  UVec bias = shl1_w & 0xFF000000u;
  bias = select_bits((IVec)(bias < 0x71000000u), UVec{} + 0x71000000u, bias);
  base = (Vec)((bias >> 1) + 0x07800000u) + base;
  const UVec bits = (UVec)base;
  const UVec nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const UVec h =
      (sign >> 16) | select_bits((IVec)(shl1_w > 0xFF000000u), UVec{} + 0x7E00u, nonsign);
  return __builtin_convertvector(h, HVec);
#endif
}
// NOLINTEND(readability/casting)

// -- kLanes elements of T (float, c10::Half, c10::BFloat16) as fp32 ------------------------------

template <typename T>
LIGHTLLM_VEC_INLINE Vec half_to_float(HVec h) {
  return std::is_same_v<T, c10::BFloat16> ? bf16_to_float(h) : fp16_to_float(h);
}

template <typename T>
LIGHTLLM_VEC_INLINE HVec float_to_half(Vec v) {
  return std::is_same_v<T, c10::BFloat16> ? float_to_bf16(v) : float_to_fp16(v);
}

template <typename T>
LIGHTLLM_VEC_INLINE Vec load(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    Vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  } else {
    HVec h;
    std::memcpy(&h, static_cast<const void*>(p), sizeof(h));
    return half_to_float<T>(h);
  }
}

// Stores v as T and returns what was stored, as fp32 (v rounded to T).
template <typename T>
LIGHTLLM_VEC_INLINE Vec store(T* p, Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(p, &v, sizeof(v));
    return v;
  } else {
    const HVec h = float_to_half<T>(v);
    std::memcpy(static_cast<void*>(p), &h, sizeof(h));
    return half_to_float<T>(h);
  }
}

// v rounded to T (to nearest even) and back to fp32; v itself for float.
template <typename T>
LIGHTLLM_VEC_INLINE Vec round_to(Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return half_to_float<T>(float_to_half<T>(v));
  }
}

// -- rows as whole vectors plus one partial vector ------------------------------------------------
//
// for_each_block<kChains>(n, body) calls body(j, k, chain) for j = 0, kLanes, ...: k is Full{} for
// a whole vector and the count (1 .. kLanes-1) for the last, partial one; chain (a compile-time
// 0 .. kChains-1) names one of kChains independent accumulators, so a reduction is not bound by
// the latency of one chain of adds. load_n / store_n / keep_n take k: one body serves both cases
// without a branch in the loop over whole vectors. Which chain gets which block depends on n only.
struct Full {};
template <int C>
using Chain = std::integral_constant<int, C>;

template <typename Body, int... C>
LIGHTLLM_VEC_INLINE void unrolled(int64_t j, Body& body, std::integer_sequence<int, C...>) {
  (body(j + C * kLanes, Full{}, Chain<C>{}), ...);
}

template <int kChains, typename Body>
LIGHTLLM_VEC_INLINE void for_each_block(int64_t n, Body&& body) {
  int64_t j = 0;
  for (; j + kChains * kLanes <= n; j += kChains * kLanes) {
    unrolled(j, body, std::make_integer_sequence<int, kChains>{});
  }
  for (; j + kLanes <= n; j += kLanes) body(j, Full{}, Chain<0>{});
  if (j < n) body(j, n - j, Chain<0>{});
}

template <typename T>
LIGHTLLM_VEC_INLINE Vec load_n(const T* p, Full) {
  return load(p);
}

// The first k elements (k < kLanes); the other lanes read as 0. AVX-512 masks the lanes (no
// access past the end, no fault); elsewhere they go through a zero-padded buffer.
template <typename T>
LIGHTLLM_VEC_INLINE Vec load_n(const T* p, int64_t k) {
#if LIGHTLLM_VEC_ISA == 512
  const auto m = static_cast<__mmask16>((1u << k) - 1);
  if constexpr (std::is_same_v<T, float>) {
    return bits_as<Vec>(_mm512_maskz_loadu_ps(m, p));
  } else {
    return half_to_float<T>(bits_as<HVec>(_mm256_maskz_loadu_epi16(m, p)));
  }
#else
  T buf[kLanes] = {};
  std::memcpy(static_cast<void*>(buf), p, k * sizeof(T));
  return load(buf);
#endif
}

template <typename T>
LIGHTLLM_VEC_INLINE Vec store_n(T* p, Vec v, Full) {
  return store(p, v);
}

template <typename T>
LIGHTLLM_VEC_INLINE Vec store_n(T* p, Vec v, int64_t k) {
#if LIGHTLLM_VEC_ISA == 512
  const auto m = static_cast<__mmask16>((1u << k) - 1);
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, bits_as<__m512>(v));
    return v;
  } else {
    const HVec h = float_to_half<T>(v);
    _mm256_mask_storeu_epi16(p, m, bits_as<__m256i>(h));
    return half_to_float<T>(h);
  }
#else
  T buf[kLanes];
  const Vec stored = store(buf, v);
  std::memcpy(static_cast<void*>(p), buf, k * sizeof(T));
  return stored;
#endif
}

// v with the lanes past the row's end zeroed (they would otherwise enter a reduction).
LIGHTLLM_VEC_INLINE Vec keep_n(Vec v, Full) { return v; }

LIGHTLLM_VEC_INLINE Vec keep_n(Vec v, int64_t k) {
  IVec lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = l;
  return select(lane < static_cast<int32_t>(k), v, Vec{});
}
