// The SM3 native kernel. Compiled with a generated prelude (sm3_dist/_native.py: layout_header()) that
// defines everything Python and C++ must agree on, read here only by name: the block layout (enum Field:
// F_W, F_G, ..., NFIELDS), the hyperparameters' order (enum HyperField: H_LR, ..., NHYPER), the codes
// (enum ParamDtype: DTYPE_*, enum MomentumKind: MOMENTUM_*, enum ScanDtype: SCAN_*, enum Flag: FLAG_*),
// ABI_VERSION, and FIELD_NAMES, HYPER_NAMES and CODE_NAMES, which the library reports back.
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>
#include <algorithm>
#include <atomic>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

// the ISA level the compiler targets (the x86-64 psABI levels, or aarch64)
#if defined(__aarch64__) && defined(__ARM_FEATURE_SVE)
#define SM3_ISA_NAME "aarch64+sve"
#elif defined(__aarch64__)
#define SM3_ISA_NAME "aarch64"
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512CD__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__)
#define SM3_ISA_NAME "x86-64-v4"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__BMI2__)
#define SM3_ISA_NAME "x86-64-v3"
#elif defined(__SSE4_2__) && defined(__POPCNT__)
#define SM3_ISA_NAME "x86-64-v2"
#elif defined(__x86_64__)
#define SM3_ISA_NAME "x86-64"
#else
#define SM3_ISA_NAME "generic"
#endif

namespace {

typedef uint16_t bf16_t;

inline float bf16_to_f32(bf16_t x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// round to nearest even, as c10::BFloat16 does
inline bf16_t f32_to_bf16(float f) {
  if (f != f) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return bf16_t((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}

// The calling OpenMP thread's share [lo, hi) of `total` elements: one contiguous range per thread, the same
// split for the step and the scan.
inline void my_share(int64_t total, int64_t& lo, int64_t& hi) {
  int64_t me = 0, team = 1;
#ifdef _OPENMP
  me = omp_get_thread_num();
  team = omp_get_num_threads();
#endif
  lo = total * me / team;
  hi = total * (me + 1) / team;
}

struct VS {
  typedef float F;
  static constexpr int W = 1;
  static F set1(float x) { return x; }
  static F ld(const float* p) { return *p; }
  static F ld(const bf16_t* p) { return bf16_to_f32(*p); }
  static void st(float* p, F x) { *p = x; }
  static void st(bf16_t* p, F x) { *p = f32_to_bf16(x); }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F sqrt(F a) { return __builtin_sqrtf(a); }
  static F min_nan(F a, F b) { return a != a ? a : (b != b ? b : (b < a ? b : a)); }
  static F max_nan(F a, F b) { return a != a ? a : (b != b ? b : (a < b ? b : a)); }
  // nu >= +0 or NaN; the row minimum may be NaN: the scalar path is the NaN-exact one
  static F min_row(F rmin, F b) { return min_nan(rmin, b); }
  static F max_nu(F a, F b) { return max_nan(a, b); }
  static F gt0(F nu, F x) { return nu > 0.0f ? x : 0.0f; }
  // torch's clamp_min / clamp_max on CPU (std::max(a, lo) / std::min(a, hi), and vmaxps(lo, a) / vminps(hi, a)
  // vectorized): the bound where it lies strictly beyond a, else a itself: a NaN stays that NaN, and a value
  // equal to the bound stays a (the sign of a zero included)
  static F clamp_min(F a, F lo) { return a < lo ? lo : a; }
  static F clamp_max(F a, F hi) { return hi < a ? hi : a; }
  static float hmax(F a) { return a; }
};

// The generic vector of N floats (GCC/Clang vector extensions): one body for SSE/NEON (4), AVX2 (8) and
// AVX-512 (16). Every lane computes exactly what VS computes on one element: the same IEEE operations in the
// same order (no FMA: -ffp-contract=off), and the NaN-exact minimum and maximum written as compares and
// selects (blends), not branches. Only the square root needs the ISA's instruction (the extensions have none).
// (GCC ignores vector_size when it depends on a template parameter: the types are spelled per width.)
template <int N>
struct VT;
#define SM3_VECTOR_TYPES(N)                                                   \
  template <>                                                                 \
  struct VT<N> {                                                              \
    typedef float F __attribute__((vector_size(4 * N)));                      \
    typedef uint32_t U __attribute__((vector_size(4 * N)));                   \
    typedef uint16_t H __attribute__((vector_size(2 * N)));                   \
  };
SM3_VECTOR_TYPES(4)
SM3_VECTOR_TYPES(8)
SM3_VECTOR_TYPES(16)
#undef SM3_VECTOR_TYPES

template <int N>
struct VG {
  typedef typename VT<N>::F F;
  typedef typename VT<N>::U U;
  typedef typename VT<N>::H H;
  static constexpr int W = N;
  static F set1(float x) { return F{} + x; }
  static F ld(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static F ld(const bf16_t* p) {
    H h;
    std::memcpy(&h, p, sizeof h);
    return (F)(__builtin_convertvector(h, U) << 16);
  }
  static void st(float* p, F x) { std::memcpy(p, &x, sizeof x); }
  // round to nearest even, NaN -> 0x7FC0: f32_to_bf16 on every lane
  static void st(bf16_t* p, F x) {
    U u = (U)x;
    U r = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
    r = (x != x) ? (U{} + 0x7FC0u) : r;
    H h = __builtin_convertvector(r, H);
    std::memcpy(p, &h, sizeof h);
  }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F sqrt(F a) {
#if defined(__AVX512F__)
    if constexpr (N == 16) return (F)_mm512_sqrt_ps((__m512)a);
#endif
#if defined(__AVX__)
    if constexpr (N == 8) return (F)_mm256_sqrt_ps((__m256)a);
#endif
#if defined(__SSE2__)
    if constexpr (N == 4) return (F)_mm_sqrt_ps((__m128)a);
#endif
#if defined(__aarch64__)
    if constexpr (N == 4) return (F)vsqrtq_f32((float32x4_t)a);
#endif
    F r;
    for (int k = 0; k < N; ++k) r[k] = __builtin_sqrtf(a[k]);
    return r;
  }
  // VS::min_nan / max_nan lane by lane: a NaN first operand, else a NaN second one, else the smaller/larger
  static F min_nan(F a, F b) {
    F r = (b < a) ? b : a;
    r = (b != b) ? b : r;
    return (a != a) ? a : r;
  }
  static F max_nan(F a, F b) {
    F r = (a < b) ? b : a;
    r = (b != b) ? b : r;
    return (a != a) ? a : r;
  }
  // rows whose minimum is not NaN (run_tile takes the others one element at a time)
  static F min_row(F rmin, F b) {
    F r = (b < rmin) ? b : rmin;
    return (b != b) ? b : r;
  }
  // nu is +0..+inf or NaN: as unsigned integers the bit patterns order the same, and every NaN (either sign)
  // lies above +inf, so an unsigned max is a NaN-propagating max (maxima start at +0, not -inf); as V16's.
  static F max_nu(F a, F b) {
    U ua = (U)a, ub = (U)b;
    return (F)((ua < ub) ? ub : ua);
  }
  static F gt0(F nu, F x) { return (nu > 0.0f) ? x : F{}; }
  // VS::clamp_min / clamp_max lane by lane (a NaN or a value equal to the bound stays a)
  static F clamp_min(F a, F lo) { return (a < lo) ? lo : a; }
  static F clamp_max(F a, F hi) { return (hi < a) ? hi : a; }
  static float hmax(F a) {
    float r = a[0];
    for (int k = 1; k < N; ++k) r = VS::max_nan(r, a[k]);
    return r;
  }
};

#if defined(__AVX512F__)
struct V16 {
  typedef __m512 F;
  static constexpr int W = 16;
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F ld(const float* p) { return _mm512_loadu_ps(p); }
  static F ld(const bf16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static void st(float* p, F x) { _mm512_storeu_ps(p, x); }
  static void st(bf16_t* p, F x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  // vminps/vmaxps return the second operand when either is NaN: put a NaN first operand back.
  static F min_nan(F a, F b) { return _mm512_mask_mov_ps(_mm512_min_ps(a, b), _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), a); }
  static F max_nan(F a, F b) { return _mm512_mask_mov_ps(_mm512_max_ps(a, b), _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), a); }
  // Only for rows whose minimum is not NaN: vminps returns its second operand, colacc, when either is NaN.
  static F min_row(F rmin, F b) { return _mm512_min_ps(rmin, b); }
  // nu is +0..+inf or NaN: as unsigned integers the bit patterns order the same, and every NaN (either
  // sign) lies above +inf, so an unsigned max is a NaN-propagating max (maxima start at +0, not -inf).
  static F max_nu(F a, F b) {
    return _mm512_castsi512_ps(_mm512_max_epu32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }
  static F gt0(F nu, F x) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(nu, _mm512_setzero_ps(), _CMP_GT_OQ), x); }
  // vmaxps/vminps return their second operand when either is NaN or the two are equal: with a as the second,
  // exactly VS::clamp_min / clamp_max (and torch's own AVX-512 clamp_min / clamp_max)
  static F clamp_min(F a, F lo) { return _mm512_max_ps(lo, a); }
  static F clamp_max(F a, F hi) { return _mm512_min_ps(hi, a); }
  static float hmax(F a) {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, a);
    float r = lanes[0];
    for (int k = 1; k < 16; ++k) r = VS::max_nan(r, lanes[k]);
    return r;
  }
};
#endif

// The widest vector of the target. AVX-512 keeps its intrinsics (V16) unless SM3_GENERIC_AVX512 is defined;
// the generic body compiles at every width (tests build it for -march=x86-64-v4 too).
#if defined(__AVX512F__) && !defined(SM3_GENERIC_AVX512)
#define SM3_VEC V16
#elif defined(__AVX512F__)
#define SM3_VEC VG<16>
#elif defined(__AVX__)
#define SM3_VEC VG<8>
#elif defined(__SSE2__) || defined(__aarch64__)
#define SM3_VEC VG<4>
#else
#define SM3_VEC VS
#endif

struct Hyper {
  float lr, mom, omm, beta, omb, eps, wd, sign, nu_div, scale, clip;
};

struct Block {
  void* w;
  const void* g;
  void* m;
  const float* rowmin;
  const float* colacc;
  float* rowmax;
  float* colmax;
  int64_t rows, cols, pdtype, mkind, keep_max;
};

template <class V>
struct HV {
  typename V::F lr, mom, omm, beta, omb, eps, wd, sign, nu_div, scale, clip, neg_clip, one;
  explicit HV(const Hyper& h)
      : lr(V::set1(h.lr)), mom(V::set1(h.mom)), omm(V::set1(h.omm)), beta(V::set1(h.beta)), omb(V::set1(h.omb)),
        eps(V::set1(h.eps)), wd(V::set1(h.wd)), sign(V::set1(h.sign)), nu_div(V::set1(h.nu_div)),
        scale(V::set1(h.scale)), clip(V::set1(h.clip)), neg_clip(V::set1(-h.clip)), one(V::set1(1.0f)) {}
};

// One vector (or one element) of one row; the same operations, in the same order, as the eager kernel.
// EXTRA: divide the raw gradient by the gradient scale and nu by the bias-correction divisor (either may be 1,
// and x / 1 == x exactly). CLIP: clamp the preconditioned update to [-clip, clip] (clamp_min, then clamp_max).
template <class V, class PT, class MT, bool HAS_M, bool WD, bool BETA, bool EPS, bool EXTRA, bool CLIP>
inline void step_at(PT* w_row, const PT* g_row, MT* m_row, const float* colacc, float* cm,
                    typename V::F rmin, typename V::F& rmax, const HV<V>& h, int64_t j) {
  typedef typename V::F F;
  if (V::W > 1) {  // a software prefetch 1 KiB ahead in each stream (it never faults, even past the end)
    __builtin_prefetch(g_row + j + 256, 0, 3);
    __builtin_prefetch(w_row + j + 256, 1, 3);
    if (HAS_M) __builtin_prefetch(m_row + j + 256, 1, 3);
  }
  F g = EXTRA ? V::mul(V::div(V::ld(g_row + j), h.scale), h.sign) : V::mul(V::ld(g_row + j), h.sign);
  F w = V::ld(w_row + j);
  if (WD) g = V::add(g, V::mul(w, h.wd));
  F mn = V::min_row(rmin, V::ld(colacc + j));
  F sq = V::mul(g, g);
  F nu = BETA ? V::add(V::mul(mn, h.beta), V::mul(sq, h.omb)) : V::add(mn, sq);
  rmax = V::max_nu(rmax, nu);
  V::st(cm + j, V::max_nu(V::ld(cm + j), nu));
  F nh = EXTRA ? V::div(nu, h.nu_div) : nu;
  F u = EPS ? V::mul(V::div(h.one, V::sqrt(V::add(nh, h.eps))), g) : V::gt0(nh, V::mul(g, V::div(h.one, V::sqrt(nh))));
  if (CLIP) u = V::clamp_max(V::clamp_min(u, h.neg_clip), h.clip);
  F upd;
  if (HAS_M) {
    F mv = V::add(V::mul(V::ld(m_row + j), h.mom), V::mul(u, h.omm));
    V::st(m_row + j, mv);
    upd = V::mul(mv, h.lr);
  } else {
    upd = V::mul(u, h.lr);
  }
  V::st(w_row + j, V::sub(w, upd));
}

template <class PT, class MT, bool HAS_M, bool WD, bool BETA, bool EPS, bool EXTRA, bool CLIP>
void run_tile(const Block& b, const Hyper& hs, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* rowpart,
              float* colpart) {
  typedef SM3_VEC V;
  const HV<V> hv(hs);
  const HV<VS> h1(hs);
  // nu >= +0 (or NaN), so +0 is the identity of its max
  for (int64_t j = c0; j < c1; ++j) colpart[j] = 0.0f;
  for (int64_t i = r0; i < r1; ++i) {
    PT* w_row = static_cast<PT*>(b.w) + i * b.cols;
    const PT* g_row = static_cast<const PT*>(b.g) + i * b.cols;
    MT* m_row = HAS_M ? static_cast<MT*>(b.m) + i * b.cols : nullptr;
    const float rmin_s = b.rowmin[i];
    float rmax_s = 0.0f;
    int64_t j = c0;
    if (rmin_s == rmin_s) {
      typename V::F rmin = V::set1(rmin_s), rmax = V::set1(0.0f);
      for (; j + V::W <= c1; j += V::W)
        step_at<V, PT, MT, HAS_M, WD, BETA, EPS, EXTRA, CLIP>(w_row, g_row, m_row, b.colacc, colpart, rmin, rmax, hv, j);
      rmax_s = V::hmax(rmax);
    }
    for (; j < c1; ++j)
      step_at<VS, PT, MT, HAS_M, WD, BETA, EPS, EXTRA, CLIP>(w_row, g_row, m_row, b.colacc, colpart, rmin_s, rmax_s, h1, j);
    rowpart[i] = rmax_s;
  }
}

typedef void (*TileFn)(const Block&, const Hyper&, int64_t, int64_t, int64_t, int64_t, float*, float*);

// one instantiation of run_tile per combination of the step's flags
template <class PT, class MT, bool HAS_M, bool WD, bool BETA, bool EPS, bool EXTRA>
TileFn pick_clip(int64_t flags) {
  if (flags & FLAG_CLIP) return run_tile<PT, MT, HAS_M, WD, BETA, EPS, EXTRA, true>;
  return run_tile<PT, MT, HAS_M, WD, BETA, EPS, EXTRA, false>;
}

template <class PT, class MT, bool HAS_M, bool WD, bool BETA, bool EPS>
TileFn pick_extra(int64_t flags) {
  if (flags & (FLAG_NU_DIV | FLAG_SCALE)) return pick_clip<PT, MT, HAS_M, WD, BETA, EPS, true>(flags);
  return pick_clip<PT, MT, HAS_M, WD, BETA, EPS, false>(flags);
}

template <class PT, class MT, bool HAS_M, bool WD, bool BETA>
TileFn pick_eps(int64_t flags) {
  return (flags & FLAG_EPS) ? pick_extra<PT, MT, HAS_M, WD, BETA, true>(flags)
                            : pick_extra<PT, MT, HAS_M, WD, BETA, false>(flags);
}

template <class PT, class MT, bool HAS_M, bool WD>
TileFn pick_beta(int64_t flags) {
  return (flags & FLAG_BETA) ? pick_eps<PT, MT, HAS_M, WD, true>(flags) : pick_eps<PT, MT, HAS_M, WD, false>(flags);
}

template <class PT, class MT, bool HAS_M>
TileFn pick_flags(int64_t flags) {
  return (flags & FLAG_WD) ? pick_beta<PT, MT, HAS_M, true>(flags) : pick_beta<PT, MT, HAS_M, false>(flags);
}

template <class PT>
TileFn pick_momentum(int64_t mkind, int64_t flags) {
  if (mkind == MOMENTUM_F32) return pick_flags<PT, float, true>(flags);
  if (mkind == MOMENTUM_BF16) return pick_flags<PT, bf16_t, true>(flags);
  return pick_flags<PT, float, false>(flags);
}

// out[j] = max over k < n of parts[k * len + j] (and of out[j] itself with keep_max). The values are
// maxima of nu or accumulators (+0..+inf or NaN), for which max_nu is a NaN-propagating max.
void combine_partials(const float* parts, int64_t n, int64_t len, float* out, bool keep_max) {
  typedef SM3_VEC V;
  int64_t j = 0;
  for (; j + V::W <= len; j += V::W) {
    typename V::F r = V::ld(parts + j);
    for (int64_t k = 1; k < n; ++k) r = V::max_nu(r, V::ld(parts + k * len + j));
    if (keep_max) r = V::max_nu(V::ld(out + j), r);
    V::st(out + j, r);
  }
  for (; j < len; ++j) {
    float r = parts[j];
    for (int64_t k = 1; k < n; ++k) r = VS::max_nu(r, parts[k * len + j]);
    if (keep_max) r = VS::max_nu(out[j], r);
    out[j] = r;
  }
}

struct Tile {
  int32_t block;
  int32_t rc, cc;
};

struct Plan {
  int64_t rb, cb, nrc, ncc;
  float* rowpart;
  float* colpart;
  TileFn fn;
};

}  // namespace

// the block layout this library was built with (checked by Python at load)
extern "C" int sm3_native_abi() { return ABI_VERSION; }
extern "C" int sm3_native_nfields() { return NFIELDS; }
extern "C" const char* sm3_native_field_names() { return FIELD_NAMES; }
extern "C" const char* sm3_native_hyper_names() { return HYPER_NAMES; }
extern "C" const char* sm3_native_codes() { return CODE_NAMES; }
// the target it was compiled for (checked by Python at load; reported by build_info())
extern "C" const char* sm3_native_isa() { return SM3_ISA_NAME; }
extern "C" int sm3_native_vector_width() { return SM3_VEC::W; }
extern "C" int sm3_native_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

namespace {
// work() on a team of nt threads (one OpenMP parallel region), or once on this thread
template <class Work>
void run_team(int64_t nt, Work& work) {
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    work();
    return;
  }
#endif
  (void)nt;
  work();
}

#ifndef SM3_SCAN_AHEAD
#define SM3_SCAN_AHEAD 8
#endif
#ifndef SM3_SCAN_HINT
#define SM3_SCAN_HINT 3
#endif
// exponent bits all ones: inf or NaN. A max-reduction of the masked exponents, which vectorizes: in chunks of
// 1 KiB (four independent maxima), each prefetched SM3_SCAN_AHEAD KiB ahead (a prefetch never faults, even past
// the end; 8 KiB was the fastest of 2..16 on the AVX2 EPYC, within 5%).
template <class T>
bool has_nonfinite(const T* p, int64_t n, T mask) {
  constexpr int64_t CHUNK = 1024 / sizeof(T);
  T m = 0;
  int64_t i = 0;
  for (; i + CHUNK <= n; i += CHUNK) {
    for (int64_t k = 0; k < CHUNK; k += 64 / int64_t(sizeof(T)))
      __builtin_prefetch(p + i + SM3_SCAN_AHEAD * CHUNK + k, 0, SM3_SCAN_HINT);
    T c0 = 0, c1 = 0, c2 = 0, c3 = 0;
    for (int64_t k = 0; k < CHUNK; k += 4) {
      T e0 = T(p[i + k] & mask), e1 = T(p[i + k + 1] & mask), e2 = T(p[i + k + 2] & mask), e3 = T(p[i + k + 3] & mask);
      c0 = e0 > c0 ? e0 : c0;
      c1 = e1 > c1 ? e1 : c1;
      c2 = e2 > c2 ? e2 : c2;
      c3 = e3 > c3 ? e3 : c3;
    }
    c0 = c1 > c0 ? c1 : c0;
    c2 = c3 > c2 ? c3 : c2;
    c0 = c2 > c0 ? c2 : c0;
    m = c0 > m ? c0 : m;
  }
  for (; i < n; ++i) {
    T e = T(p[i] & mask);
    m = e > m ? e : m;
  }
  return m == mask;
}
}  // namespace

// kinds: ScanDtype (SCAN_F32, SCAN_BF16, SCAN_F16). Returns the index of the first tensor holding an inf/NaN, or -1.
extern "C" int64_t sm3_native_first_nonfinite(const int64_t* ptrs, const int64_t* numels, const int64_t* kinds,
                                              int64_t n, int64_t num_threads, int64_t tile_elems) {
  struct Span { int64_t tensor, begin, end, offset; };  // offset: of its first element among all tensors'
  // the scratch is kept from call to call (per calling thread): no allocation once it has grown
  // (bound to local references: inside the parallel region a thread_local name would be each thread's own)
  static thread_local std::vector<Span> spans_kept;
  static thread_local std::vector<unsigned char> bad_kept;
  std::vector<Span>& spans = spans_kept;
  std::vector<unsigned char>& bad = bad_kept;
  spans.clear();
  int64_t total = 0;
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t b = 0; b < numels[k]; b += tile_elems)
      spans.push_back(Span{k, b, std::min(numels[k], b + tile_elems), total + b});
    total += numels[k];
  }
  bad.assign(spans.size(), 0);
  const int64_t nspans = int64_t(spans.size());
  auto work = [&]() {
    // Each thread reads the contiguous range of the elements a step's thread takes (sm3_native_step splits
    // alike when the scanned tensors are its gradients), last span first: it ends on the gradients its step
    // starts with, which are then still in its caches.
    int64_t lo = 0, hi = 0;
    my_share(total, lo, hi);
    for (int64_t t = nspans - 1; t >= 0; --t) {
      const Span& s = spans[t];
      if (s.offset < lo || s.offset >= hi) continue;
      const int64_t len = s.end - s.begin;
      if (kinds[s.tensor] == SCAN_F32)
        bad[t] = has_nonfinite(reinterpret_cast<const uint32_t*>(ptrs[s.tensor]) + s.begin, len, uint32_t(0x7F800000u));
      else
        bad[t] = has_nonfinite(reinterpret_cast<const uint16_t*>(ptrs[s.tensor]) + s.begin, len,
                               uint16_t(kinds[s.tensor] == SCAN_BF16 ? 0x7F80u : 0x7C00u));
    }
  };
  int64_t nt = std::max<int64_t>(1, std::min({num_threads, nspans, (total + 4 * tile_elems - 1) / (4 * tile_elems)}));
  run_team(nt, work);
  for (int64_t t = 0; t < nspans; ++t)
    if (bad[t]) return spans[t].tensor;
  return -1;
}

// meta: nblocks x NFIELDS int64, field F_<NAME> of block k at meta[k * NFIELDS + F_<NAME>] (see BLOCK_FIELDS);
// hyper: NHYPER doubles, H_<NAME> at hyper[H_<NAME>] (see HYPER_FIELDS); flags: FLAG_* bits
extern "C" int sm3_native_step(const int64_t* meta, int64_t nblocks, const double* hyper, int64_t flags,
                               int64_t num_threads, int64_t tile_elems) {
  Hyper hs{float(hyper[H_LR]),     float(hyper[H_MOMENTUM]),     float(hyper[H_ONE_MINUS_MOMENTUM]),
           float(hyper[H_BETA]),   float(hyper[H_ONE_MINUS_BETA]), float(hyper[H_EPS]),
           float(hyper[H_WEIGHT_DECAY]), float(hyper[H_SIGN]), float(hyper[H_NU_DIVISOR]),
           float(hyper[H_GRAD_SCALE]), float(hyper[H_UPDATE_CLIP])};
  // the scratch is kept from step to step (per calling thread): no allocation once it has grown
  // (bound to local references: inside the parallel region a thread_local name would be each thread's own)
  static thread_local std::vector<Block> blocks_kept;
  static thread_local std::vector<Plan> plans_kept;
  static thread_local std::vector<Tile> tiles_kept;
  static thread_local std::vector<float> buf_kept;
  static thread_local std::vector<int64_t> tile_start_kept;
  std::vector<Block>& blocks = blocks_kept;
  std::vector<Plan>& plans = plans_kept;
  std::vector<Tile>& tiles = tiles_kept;
  std::vector<float>& buf = buf_kept;
  std::vector<int64_t>& tile_start = tile_start_kept;
  blocks.resize(nblocks);
  plans.resize(nblocks);
  tiles.clear();
  int64_t scratch = 0, total = 0;
  for (int64_t k = 0; k < nblocks; ++k) {
    const int64_t* f = meta + k * NFIELDS;
    Block& b = blocks[k];
    b.w = reinterpret_cast<void*>(f[F_W]);
    b.g = reinterpret_cast<const void*>(f[F_G]);
    b.m = reinterpret_cast<void*>(f[F_M]);
    b.rowmin = reinterpret_cast<const float*>(f[F_ROWMIN]);
    b.colacc = reinterpret_cast<const float*>(f[F_COLACC]);
    b.rowmax = reinterpret_cast<float*>(f[F_ROWMAX]);
    b.colmax = reinterpret_cast<float*>(f[F_COLMAX]);
    b.rows = f[F_ROWS];
    b.cols = f[F_COLS];
    b.pdtype = f[F_PDTYPE];
    b.mkind = f[F_MKIND];
    b.keep_max = f[F_KEEP_MAX];
    if (b.rows <= 0 || b.cols <= 0) return 1;
    total += b.rows * b.cols;
    Plan& p = plans[k];
    p.fn = b.pdtype == DTYPE_BF16 ? pick_momentum<bf16_t>(b.mkind, flags) : pick_momentum<float>(b.mkind, flags);
    if (b.cols >= tile_elems) {
      p.cb = tile_elems;
      p.rb = 1;
    } else {
      p.cb = b.cols;
      p.rb = tile_elems / b.cols;
    }
    p.nrc = (b.rows + p.rb - 1) / p.rb;
    p.ncc = (b.cols + p.cb - 1) / p.cb;
    scratch += p.ncc * b.rows + p.nrc * b.cols;
    for (int64_t rc = 0; rc < p.nrc; ++rc)
      for (int64_t cc = 0; cc < p.ncc; ++cc) tiles.push_back(Tile{int32_t(k), int32_t(rc), int32_t(cc)});
  }
  buf.resize(scratch);  // every tile writes its partial maxima before they are read
  float* next = buf.data();
  for (int64_t k = 0; k < nblocks; ++k) {
    Plan& p = plans[k];
    const Block& b = blocks[k];
    // partial maxima go to scratch: rowmax/colmax may be the accumulators rowmin/colacc themselves
    p.rowpart = next;
    next += p.ncc * b.rows;
    p.colpart = next;
    next += p.nrc * b.cols;
  }
  const int64_t ntiles = int64_t(tiles.size());
  // each thread takes one contiguous range of the elements (whole tiles, in memory order): long streams
  tile_start.assign(ntiles + 1, 0);
  for (int64_t t = 0; t < ntiles; ++t) {
    const Tile& tl = tiles[t];
    const Block& b = blocks[tl.block];
    const Plan& p = plans[tl.block];
    const int64_t r0 = tl.rc * p.rb, c0 = tl.cc * p.cb;
    tile_start[t + 1] = tile_start[t] + (std::min(b.rows, r0 + p.rb) - r0) * (std::min(b.cols, c0 + p.cb) - c0);
  }
  auto work = [&]() {
    int64_t lo = 0, hi = 0;
    my_share(total, lo, hi);
    for (int64_t t = 0; t < ntiles; ++t) {
      if (tile_start[t] < lo || tile_start[t] >= hi) continue;
      const Tile& tl = tiles[t];
      const Block& b = blocks[tl.block];
      const Plan& p = plans[tl.block];
      int64_t r0 = tl.rc * p.rb, r1 = std::min(b.rows, r0 + p.rb);
      int64_t c0 = tl.cc * p.cb, c1 = std::min(b.cols, c0 + p.cb);
      p.fn(b, hs, r0, r1, c0, c1, p.rowpart + tl.cc * b.rows, p.colpart + tl.rc * b.cols);
    }
  };
  // waking a thread team costs more than a small step: one thread per tile's worth of elements at most
  int64_t nt = std::max<int64_t>(1, std::min({num_threads, ntiles, (total + tile_elems - 1) / tile_elems}));
  run_team(nt, work);
  // every accumulator has been read: write the maxima, combining the partials of blocks cut into tiles
  for (int64_t k = 0; k < nblocks; ++k) {
    const Plan& p = plans[k];
    const Block& b = blocks[k];
    combine_partials(p.rowpart, p.ncc, b.rows, b.rowmax, b.keep_max != 0);
    combine_partials(p.colpart, p.nrc, b.cols, b.colmax, b.keep_max != 0);
  }
  return 0;
}
