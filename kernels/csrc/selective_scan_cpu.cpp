// Fused selective scan (Mamba's S6) for CPUs: forward and backward, in float and double.
//
// Built on first use by vmamba/kernels/cpu.py with the system compiler and loaded through ctypes, so the
// file uses no torch headers and no C++ runtime library (it also builds with a plain C compiler driver).
//
// Forward: u, delta, z, out (batch, dim, L), B, C (batch, G, N, L) and A (dim, N) are strided views (the
// caller passes their element strides), so token-major activations and slices of a projection are read in
// place; D, delta_bias (dim,) and last (batch, dim, N) are contiguous. The forward is vectorised over
// channels: a SIMD vector holds W adjacent channels of one group (W = 16 floats with AVX-512, 8 with AVX2),
// so every step is a handful of whole-vector operations per state and needs no horizontal sum. Strides
// may be negative: views that start at token L-1 with negated token strides scan a sequence back to front
// (the reversed direction of a multi-direction scan, with no reversed copies), and the forward can add its
// output into `out` and scale the result, which merges the directions' outputs in the same pass.
//
// Backward: float32 with N = 1 or 16 (backward_block, vectorised over channels like the forward) reads and
// writes strided views of any sign through ss_backward_views_f32 (a reversed direction with no copies);
// other N and double (ss_backward_*: backward_row, one (batch, channel) row at a time, vectorised over N)
// take contiguous u, delta, z, dout, du, ddelta, dz (batch, dim, L), A (dim, N) and B, C (batch, G, L, N)
// (the state index innermost so one time step's N values are adjacent). Both work in chunks of kChunk
// steps and store nothing of size (L, N): they keep the state at every chunk start, then walk the chunks
// backwards, recomputing each chunk's states before running the adjoint recurrence through it. Units of
// rows / blocks run in parallel with OpenMP when the build has it.
//
// Also here, for Vim's blocks: the two causal depthwise convolutions (+ SiLU) and their backward, the fused
// residual add + RMSNorm, and, for float32 inference, the whole mixer between its two projections in one
// call (ss_vim_mixer_f32: the convolutions, x_proj and both scans).

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(_WIN32)
#define SS_EXPORT extern "C" __declspec(dllexport)
#else
#define SS_EXPORT extern "C" __attribute__((visibility("default")))
#endif

namespace {

constexpr int64_t kChunk = 64;

#if defined(_OPENMP)
inline int thread_index() { return omp_get_thread_num(); }
inline int team_size() { return omp_get_num_threads(); }
inline int usable_threads(int requested) { return requested; }
#else
inline int thread_index() { return 0; }
inline int team_size() { return 1; }
inline int usable_threads(int) { return 1; }
#endif

// ---------------------------------------------------------------------------------------------------
// SIMD vectors. GCC/Clang vector extensions: plain arithmetic on them compiles to the widest registers the
// build targets (AVX-512, AVX2, SSE, NEON) and to scalar code where there are none, so there are no
// intrinsics to guard. A forward "block" is one vector of adjacent channels: lane c is channel d0 + c.

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

typedef float VF __attribute__((vector_size(kVecBytes)));
typedef uint32_t VU __attribute__((vector_size(kVecBytes)));
typedef double VD __attribute__((vector_size(kVecBytes)));

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using V = VF;
  static constexpr int W = kVecBytes / 4;
};
template <>
struct Vec<double> {
  using V = VD;
  static constexpr int W = kVecBytes / 8;
};

// ---------------------------------------------------------------------------------------------------
// Elementwise math. The float versions are branch-free templates over `float` and `VF` (one formula for
// the scalar loops, which GCC vectorises, and the explicit vectors) and call no library function; the
// double versions use the C library lane by lane (double is for gradient checks, not speed).

inline uint32_t bits_of(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}
inline VU bits_of(VF f) { return (VU)f; }  // a vector cast reinterprets the bits
inline float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline VF from_bits(VU bits) { return (VF)bits; }

// exp(r) for |r| <= ln2 / 2: 1 + r + r^2 q(r), q of degree 4 fitted (near-minimax, relative error 3e-9)
// for this package, evaluated by Horner's rule (6 multiply-adds).
template <typename V>
inline V exp_reduced(V r) {
  V p = V{} + 1.3814385747537017e-3f;
  p = p * r + 8.368746377527714e-3f;
  p = p * r + 4.166839271783829e-2f;
  p = p * r + 1.666651964187622e-1f;
  p = p * r + 4.999999403953552e-1f;
  p = p * r + 1.0f;
  return p * r + 1.0f;
}

// exp(x) to within 1 ulp (0.9 ulp measured over [-87, 88]): x = k ln2 + r with |r| <= ln2 / 2 (two-constant
// reduction), exp_reduced(r), and 2^k built directly in the exponent bits. k is read from the bits of the
// rounding sum x log2(e) + 1.5 * 2^23 (no float-to-int conversion). NaN propagates; results below FLT_MIN
// (x < -87.34) are flushed to 0, and x > 88.37 gives +inf.
template <typename V>
inline V exp_f32(V x) {
  const V zero = V{} + 0.0f, lo = zero - 87.3365447505531f, hi = zero + 88.3762626647949f;
  const V magic = zero + 12582912.0f;
  V xc = lo > x ? lo : x;  // NaN compares false and stays NaN
  xc = xc > hi ? hi : xc;
  const V shifted = xc * 1.44269504088896341f + magic;
  const V k = shifted - magic;
  V r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  // The low bits of `shifted` hold k (two's complement), so (bits + 127) << 23 is 2^k's bit pattern.
  const V res = exp_reduced(r) * from_bits((bits_of(shifted) + 127u) << 23);
  const V flushed = x < lo ? zero : res;
  return x > hi ? zero + HUGE_VALF : flushed;
}

#if defined(__AVX512F__)
// The same exp on AVX-512 vectors, with the rounding and the scaling by 2^k done by single instructions
// (vrndscaleps, vscalefps: correct down to the subnormals and 0, up to +inf), so no compare-and-blend
// steps: 12 instructions. The clamp to [-104, 128] keeps r small for huge |x| and passes NaN through.
inline VF exp_f32(VF x) {
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(128.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), (__m512)x));
  const VF k = (VF)_mm512_roundscale_ps(xc * _mm512_set1_ps(1.44269504088896341f),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  VF r = (VF)xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  return (VF)_mm512_scalef_ps((__m512)exp_reduced(r), (__m512)k);
}
#endif

// log(w) for w in [1, 2] (Cephes logf polynomial on the mantissa folded into [sqrt(1/2), sqrt(2))).
template <typename V>
inline V log_1_2(V w) {
  const V zero = V{} + 0.0f, one = zero + 1.0f;
  const auto big = w > 1.41421356237f;
  const V e = big ? one : zero;
  const V f = (big ? 0.5f * w : w) - 1.0f;
  const V z = f * f;
  V p = zero + 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const V y = f * z * p + e * -2.12194440e-4f - 0.5f * z;
  return f + y + e * 0.693359375f;
}

// softplus(x) = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), with log1p(v) = log(1 + v) * v / ((1 + v) - 1)
// correcting the rounding of 1 + v.
template <typename V>
inline V softplus_f32(V x) {
  const V zero = V{} + 0.0f;
  const V ax = x < zero ? -x : x;
  const V v = exp_f32(-ax);
  const V w = 1.0f + v;
  const V lp = w == 1.0f ? v : log_1_2(w) * (v / (w - 1.0f));
  return (x > zero ? x : zero) + lp;
}

template <typename V>
inline V sigmoid_f32(V x) {
  return 1.0f / (1.0f + exp_f32(-x));
}

#if defined(__AVX512F__)
// AVX-512 forms without a division (a 512-bit vdivps costs as much as a dozen multiply-adds), for the
// per-token softplus and gate of the forward. reciprocal: vrcp14ps (relative error 2^-14) and one Newton
// step, about 1 ulp for normal d (NaN stays NaN).
inline VF reciprocal(VF d) {
  const VF r = (VF)_mm512_rcp14_ps((__m512)d);
  return r * (2.0f - d * r);
}

// 1 + exp(-x) is capped at 2^127 so the Newton step stays finite: for x < -88 the result is at most
// 5.9e-39 instead of a smaller number or 0.
inline VF sigmoid_avx512(VF x) {
  const VF d = 1.0f + exp_f32(-x);
  return reciprocal(d > 0x1p127f ? VF{} + 0x1p127f : d);
}

// softplus(x) = max(x, 0) + log1p(v) with v = exp(-|x|) in [0, 1] and log1p(v) = v P(v), P of degree 8 fitted
// for this package (relative error 3e-8; 1.7e-7 evaluated in float): no division and no logarithm's range
// reduction, 25 instructions against about 40 for softplus_f32 (measured: the Vim-Ti scan 5-11% faster).
inline VF softplus_avx512(VF x) {
  const VF ax = (VF)_mm512_abs_ps((__m512)x);
  const VF v = exp_f32(-ax);
  VF p = VF{} + 5.232702009e-03f;
  p = p * v - 2.950527892e-02f;
  p = p * v + 7.822603732e-02f;
  p = p * v - 1.366325468e-01f;
  p = p * v + 1.910601258e-01f;
  p = p * v - 2.484298348e-01f;
  p = p * v + 3.331909776e-01f;
  p = p * v - 4.999949336e-01f;
  p = p * v + 9.999999404e-01f;
  return (VF)_mm512_max_ps((__m512)x, _mm512_setzero_ps()) + v * p;
}
#endif

inline float exp_fast(float x) { return exp_f32(x); }
inline VF exp_fast(VF x) { return exp_f32(x); }
inline float softplus(float x) { return softplus_f32(x); }
inline float sigmoid(float x) { return sigmoid_f32(x); }
#if defined(__AVX512F__)
inline VF softplus(VF x) { return softplus_avx512(x); }
inline VF sigmoid(VF x) { return sigmoid_avx512(x); }
#else
inline VF softplus(VF x) { return softplus_f32(x); }
inline VF sigmoid(VF x) { return sigmoid_f32(x); }
#endif

inline double exp_fast(double x) { return std::exp(x); }
inline double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }  // torch's threshold
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

template <double (*F)(double)>
inline VD lanewise(VD x) {
  for (int i = 0; i < Vec<double>::W; ++i) x[i] = F(x[i]);
  return x;
}
inline VD exp_fast(VD x) { return lanewise<exp_fast>(x); }
inline VD softplus(VD x) { return lanewise<softplus>(x); }
inline VD sigmoid(VD x) { return lanewise<sigmoid>(x); }

// The forward scan's decays exp(dt * A), computed as 2^(dt * A') with A' = A log2(e) folded in once per
// block: t = k + f with k = round(t) and |f| <= 1/2, 2^f by a degree-5 polynomial (fitted for this package
// to a relative error of 9e-8; 1.9e-7 evaluated in float), scaled by 2^k. On AVX-512 that is 8-9 instructions
// (vreduceps or vrndscaleps, vscalefps: exact scaling down to the subnormals and 0) against the 12 of exp_f32, and the
// exp is most of the scan's work: N per channel and token. The clamp keeps f finite for t = -inf.
constexpr double kLog2e = 1.4426950408889634;
template <typename V>
inline V exp2_reduced(V f) {
  V p = V{} + 1.3264711014926434e-3f;
  p = p * f + 9.671512059867382e-3f;
  p = p * f + 5.550733953714371e-2f;
  p = p * f + 2.4022242426872253e-1f;
  p = p * f + 6.931470036506653e-1f;
  return p * f + 1.0f;
}
#if defined(__AVX512DQ__)
// vreduceps gives f = t - round(t) in one instruction (0 for t = +-inf, so k = t - f = +-inf scales to 0 or
// inf and no clamp is needed); 8 instructions.
inline VF exp2_decay(VF t) {
  const __m512 f = _mm512_reduce_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (VF)_mm512_scalef_ps((__m512)exp2_reduced((VF)f), _mm512_sub_ps((__m512)t, f));
}
#elif defined(__AVX512F__)
inline VF exp2_decay(VF t) {
  const __m512 tc = _mm512_max_ps(_mm512_set1_ps(-200.0f), (__m512)t);
  const __m512 k = _mm512_roundscale_ps(tc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return (VF)_mm512_scalef_ps((__m512)exp2_reduced((VF)_mm512_sub_ps(tc, k)), k);
}
#else
inline VF exp2_decay(VF t) { return exp_f32(t * 0.6931471805599453f); }
#endif
inline float exp2_decay(float t) { return exp_f32(t * 0.6931471805599453f); }
inline VD exp2_decay(VD t) { return lanewise<exp_fast>(t * 0.6931471805599453); }

// ---------------------------------------------------------------------------------------------------

// The forward's inputs as strided views (element strides, any sign): u, delta, z, out (batch, dim, L);
// B, C (batch, G, N, L); A (dim, N). D, delta_bias (dim,) and last (batch, dim, N) are contiguous.
template <typename T>
struct Fwd {
  const T *u, *delta, *A, *B, *C;
  const T *D, *z, *bias;  // may be null
  T *out, *last;
  int64_t batch, dim, len, nstate, groups;
  // With dt_weight (dim, rank) contiguous, `delta` is the low-rank step input (batch, rank, L) (its strides in
  // sdelta) and the step of channel d is sum_r dt_weight[d, r] delta[b, r, t]: dt_proj fused into the scan.
  const T* dt_weight;
  int64_t rank;
  // > 0: step p visits token (p % col_h) * (L / col_h) + p / col_h, a column-major walk of the row-major
  // (col_h, L / col_h) grid (VMamba's column directions; with negated token strides, its reverse).
  int64_t col_h;
  int64_t su[3], sdelta[3], sz[3], sout[3], sB[4], sC[4], sA[2];
  bool softplus;
  bool accumulate;  // out = (out + y) * scale instead of out = y * scale (merging directions)
  // z gates the merged sum instead of y: out = (out + y) * silu(z) * scale. A gate shared by the directions
  // is then computed once, by the last of them (the earlier ones run without z).
  bool gate_sum;
  T scale;
};

// The backward's inputs, all contiguous (see the file comment).
template <typename T>
struct Scan {
  const T* u;
  const T* delta;
  const T* A;
  const T* B;
  const T* C;
  const T* D;     // may be null
  const T* z;     // may be null
  const T* bias;  // may be null
  int64_t batch, dim, len, nstate, groups;
  bool softplus;
  // Element strides of u, delta, z (batch, dim, L) and B, C (batch, G, N, L) views, read by backward_block
  // (backward_row takes the contiguous layouts above).
  int64_t su[3], sdelta[3], sz[3], sB[4], sC[4];
  int64_t col_h;  // > 0: the column walk of Fwd::col_h (backward_block only)
};

template <typename T>
struct Grads {
  const T* dout;
  const T* dlast;  // may be null
  T* du;
  T* ddelta;
  T* dz;         // null when z is absent
  T* dA_rows;    // (batch, dim, N): per-row dA, summed over the batch by the caller
  T* dB_part;    // (batch, G, slices, L, N): per-slice dB, summed over slices by the caller
  T* dC_part;    // same layout as dB_part
  T* dD_rows;    // (batch, dim) or null
  T* dbias_rows; // (batch, dim) or null
  int64_t slices;
  // backward_block only: element strides of the dout, du, ddelta and dz views (batch, dim, L); whether du
  // and dz are added into (a u or z shared by several calls) instead of written; the factor on dout.
  int64_t sdout[3], sdu[3], sddelta[3], sdz[3];
  bool add_du, add_dz;
  T dout_scale;
};

// dt for steps [t0, t0 + n) of one row: delta (+ bias), softplus applied when asked; raw values optional.
// (Conditions are hoisted out of the loops so that each loop vectorises.)
template <typename T>
inline void chunk_dt(const Scan<T>& s, const T* __restrict__ delta, T bias, int64_t n, T* __restrict__ dt,
                     T* __restrict__ raw) {
  if (raw) {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) raw[t] = delta[t] + bias;
  }
  if (s.softplus) {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) dt[t] = softplus(delta[t] + bias);
  } else {
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) dt[t] = delta[t] + bias;
  }
}

// Decays a[t, n] = exp(dt[t] * A[n]) for one chunk, as one flat vectorisable loop.
template <typename T>
inline void chunk_decay(const T* __restrict__ dt, const T* __restrict__ Ad, int64_t n_steps, int64_t N,
                        T* __restrict__ a) {
  for (int64_t t = 0; t < n_steps; ++t) {
    const T dtt = dt[t];
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) a[t * N + n] = dtt * Ad[n];
  }
  const int64_t total = n_steps * N;
#pragma omp simd
  for (int64_t i = 0; i < total; ++i) a[i] = exp_fast(a[i]);
}

// Floats of per-thread workspace the backward row kernel needs.
inline int64_t backward_workspace(int64_t N, int64_t L) {
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  return 5 * kChunk + kChunk * N + (kChunk + 1) * N + chunks * N + 3 * N;
}

// In-register transpose of a W x W tile held in W vectors (W a power of 2), in log2(W) stages: stage s
// swaps the off-diagonal s x s blocks of every 2s x 2s block, one two-input shuffle per vector. Needs
// __builtin_shufflevector (Clang, GCC >= 12); other compilers use the element-by-element copies below.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define SS_HAVE_TRANSPOSE 1
template <int S, int W, bool High, int J>
constexpr int swap_index() {
  // Low row (bit S of the row clear): element j comes from itself, or from the high row at j - S.
  // High row: element j comes from the low row at j + S, or from itself.
  return High ? ((J & S) ? W + J : J + S) : ((J & S) ? W + (J - S) : J);
}
template <int S, typename V, int... J>
inline void swap_stage(V* r, std::integer_sequence<int, J...>) {
  constexpr int W = sizeof...(J);
  for (int i = 0; i < W; ++i) {
    if (i & S) continue;
    const V lo = r[i], hi = r[i + S];
    r[i] = __builtin_shufflevector(lo, hi, swap_index<S, W, false, J>()...);
    r[i + S] = __builtin_shufflevector(lo, hi, swap_index<S, W, true, J>()...);
  }
}
template <typename V, int S = sizeof(V) / sizeof(V{}[0]) / 2>
inline void transpose(V* r) {
  constexpr int W = sizeof(V) / sizeof(V{}[0]);
  swap_stage<S>(r, std::make_integer_sequence<int, W>{});
  if constexpr (S > 1) transpose<V, S / 2>(r);
}
#else
#define SS_HAVE_TRANSPOSE 0
#endif

// Reads steps [0, nt) of `lanes` adjacent channels of a (channel stride sd, step stride sl) view into
// buf[t] (lane c = channel c; missing lanes are 0). Token-major views (sd == 1) load whole vectors;
// channel-major ones (sl == 1) load W steps of each channel as one vector and transpose W x W tiles.
template <typename T, typename V>
inline void load_tile(const T* p, int64_t sd, int64_t sl, int lanes, int64_t nt, V* __restrict__ buf) {
  constexpr int W = sizeof(V) / sizeof(T);
  if (sd == 1 && lanes == W) {
    for (int64_t t = 0; t < nt; ++t) std::memcpy(&buf[t], p + t * sl, sizeof(V));
    return;
  }
  int64_t done = 0;
#if SS_HAVE_TRANSPOSE
  if (sl == 1 && lanes == W) {
    for (; done + W <= nt; done += W) {
      V* r = buf + done;
      for (int c = 0; c < W; ++c) std::memcpy(&r[c], p + c * sd + done, sizeof(V));
      transpose(r);
    }
  }
#endif
  if (done == nt) return;
  if (lanes < W)
    for (int64_t t = done; t < nt; ++t) buf[t] = V{};
  for (int c = 0; c < lanes; ++c) {
    const T* pc = p + c * sd;
    for (int64_t t = done; t < nt; ++t) buf[t][c] = pc[t * sl];
  }
}

// Asks for the cache lines load_tile will read, ahead of time: token-major rows are a page or more apart,
// which the hardware prefetchers do not follow.
template <typename T>
inline void prefetch_tile(const T* p, int64_t sd, int64_t sl, int lanes, int64_t nt) {
  constexpr int kLine = 64 / sizeof(T);
  if (sd == 1) {
    for (int64_t t = 0; t < nt; ++t) {
      __builtin_prefetch(p + t * sl);
      __builtin_prefetch(p + t * sl + lanes - 1);
    }
  } else if (sl == 1) {
    for (int c = 0; c < lanes; ++c)
      for (int64_t t = 0; t < nt + kLine - 1; t += kLine) __builtin_prefetch(p + c * sd + t);
  }
}

// The inverse of load_tile: writes buf[t]'s first `lanes` lanes to the strided view (buf is clobbered).
template <typename T, typename V>
inline void store_tile(V* __restrict__ buf, int lanes, int64_t nt, T* p, int64_t sd, int64_t sl) {
  constexpr int W = sizeof(V) / sizeof(T);
  if (sd == 1 && lanes == W) {
    for (int64_t t = 0; t < nt; ++t) std::memcpy(p + t * sl, &buf[t], sizeof(V));
    return;
  }
  int64_t done = 0;
#if SS_HAVE_TRANSPOSE
  if (sl == 1 && lanes == W) {
    for (; done + W <= nt; done += W) {
      V* r = buf + done;
      transpose(r);
      for (int c = 0; c < W; ++c) std::memcpy(p + c * sd + done, &r[c], sizeof(V));
    }
  }
#endif
  for (int c = 0; c < lanes; ++c) {
    T* pc = p + c * sd;
    for (int64_t t = done; t < nt; ++t) pc[t * sl] = buf[t][c];
  }
}

// load_tile / store_tile for steps that visit tokens tok[0..nt) (a column-major walk): p is the view at
// token 0, sl its token stride.
template <typename T, typename V>
inline void gather_tile(const T* p, int64_t sd, int64_t sl, int lanes, int64_t nt, const int64_t* tok,
                        V* __restrict__ buf) {
  constexpr int W = sizeof(V) / sizeof(T);
  if (sd == 1 && lanes == W) {
    for (int64_t t = 0; t < nt; ++t) std::memcpy(&buf[t], p + tok[t] * sl, sizeof(V));
    return;
  }
  if (lanes < W)
    for (int64_t t = 0; t < nt; ++t) buf[t] = V{};
  for (int c = 0; c < lanes; ++c)
    for (int64_t t = 0; t < nt; ++t) buf[t][c] = p[c * sd + tok[t] * sl];
}

template <typename T, typename V>
inline void scatter_tile(const V* __restrict__ buf, int lanes, int64_t nt, const int64_t* tok, T* p, int64_t sd,
                         int64_t sl) {
  constexpr int W = sizeof(V) / sizeof(T);
  if (sd == 1 && lanes == W) {
    for (int64_t t = 0; t < nt; ++t) std::memcpy(p + tok[t] * sl, &buf[t], sizeof(V));
    return;
  }
  for (int c = 0; c < lanes; ++c)
    for (int64_t t = 0; t < nt; ++t) p[c * sd + tok[t] * sl] = buf[t][c];
}

// The tokens that steps [t0, t0 + nt) of a scan over L tokens visit: in order, or (col_h > 0) along the
// column-major walk of the row-major (col_h, L / col_h) grid, step p visiting token
// (p % col_h) * (L / col_h) + p / col_h (VMamba's column directions; a reverse is the same walk over
// negated strides).
inline void walk_tokens(int64_t col_h, int64_t L, int64_t t0, int64_t nt, int64_t* tok) {
  for (int64_t t = 0; t < nt; ++t)
    tok[t] = col_h > 0 ? ((t0 + t) % col_h) * (L / col_h) + (t0 + t) / col_h : t0 + t;
}

// load_tile / store_tile for the steps [t0, t0 + nt) of walk_tokens: p is the view at token 0 (channel
// stride sd, token stride sl); gather_tile / scatter_tile along a column walk (col).
template <typename T, typename V>
inline void load_steps(const T* p, int64_t sd, int64_t sl, int lanes, int64_t t0, int64_t nt, bool col,
                       const int64_t* tok, V* buf) {
  if (col)
    gather_tile(p, sd, sl, lanes, nt, tok, buf);
  else
    load_tile(p + t0 * sl, sd, sl, lanes, nt, buf);
}
template <typename T, typename V>
inline void store_steps(V* buf, int lanes, int64_t t0, int64_t nt, bool col, const int64_t* tok, T* p,
                        int64_t sd, int64_t sl) {
  if (col)
    scatter_tile(buf, lanes, nt, tok, p, sd, sl);
  else
    store_tile(buf, lanes, nt, p + t0 * sl, sd, sl);
}

// The forward of blocks [blk0, blk1) of group g, batch b; a block is `W` adjacent channels (the group's
// last one may be partial), one per SIMD lane. The loop runs over chunks of kChunk steps, and inside a
// chunk over the blocks, so a token-major input is read row by row (the pages of a chunk's rows stay in
// the TLB) and a channel-major one as `W` streams per block. Per block, the N states live in N vectors
// between chunks (in registers during one for N = 1 and 16); every step does, per state, one vector exp and
// three multiply(-add)s, with no horizontal sum. u, delta and z are read a chunk at a time into (step,
// lane) tiles; dt, softplus, the D skip and the silu(z) gate run on whole vectors.
// With a dt_weight, the delta tile is computed from the low-rank input (rank multiply-adds per step).
// ws: (2 N + 2 + rank) vectors per block (A, h, D, delta_bias, dt_weight columns) and 5 kChunk vectors of
// tiles (delta, z, u, y, dt u).
template <typename T, int NS>
void forward_unit(const Fwd<T>& s, int64_t b, int64_t g, int64_t blk0, int64_t blk1,
                  typename Vec<T>::V* __restrict__ ws) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  const int64_t N = NS > 0 ? NS : s.nstate;
  const int64_t L = s.len, per_group = s.dim / s.groups, R = s.dt_weight ? s.rank : 0;
  const int64_t per_block = 2 * N + 2 + R;
  const int64_t nblk = blk1 - blk0;
  V* __restrict__ dt = ws + nblk * per_block;
  V* __restrict__ zz = dt + kChunk;
  V* __restrict__ uu = zz + kChunk;
  V* __restrict__ y = uu + kChunk;
  const auto first_channel = [&](int64_t k) { return g * per_group + (blk0 + k) * W; };
  const auto lanes_of = [&](int64_t k) {
    const int64_t rest = per_group - (blk0 + k) * W;
    return rest < W ? static_cast<int>(rest) : W;
  };
  for (int64_t k = 0; k < nblk; ++k) {
    V* st = ws + k * per_block;  // A[0..N), h[N..2N), D, delta_bias, dt_weight[.., 0..R)
    for (int64_t i = 0; i < per_block; ++i) st[i] = V{};
    const int64_t d0 = first_channel(k);
    for (int c = 0; c < lanes_of(k); ++c) {
      for (int64_t n = 0; n < N; ++n) st[n][c] = s.A[(d0 + c) * s.sA[0] + n * s.sA[1]] * T(kLog2e);
      if (s.D) st[2 * N][c] = s.D[d0 + c];
      if (s.bias) st[2 * N + 1][c] = s.bias[d0 + c];
      for (int64_t r = 0; r < R; ++r) st[2 * N + 2 + r][c] = s.dt_weight[(d0 + c) * R + r];
    }
  }
  const T* Bg = s.B + b * s.sB[0] + g * s.sB[1];
  const T* Cg = s.C + b * s.sC[0] + g * s.sC[1];
  const int64_t sBn = s.sB[2], sBl = s.sB[3], sCn = s.sC[2], sCl = s.sC[3];

  const bool col = s.col_h > 0;
  int64_t tok[kChunk];  // the token each step of the chunk visits
  for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
    const int64_t nt = L - t0 < kChunk ? L - t0 : kChunk;
    walk_tokens(s.col_h, L, t0, nt, tok);
    // Loads a (steps x lanes) tile of a (batch, dim, L) view at channel d of batch b.
    const auto tile_in = [&](const T* base, const int64_t* st, int64_t d, int lanes, V* buf) {
      load_steps(base + b * st[0] + d * st[1], st[1], st[2], lanes, t0, nt, col, tok, buf);
    };
    for (int64_t k = 0; k < nblk; ++k) {
      const int64_t d0 = first_channel(k);
      const int lanes = lanes_of(k);
      const V* __restrict__ A = ws + k * per_block;
      V* __restrict__ hs = ws + k * per_block + N;
      const V Dv = hs[N], bias = hs[N + 1];
      if (R > 0) {  // dt[t] = sum_r w[r] x[r, t]: the rank values of a step are read as broadcasts
        const V* __restrict__ wr = ws + k * per_block + 2 * N + 2;
        const T* x = s.delta + b * s.sdelta[0];
        for (int64_t t = 0; t < nt; ++t) {
          const T* xt = x + tok[t] * s.sdelta[2];
          V acc = wr[0] * xt[0];
          for (int64_t r = 1; r < R; ++r) acc += wr[r] * xt[r * s.sdelta[1]];
          dt[t] = acc;
        }
      } else {
        tile_in(s.delta, s.sdelta, d0, lanes, dt);
      }
      tile_in(s.u, s.su, d0, lanes, uu);
      {  // the next block's (or the next chunk's first block's) tiles load while this one computes
        const bool last_blk = k + 1 == nblk;
        const int64_t t1 = last_blk ? t0 + kChunk : t0, k1 = last_blk ? 0 : k + 1;
        const int64_t d1 = first_channel(k1), nt1 = L - t1 < kChunk ? L - t1 : kChunk;
        if (nt1 > 0 && !col) {
          if (R == 0)
            prefetch_tile(s.delta + b * s.sdelta[0] + d1 * s.sdelta[1] + t1 * s.sdelta[2], s.sdelta[1],
                        s.sdelta[2], lanes_of(k1), nt1);
          prefetch_tile(s.u + b * s.su[0] + d1 * s.su[1] + t1 * s.su[2], s.su[1], s.su[2], lanes_of(k1), nt1);
          if (s.z)
            prefetch_tile(s.z + b * s.sz[0] + d1 * s.sz[1] + t1 * s.sz[2], s.sz[1], s.sz[2], lanes_of(k1),
                          nt1);
        }
      }
      if (s.z) tile_in(s.z, s.sz, d0, lanes, zz);
      if (NS == 16) {
        // Step sizes first, then two passes over the chunk with 8 states each, so that the 8 state and
        // 8 A vectors stay in registers (measured 10-13% faster than one pass over 16 states).
        V* __restrict__ dtu = y + kChunk;
        for (int64_t t = 0; t < nt; ++t) {
          const V dtt = s.softplus ? softplus(dt[t] + bias) : dt[t] + bias;
          dt[t] = dtt;
          dtu[t] = dtt * uu[t];
          y[t] = Dv * uu[t];
        }
        for (int64_t n0 = 0; n0 < N; n0 += 8) {
          V h[8], a[8];
          for (int n = 0; n < 8; ++n) {
            h[n] = hs[n0 + n];
            a[n] = A[n0 + n];
          }
          for (int64_t t = 0; t < nt; ++t) {
            const T* Bt = Bg + tok[t] * sBl + n0 * sBn;
            const T* Ct = Cg + tok[t] * sCl + n0 * sCn;
            const V dtt = dt[t], dtut = dtu[t];
            V acc = y[t];
#pragma GCC unroll 8
            for (int n = 0; n < 8; ++n) {
              h[n] = exp2_decay(dtt * a[n]) * h[n] + dtut * Bt[n * sBn];
              acc += h[n] * Ct[n * sCn];
            }
            y[t] = acc;
          }
          for (int n = 0; n < 8; ++n) hs[n0 + n] = h[n];
        }
        if (s.z && !s.gate_sum)
          for (int64_t t = 0; t < nt; ++t) y[t] *= zz[t] * sigmoid(zz[t]);
      } else {
        V hloc[NS > 0 ? NS : 1];
        V* __restrict__ h = NS > 0 ? hloc : hs;
        if (NS > 0)
          for (int64_t n = 0; n < N; ++n) h[n] = hs[n];
        // Other N: one pass per step (step size, N state updates and readouts, D skip, gate).
        for (int64_t t = 0; t < nt; ++t) {
          const T* Bt = Bg + tok[t] * sBl;
          const T* Ct = Cg + tok[t] * sCl;
          const V dtt = s.softplus ? softplus(dt[t] + bias) : dt[t] + bias;
          const V dtut = dtt * uu[t];
          V acc = Dv * uu[t];
#pragma GCC unroll 16
          for (int64_t n = 0; n < N; ++n) {
            const V hn = exp2_decay(dtt * A[n]) * h[n] + dtut * Bt[n * sBn];
            h[n] = hn;
            acc += hn * Ct[n * sCn];
          }
          y[t] = s.z && !s.gate_sum ? acc * (zz[t] * sigmoid(zz[t])) : acc;
        }
        if (NS > 0)
          for (int64_t n = 0; n < N; ++n) hs[n] = h[n];
      }
      if (s.accumulate) {  // the u tile is free by now: it takes what earlier calls wrote
        tile_in(s.out, s.sout, d0, lanes, uu);
        for (int64_t t = 0; t < nt; ++t) y[t] += uu[t];
      }
      if (s.z && s.gate_sum)
        for (int64_t t = 0; t < nt; ++t) y[t] *= zz[t] * sigmoid(zz[t]) * s.scale;
      else if (s.scale != T(1))
        for (int64_t t = 0; t < nt; ++t) y[t] *= s.scale;
      T* const out = s.out + b * s.sout[0] + d0 * s.sout[1];
      store_steps(y, lanes, t0, nt, col, tok, out, s.sout[1], s.sout[2]);
    }
  }
  for (int64_t k = 0; k < nblk; ++k) {
    const V* hs = ws + k * per_block + N;
    for (int c = 0; c < lanes_of(k); ++c)
      for (int64_t n = 0; n < N; ++n) s.last[(b * s.dim + first_channel(k) + c) * N + n] = hs[n][c];
  }
}

// One row of the backward pass; dB/dC contributions are added into this row's slice buffers.
template <typename T>
void backward_row(const Scan<T>& s, const Grads<T>& gr, int64_t row, T* __restrict__ dB, T* __restrict__ dC,
                  T* ws) {
  const int64_t N = s.nstate;
  const int64_t L = s.len;
  const int64_t b = row / s.dim, d = row % s.dim;
  const int64_t g = d / (s.dim / s.groups);
  const T* __restrict__ u = s.u + row * L;
  const T* __restrict__ delta = s.delta + row * L;
  const T* __restrict__ z = s.z ? s.z + row * L : nullptr;
  const T* __restrict__ dout = gr.dout + row * L;
  const T* __restrict__ Bg = s.B + (b * s.groups + g) * L * N;
  const T* __restrict__ Cg = s.C + (b * s.groups + g) * L * N;
  const T* __restrict__ Ad = s.A + d * N;
  const T Dd = s.D ? s.D[d] : T(0);
  const T bias = s.bias ? s.bias[d] : T(0);
  T* __restrict__ du = gr.du + row * L;
  T* __restrict__ ddelta = gr.ddelta + row * L;
  T* __restrict__ dz = z ? gr.dz + row * L : nullptr;
  const int64_t chunks = (L + kChunk - 1) / kChunk;

  T* __restrict__ dt = ws;
  T* __restrict__ raw = dt + kChunk;
  T* __restrict__ y = raw + kChunk;
  T* __restrict__ dy = y + kChunk;
  T* __restrict__ ddt = dy + kChunk;
  T* __restrict__ a = ddt + kChunk;
  T* __restrict__ hs = a + kChunk * N;  // hs[(t + 1) * N + n] = state after step t; hs[n] = chunk start
  T* __restrict__ ckpt = hs + (kChunk + 1) * N;
  T* __restrict__ wvec = ckpt + chunks * N;
  T* __restrict__ h = wvec;
  T* __restrict__ G = wvec + N;  // a_{t+1} * g_{t+1}: the adjoint carried into step t
  T* __restrict__ dA = wvec + 2 * N;

  // Pass 1: the state entering every chunk.
  for (int64_t n = 0; n < N; ++n) h[n] = T(0);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t t0 = c * kChunk;
    const int64_t n_steps = L - t0 < kChunk ? L - t0 : kChunk;
    for (int64_t n = 0; n < N; ++n) ckpt[c * N + n] = h[n];
    if (c == chunks - 1) break;  // the last chunk's end state is not needed
    chunk_dt(s, delta + t0, bias, n_steps, dt, static_cast<T*>(nullptr));
    chunk_decay(dt, Ad, n_steps, N, a);
    for (int64_t t = 0; t < n_steps; ++t) {
      const T* __restrict__ Bt = Bg + (t0 + t) * N;
      const T* __restrict__ at = a + t * N;
      const T dtu = dt[t] * u[t0 + t];
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) h[n] = at[n] * h[n] + dtu * Bt[n];
    }
  }

  // Pass 2: chunks in reverse; recompute the chunk's states, then run the adjoint through it.
  for (int64_t n = 0; n < N; ++n) {
    G[n] = gr.dlast ? gr.dlast[row * N + n] : T(0);
    dA[n] = T(0);
  }
  T dD_acc = T(0), dbias_acc = T(0);
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk;
    const int64_t n_steps = L - t0 < kChunk ? L - t0 : kChunk;
    chunk_dt(s, delta + t0, bias, n_steps, dt, raw);
    chunk_decay(dt, Ad, n_steps, N, a);
    for (int64_t n = 0; n < N; ++n) h[n] = hs[n] = ckpt[c * N + n];
    for (int64_t t = 0; t < n_steps; ++t) {
      const T* __restrict__ Bt = Bg + (t0 + t) * N;
      const T* __restrict__ Ct = Cg + (t0 + t) * N;
      const T* __restrict__ at = a + t * N;
      T* __restrict__ hn = hs + (t + 1) * N;
      const T dtu = dt[t] * u[t0 + t];
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t n = 0; n < N; ++n) {
        const T v = at[n] * h[n] + dtu * Bt[n];  // the running state stays in h, hs is a copy
        h[n] = v;
        hn[n] = v;
        acc += Ct[n] * v;
      }
      y[t] = acc;
    }
    // Output gate and skip term: dy = d(out)/d(y), dz, and dD.
    if (z) {
#pragma omp simd
      for (int64_t t = 0; t < n_steps; ++t) {
        const T zt = z[t0 + t], dot = dout[t0 + t];
        const T sg = sigmoid(zt);
        dz[t0 + t] = dot * (y[t] + Dd * u[t0 + t]) * sg * (T(1) + zt * (T(1) - sg));
        dy[t] = dot * zt * sg;
      }
    } else {
#pragma omp simd
      for (int64_t t = 0; t < n_steps; ++t) dy[t] = dout[t0 + t];
    }
#pragma omp simd reduction(+ : dD_acc)
    for (int64_t t = 0; t < n_steps; ++t) dD_acc += dy[t] * u[t0 + t];
    // dC[t, n] += dy[t] * h_t[n] (the adjoint of the readout).
    for (int64_t t = 0; t < n_steps; ++t) {
      const T dyt = dy[t];
      const T* __restrict__ ht = hs + (t + 1) * N;
      T* __restrict__ dCt = dC + (t0 + t) * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) dCt[n] += dyt * ht[n];
    }
    // Adjoint recurrence: g_t = dy_t C_t + a_{t+1} g_{t+1}.
    for (int64_t t = n_steps - 1; t >= 0; --t) {
      const T* __restrict__ Bt = Bg + (t0 + t) * N;
      const T* __restrict__ Ct = Cg + (t0 + t) * N;
      const T* __restrict__ at = a + t * N;
      const T* __restrict__ hp = hs + t * N;
      T* __restrict__ dBt = dB + (t0 + t) * N;
      const T dtt = dt[t], ut = u[t0 + t], dyt = dy[t];
      const T dtu = dtt * ut;
      T sgB = T(0), sqA = T(0);
#pragma omp simd reduction(+ : sgB, sqA)
      for (int64_t n = 0; n < N; ++n) {
        const T gn = G[n] + dyt * Ct[n];
        dBt[n] += gn * dtu;
        sgB += gn * Bt[n];
        const T q = gn * hp[n] * at[n];  // gradient w.r.t. dt * A[n]
        sqA += q * Ad[n];
        dA[n] += q * dtt;
        G[n] = at[n] * gn;
      }
      du[t0 + t] = dyt * Dd + sgB * dtt;
      ddt[t] = sqA + sgB * ut;
    }
    if (s.softplus) {
#pragma omp simd
      for (int64_t t = 0; t < n_steps; ++t) ddt[t] *= sigmoid(raw[t]);
    }
#pragma omp simd reduction(+ : dbias_acc)
    for (int64_t t = 0; t < n_steps; ++t) {
      ddelta[t0 + t] = ddt[t];
      dbias_acc += ddt[t];
    }
  }
  for (int64_t n = 0; n < N; ++n) gr.dA_rows[row * N + n] = dA[n];
  if (gr.dD_rows) gr.dD_rows[row] = dD_acc;
  if (gr.dbias_rows) gr.dbias_rows[row] = dbias_acc;
}

// ---------------------------------------------------------------------------------------------------
// The float backward for N = 1 and 16, vectorised over channels like the forward: lane c of every vector is
// channel d0 + c, so the readout, du, ddelta and dz need no horizontal sums, and the state, adjoint and dA
// of a block live in vectors (two passes of 8 states, so that they and A stay in registers). Only dB and dC
// sum over channels: each block adds into per-lane partial sums (L x N vectors per unit, in scan order),
// reduced once per unit. The steps are those of backward_row (pass 1: the state entering every chunk;
// pass 2, chunks in reverse: recompute the chunk's states and decays, then run the adjoint through it),
// with the forward's decays 2^(dt * A log2 e), and the forward's column walk when s.col_h > 0.

// Vectors of per-thread workspace backward_block needs for sequences of length L.
inline int64_t backward_block_workspace(int64_t L, int64_t N) {
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  return chunks * N + (2 * kChunk + 1) * N + 10 * kChunk + 2 * L * N;
}

inline float lane_sum(VF v) {
  float acc = 0.0f;
  for (int c = 0; c < Vec<float>::W; ++c) acc += v[c];
  return acc;
}

// The backward of channels [d0, d0 + lanes) of batch b (lanes <= W); dBv, dCv: the unit's partial sums.
template <int N>
void backward_block(const Scan<float>& s, const Grads<float>& gr, int64_t b, int64_t d0, int lanes, VF* ws,
                    VF* __restrict__ dBv, VF* __restrict__ dCv) {
  constexpr int H = N < 8 ? N : 8;
  const int64_t L = s.len, chunks = (L + kChunk - 1) / kChunk;
  const int64_t g = d0 / (s.dim / s.groups), row0 = b * s.dim + d0;
  const float* Bg = s.B + b * s.sB[0] + g * s.sB[1];
  const float* Cg = s.C + b * s.sC[0] + g * s.sC[1];
  const int64_t sBn = s.sB[2], sBl = s.sB[3], sCn = s.sC[2], sCl = s.sC[3];
  VF* __restrict__ ckpt = ws;                 // ckpt[c * N + n]: state n entering chunk c
  VF* __restrict__ hs = ckpt + chunks * N;    // hs[(t + 1) * N + n]: state after step t of the chunk
  VF* __restrict__ a = hs + (kChunk + 1) * N; // a[t * N + n]: decay of step t
  VF* __restrict__ uu = a + kChunk * N;
  VF* __restrict__ dt = uu + kChunk;  // the steps, then d(delta)
  VF* __restrict__ raw = dt + kChunk; // delta + bias (for softplus')
  VF* __restrict__ dtu = raw + kChunk;
  VF* __restrict__ zz = dtu + kChunk;
  VF* __restrict__ dy = zz + kChunk;  // d(out), then d(y)
  VF* __restrict__ y = dy + kChunk;
  VF* __restrict__ sgB = y + kChunk;  // sum_n g_n B_n
  VF* __restrict__ sqA = sgB + kChunk;  // sum_n q_n A_n
  VF* __restrict__ tmp = sqA + kChunk;  // du, dz on their way out

  VF A2[N], Ar[N], G[N], dA[N], hcur[N];  // A log2(e), A, adjoint, dA, running state
  VF Dv{}, biasv{};
  for (int n = 0; n < N; ++n) Ar[n] = A2[n] = G[n] = dA[n] = hcur[n] = VF{};
  for (int c = 0; c < lanes; ++c) {
    for (int n = 0; n < N; ++n) {
      Ar[n][c] = s.A[(d0 + c) * N + n];
      A2[n][c] = Ar[n][c] * float(kLog2e);
      if (gr.dlast) G[n][c] = gr.dlast[(row0 + c) * N + n];
    }
    if (s.D) Dv[c] = s.D[d0 + c];
    if (s.bias) biasv[c] = s.bias[d0 + c];
  }
  const bool col = s.col_h > 0;
  int64_t tok[kChunk];  // the token each step of the current chunk visits
  const auto load = [&](const float* base, const int64_t* st, int64_t t0, int64_t nt, VF* buf) {
    load_steps(base + b * st[0] + d0 * st[1], st[1], st[2], lanes, t0, nt, col, tok, buf);
  };
  // Writes buf (clobbered) to the view, or adds it to what the view holds (using `scratch`).
  const auto store = [&](VF* buf, float* base, const int64_t* st, bool add, VF* scratch, int64_t t0,
                         int64_t nt) {
    if (add) {
      load(base, st, t0, nt, scratch);
      for (int64_t t = 0; t < nt; ++t) buf[t] += scratch[t];
    }
    store_steps(buf, lanes, t0, nt, col, tok, base + b * st[0] + d0 * st[1], st[1], st[2]);
  };
  const auto steps = [&](int64_t t0, int64_t nt) {  // the walk, dt, raw and dt * u of one chunk
    walk_tokens(s.col_h, L, t0, nt, tok);
    load(s.delta, s.sdelta, t0, nt, dt);
    load(s.u, s.su, t0, nt, uu);
    for (int64_t t = 0; t < nt; ++t) {
      const VF r = dt[t] + biasv;
      raw[t] = r;
      dt[t] = s.softplus ? softplus(r) : r;
      dtu[t] = dt[t] * uu[t];
    }
  };

  // Pass 1: the state entering every chunk.
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t t0 = c * kChunk, nt = L - t0 < kChunk ? L - t0 : kChunk;
    for (int n = 0; n < N; ++n) ckpt[c * N + n] = hcur[n];
    if (c == chunks - 1) break;
    steps(t0, nt);
    for (int h0 = 0; h0 < N; h0 += H) {
      VF h[H], a2[H];
      for (int n = 0; n < H; ++n) h[n] = hcur[h0 + n], a2[n] = A2[h0 + n];
      for (int64_t t = 0; t < nt; ++t) {
        const float* Bt = Bg + tok[t] * sBl + h0 * sBn;
        for (int n = 0; n < H; ++n) h[n] = exp2_decay(dt[t] * a2[n]) * h[n] + dtu[t] * Bt[n * sBn];
      }
      for (int n = 0; n < H; ++n) hcur[h0 + n] = h[n];
    }
  }

  // Pass 2: chunks in reverse.
  VF dD{}, dbias{};
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, nt = L - t0 < kChunk ? L - t0 : kChunk;
    steps(t0, nt);
    load(gr.dout, gr.sdout, t0, nt, dy);
    if (gr.dout_scale != 1.0f)
      for (int64_t t = 0; t < nt; ++t) dy[t] *= gr.dout_scale;
    if (s.z) load(s.z, s.sz, t0, nt, zz);
    // The chunk's states, decays and readout.
    for (int64_t t = 0; t < nt; ++t) y[t] = VF{};
    for (int h0 = 0; h0 < N; h0 += H) {
      VF h[H], a2[H];
      for (int n = 0; n < H; ++n) h[n] = hs[h0 + n] = ckpt[c * N + h0 + n], a2[n] = A2[h0 + n];
      for (int64_t t = 0; t < nt; ++t) {
        const float* Bt = Bg + tok[t] * sBl + h0 * sBn;
        const float* Ct = Cg + tok[t] * sCl + h0 * sCn;
        VF acc = y[t];
        for (int n = 0; n < H; ++n) {
          const VF e = exp2_decay(dt[t] * a2[n]);
          a[t * N + h0 + n] = e;
          h[n] = e * h[n] + dtu[t] * Bt[n * sBn];
          hs[(t + 1) * N + h0 + n] = h[n];
          acc += h[n] * Ct[n * sCn];
        }
        y[t] = acc;
      }
    }
    // Output gate and skip term: dz, dy = d(out)/d(y), dD.
    if (s.z) {
      for (int64_t t = 0; t < nt; ++t) {
        const VF sg = sigmoid(zz[t]);
        tmp[t] = dy[t] * (y[t] + Dv * uu[t]) * sg * (1.0f + zz[t] * (1.0f - sg));
        dy[t] = dy[t] * zz[t] * sg;
      }
      store(tmp, gr.dz, gr.sdz, gr.add_dz, y, t0, nt);  // y is free by now
    }
    for (int64_t t = 0; t < nt; ++t) dD += dy[t] * uu[t];
    // dC[t, n] += sum over channels of dy[t] h_t[n], per lane here.
    for (int64_t t = 0; t < nt; ++t) {
      VF* dCt = dCv + (t0 + t) * N;
      for (int n = 0; n < N; ++n) dCt[n] += dy[t] * hs[(t + 1) * N + n];
    }
    // Adjoint recurrence g_t = dy_t C_t + a_{t+1} g_{t+1}, and what it feeds.
    for (int64_t t = 0; t < nt; ++t) sgB[t] = sqA[t] = VF{};
    for (int h0 = 0; h0 < N; h0 += H) {
      VF gc[H], da[H], ar[H];
      for (int n = 0; n < H; ++n) gc[n] = G[h0 + n], da[n] = dA[h0 + n], ar[n] = Ar[h0 + n];
      for (int64_t t = nt - 1; t >= 0; --t) {
        const float* Bt = Bg + tok[t] * sBl + h0 * sBn;
        const float* Ct = Cg + tok[t] * sCl + h0 * sCn;
        const VF* at = a + t * N + h0;
        const VF* hp = hs + t * N + h0;
        VF* dBt = dBv + (t0 + t) * N + h0;
        const VF dyt = dy[t], dtut = dtu[t], dtt = dt[t];
        VF sb = sgB[t], sq = sqA[t];
        for (int n = 0; n < H; ++n) {
          const VF gn = gc[n] + dyt * Ct[n * sCn];
          dBt[n] += gn * dtut;
          sb += gn * Bt[n * sBn];
          const VF q = gn * hp[n] * at[n];  // gradient w.r.t. dt * A[n]
          sq += q * ar[n];
          da[n] += q * dtt;
          gc[n] = at[n] * gn;
        }
        sgB[t] = sb;
        sqA[t] = sq;
      }
      for (int n = 0; n < H; ++n) G[h0 + n] = gc[n], dA[h0 + n] = da[n];
    }
    for (int64_t t = 0; t < nt; ++t) {
      tmp[t] = dy[t] * Dv + sgB[t] * dt[t];
      VF ddt = sqA[t] + sgB[t] * uu[t];
      if (s.softplus) ddt *= sigmoid(raw[t]);
      dbias += ddt;
      dt[t] = ddt;
    }
    store(tmp, gr.du, gr.sdu, gr.add_du, raw, t0, nt);  // raw is free by now
    store(dt, gr.ddelta, gr.sddelta, false, nullptr, t0, nt);
  }
  for (int c = 0; c < lanes; ++c) {
    for (int n = 0; n < N; ++n) gr.dA_rows[(row0 + c) * N + n] = dA[n][c];
    if (gr.dD_rows) gr.dD_rows[row0 + c] = dD[c];
    if (gr.dbias_rows) gr.dbias_rows[row0 + c] = dbias[c];
  }
}

// Runs body(unit, ws) for units [0, n) on nt threads (one unit at a time, dynamically), each thread with its
// own workspace `ws` of ws_vectors aligned V (malloc only promises alignment for scalar types, so one more
// is allocated). -1 when a workspace could not be allocated.
template <typename V, typename Body>
int run_units(int nt, int64_t n, int64_t ws_vectors, const Body& body) {
  int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
  {
    void* raw = std::malloc(sizeof(V) * (ws_vectors + 1));
    V* ws = reinterpret_cast<V*>((reinterpret_cast<uintptr_t>(raw) + sizeof(V) - 1) / sizeof(V) * sizeof(V));
    if (!raw) failed = 1;
#pragma omp for schedule(dynamic, 1)
    for (int64_t unit = 0; unit < n; ++unit)
      if (raw) body(unit, ws);
    std::free(raw);
  }
  return failed ? -1 : 0;
}

// backward_impl for float and N = 1 or 16: the same work units, each a run of blocks.
template <int N>
int backward_impl_blocks(const Scan<float>& s, const Grads<float>& gr, int nthreads) {
  constexpr int W = Vec<float>::W;
  const int64_t per_group = s.dim / s.groups, L = s.len;
  const int64_t ws_vectors = backward_block_workspace(L, N), units = s.batch * s.groups * gr.slices;
  return run_units<VF>(usable_threads(nthreads), units, ws_vectors, [&](int64_t unit, VF* ws) {
    const int64_t slice = unit % gr.slices, bg = unit / gr.slices;
    const int64_t b = bg / s.groups, g = bg % s.groups;
    const int64_t first = g * per_group + slice * per_group / gr.slices;
    const int64_t end = g * per_group + (slice + 1) * per_group / gr.slices;
    VF* dBv = ws + (ws_vectors - 2 * L * N);
    VF* dCv = dBv + L * N;
    for (int64_t i = 0; i < 2 * L * N; ++i) dBv[i] = VF{};
    for (int64_t d0 = first; d0 < end; d0 += W)
      backward_block<N>(s, gr, b, d0, end - d0 < W ? static_cast<int>(end - d0) : W, ws, dBv, dCv);
    float* dB = gr.dB_part + unit * L * N;
    float* dC = gr.dC_part + unit * L * N;
    for (int64_t i = 0; i < L * N; ++i) {
      dB[i] = lane_sum(dBv[i]);
      dC[i] = lane_sum(dCv[i]);
    }
  });
}

// Work units are (batch, group, slice): a slice is a run of blocks of one group, and there are about 4
// units per thread (or one slice per group when that is enough).
template <typename T, int NS>
int forward_impl(const Fwd<T>& s, int nthreads) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::W;
  const int64_t blocks = (s.dim / s.groups + W - 1) / W;
  const int nt = usable_threads(nthreads);
  const int64_t pairs = s.batch * s.groups;
  int64_t slices = pairs >= nt ? 1 : (4 * nt + pairs - 1) / pairs;
  slices = slices < blocks ? slices : blocks;
  const int64_t per_slice = (blocks + slices - 1) / slices;
  const int64_t ws_vectors = per_slice * (2 * s.nstate + 2 + (s.dt_weight ? s.rank : 0)) + 5 * kChunk;
  return run_units<V>(nt, pairs * slices, ws_vectors, [&](int64_t unit, V* ws) {
    const int64_t bg = unit / slices, blk0 = (unit % slices) * per_slice;
    const int64_t blk1 = blk0 + per_slice < blocks ? blk0 + per_slice : blocks;
    if (blk0 < blk1) forward_unit<T, NS>(s, bg / s.groups, bg % s.groups, blk0, blk1, ws);
  });
}

// ss_backward_*: the per-row loop (float with N other than 1 and 16, which run backward_block through
// ss_backward_views_f32; double, for gradient checks). Work units are (batch, group, slice): the slice
// splits a group's channels so that there are enough units for the threads, and each unit owns its own
// dB/dC buffer, so no two threads ever add into the same place.
template <typename T>
int backward_impl(const Scan<T>& s, const Grads<T>& gr, int nthreads) {
  const int64_t per_group = s.dim / s.groups;
  const int64_t units = s.batch * s.groups * gr.slices;
  const int64_t part = s.len * s.nstate;
  const int64_t ws_size = backward_workspace(s.nstate, s.len);
  const int nt = usable_threads(nthreads);
  T* ws_all = static_cast<T*>(std::malloc(sizeof(T) * ws_size * nt));
  if (!ws_all) return -1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t unit = 0; unit < units; ++unit) {
    T* ws = ws_all + thread_index() * ws_size;
    const int64_t slice = unit % gr.slices;
    const int64_t bg = unit / gr.slices;  // b * groups + g
    const int64_t b = bg / s.groups, g = bg % s.groups;
    const int64_t first = g * per_group + slice * per_group / gr.slices;
    const int64_t end = g * per_group + (slice + 1) * per_group / gr.slices;
    for (int64_t d = first; d < end; ++d)
      backward_row(s, gr, b * s.dim + d, gr.dB_part + unit * part, gr.dC_part + unit * part, ws);
  }
  std::free(ws_all);
  return 0;
}

// Fixed state sizes get their own compiled loops (the state then lives in registers); others run generic.
int forward_dispatch(const Fwd<float>& s, int nthreads) {
  switch (s.nstate) {
    case 1: return forward_impl<float, 1>(s, nthreads);
    case 16: return forward_impl<float, 16>(s, nthreads);
    default: return forward_impl<float, 0>(s, nthreads);
  }
}

// Double precision is for gradient checks, not speed: one generic instantiation keeps the build short.
int forward_dispatch(const Fwd<double>& s, int nthreads) { return forward_impl<double, 0>(s, nthreads); }

// ---------------------------------------------------------------------------------------------------
// Vim's two depthwise causal convolutions of one token-major sequence (+ SiLU), for inference. x is
// (batch, L, C) with strides (sxb, sxl, 1) (a slice of in_proj's output is read in place); w (2, k, C) and
// bias (2, C) are contiguous; out (batch, L, 2C) is contiguous and token-major, as x_proj and the scan read it:
//   out[b, t, c]     = act(bias[0, c] + sum_j w[0, j, c] x[b, t - (k - 1) + j, c])   (causal)
//   out[b, t, C + c] = act(bias[1, c] + sum_j w[1, j, c] x[b, t + (k - 1) - j, c])   (causal over the
//                                                                                      reversed sequence)
// with x = 0 outside [0, L). One output row is a few whole-vector multiply-adds per W channels, so the op
// runs at memory speed; rows run in parallel.
void conv_row(const float* __restrict__ xb, int64_t sxl, const float* __restrict__ w,
              const float* __restrict__ bias, float* __restrict__ out, int64_t t, int64_t L, int64_t C,
              int64_t k, bool silu) {
  constexpr int W = Vec<float>::W;
  for (int dir = 0; dir < 2; ++dir) {
    const float* __restrict__ wd = w + dir * k * C;
    float* __restrict__ o = out + dir * C;
    // The taps that fall inside the sequence: src = t + step * (j - (k - 1)), step = +1 or -1.
    int64_t j0 = 0, j1 = k;
    if (dir == 0 && t - (k - 1) < 0) j0 = (k - 1) - t;
    if (dir == 1 && t + (k - 1) > L - 1) j0 = t + (k - 1) - (L - 1);
    const auto src = [&](int64_t j) { return dir == 0 ? t - (k - 1) + j : t + (k - 1) - j; };
    int64_t c = 0;
    for (; c + W <= C; c += W) {
      VF acc{};
      if (bias) std::memcpy(&acc, bias + dir * C + c, sizeof(VF));
      for (int64_t j = j0; j < j1; ++j) {
        VF wv, xv;
        std::memcpy(&wv, wd + j * C + c, sizeof(VF));
        std::memcpy(&xv, xb + src(j) * sxl + c, sizeof(VF));
        acc += wv * xv;
      }
      if (silu) acc = acc * sigmoid(acc);
      std::memcpy(o + c, &acc, sizeof(VF));
    }
    for (; c < C; ++c) {
      float acc = bias ? bias[dir * C + c] : 0.0f;
      for (int64_t j = j0; j < j1; ++j) acc += wd[j * C + c] * xb[src(j) * sxl + c];
      o[c] = silu ? acc * sigmoid(acc) : acc;
    }
  }
}

// Rows [row0, row1) of the (batch * L) output rows.
__attribute__((noinline)) void conv_rows(const float* x, int64_t sxb, int64_t sxl, const float* w,
                                         const float* bias, float* out, int64_t row0, int64_t row1, int64_t L,
                                         int64_t C, int64_t k, bool silu) {
  for (int64_t row = row0; row < row1; ++row)
    conv_row(x + (row / L) * sxb, sxl, w, bias, out + row * 2 * C, row % L, L, C, k, silu);
}

// Backward of the convolutions, pass 1, rows [row0, row1): g = dout * act'(pre-activation) into g (the
// pre-activations are recomputed by conv_row), and this thread's sums of the tap gradients
// dw[d, j, c] += g_d[t, c] x[src_d(t, j), c] and of the bias gradients db[d, c] += g_d[t, c].
__attribute__((noinline)) void conv_grad_rows(const float* x, int64_t sxb, int64_t sxl, const float* w,
                                              const float* bias, const float* dout, float* g, float* dw,
                                              float* db, int64_t row0, int64_t row1, int64_t L, int64_t C,
                                              int64_t k, bool silu) {
  constexpr int W = Vec<float>::W;
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t t = row % L;
    const float* xb = x + (row / L) * sxb;
    float* __restrict__ gr = g + row * 2 * C;
    const float* __restrict__ dr = dout + row * 2 * C;
    conv_row(xb, sxl, w, bias, gr, t, L, C, k, false);
    int64_t i = 0;
    for (; i + W <= 2 * C; i += W) {
      VF a, d;
      std::memcpy(&a, gr + i, sizeof(VF));
      std::memcpy(&d, dr + i, sizeof(VF));
      if (silu) {
        const VF sg = sigmoid(a);
        d = d * sg * (1.0f + a * (1.0f - sg));
      }
      std::memcpy(gr + i, &d, sizeof(VF));
    }
    for (; i < 2 * C; ++i) {
      const float sg = sigmoid(gr[i]);
      gr[i] = silu ? dr[i] * sg * (1.0f + gr[i] * (1.0f - sg)) : dr[i];
    }
    for (int dir = 0; dir < 2; ++dir) {
      const float* __restrict__ gd = gr + dir * C;
      float* __restrict__ dbd = db + dir * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dbd[c] += gd[c];
      for (int64_t j = 0; j < k; ++j) {
        const int64_t src = dir == 0 ? t - (k - 1) + j : t + (k - 1) - j;
        if (src < 0 || src >= L) continue;
        const float* __restrict__ xs = xb + src * sxl;
        float* __restrict__ dwj = dw + (dir * k + j) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dwj[c] += gd[c] * xs[c];
      }
    }
  }
}

// Pass 2, rows [row0, row1) of dx (batch, L, C) contiguous: the transposed convolutions of g,
// dx[s, c] = sum_j w[0, j, c] g_0[s + (k-1) - j, c] + w[1, j, c] g_1[s - (k-1) + j, c].
__attribute__((noinline)) void conv_dx_rows(const float* g, const float* w, float* dx, int64_t row0, int64_t row1,
                                            int64_t L, int64_t C, int64_t k) {
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t s = row % L;
    const float* gb = g + (row - s) * 2 * C;  // row 0 of this batch element
    float* __restrict__ o = dx + row * C;
    for (int64_t c = 0; c < C; ++c) o[c] = 0.0f;
    for (int dir = 0; dir < 2; ++dir)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t t = dir == 0 ? s + (k - 1) - j : s - (k - 1) + j;
        if (t < 0 || t >= L) continue;
        const float* __restrict__ gt = gb + t * 2 * C + dir * C;
        const float* __restrict__ wj = w + (dir * k + j) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] += wj[c] * gt[c];
      }
  }
}

// Rows [row, row + MR) of Vim's x_proj (xproj_rows): MR x NV accumulator vectors in registers; each channel
// is NV vector loads of wt and MR broadcasts of u, MR x NV multiply-adds.
template <int NV, int MR>
inline void xproj_block(const float* __restrict__ u, int64_t su, const float* __restrict__ wt,
                        float* __restrict__ out, int64_t row, int64_t E) {
  constexpr int W = Vec<float>::W;
  constexpr int64_t P = NV * W;
  VF acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = VF{};
  const float* ur = u + row * su;
  for (int64_t c = 0; c < E; ++c) {
    VF w[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&w[v], wt + c * P + v * W, sizeof(VF));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const float x = ur[r * su + c];
      for (int v = 0; v < NV; ++v) acc[r][v] += x * w[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(out + (row + r) * P + v * W, &acc[r][v], sizeof(VF));
}

// Vim's x_proj for inference: rows [row0, row1) of out (rows, NV W) = u (rows, E; row stride su) @ wt
// (E, NV W), wt packed and zero-padded by the caller, in blocks of as many rows as the registers hold
// accumulators for, the rest one row at a time.
// Vim-Ti at 512: 0.8 ms for both directions (2 x 1025 x 384 -> 48), about the core's multiply-add peak, against
// 1.0 ms for MKL's batched GEMM.
template <int NV>
void xproj_rows(const float* __restrict__ u, int64_t su, const float* __restrict__ wt, float* __restrict__ out,
                int64_t row0, int64_t row1, int64_t E) {
  constexpr int W = Vec<float>::W;
  constexpr int kRegs = W == 16 ? 24 : 12;  // accumulators that leave room for the loads (32 or 16 registers)
  constexpr int MR = kRegs / NV < 1 ? 1 : kRegs / NV > 8 ? 8 : kRegs / NV;
  int64_t row = row0;
  for (; row + MR <= row1; row += MR) xproj_block<NV, MR>(u, su, wt, out, row, E);
  for (; row < row1; ++row) xproj_block<NV, 1>(u, su, wt, out, row, E);
}

// The widest x_proj output the mixer entry takes, in vectors (Vim-B: R + 2N = 80 floats, 5 AVX-512 vectors).
constexpr int kMaxProjVectors = 12;

void xproj_dispatch(int nv, const float* u, int64_t su, const float* wt, float* out, int64_t row0, int64_t row1,
                    int64_t E) {
  switch (nv) {
#define SS_XPROJ_CASE(n) \
  case n: return xproj_rows<n>(u, su, wt, out, row0, row1, E);
    SS_XPROJ_CASE(1) SS_XPROJ_CASE(2) SS_XPROJ_CASE(3) SS_XPROJ_CASE(4) SS_XPROJ_CASE(5) SS_XPROJ_CASE(6)
    SS_XPROJ_CASE(7) SS_XPROJ_CASE(8) SS_XPROJ_CASE(9) SS_XPROJ_CASE(10) SS_XPROJ_CASE(11) SS_XPROJ_CASE(12)
#undef SS_XPROJ_CASE
    default: return;
  }
}

bool valid(int64_t batch, int64_t dim, int64_t len, int64_t nstate, int64_t groups, int nthreads) {
  return batch >= 0 && dim > 0 && len > 0 && nstate > 0 && groups > 0 && dim % groups == 0 && nthreads > 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// C entry points (ctypes). Return 0 on success, -1 when a per-thread buffer could not be allocated and
// -2 for inconsistent sizes.

#define SS_DEFINE(suffix, T)                                                                              \
  SS_EXPORT int ss_forward_##suffix(const T* u, const T* delta, const T* A, const T* B, const T* C,        \
                                    const T* D, const T* z, const T* bias, const T* dt_weight,            \
                                    int64_t rank, int64_t col_h, T* out, T* last, const int64_t* sizes,   \
                                    const int64_t* strides, int softplus, int accumulate, int gate_sum,   \
                                    double scale, int nthreads) {                                         \
    Fwd<T> s{u,        delta,    A,        B,        C,        D,         z,    bias, out,                 \
             last,     sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], dt_weight, rank, col_h};          \
    if ((dt_weight && rank < 1) || col_h < 0 || (col_h > 0 && s.len % col_h)) return -2;                  \
    int64_t* const views[] = {s.su, s.sdelta, s.sz, s.sout, s.sB, s.sC, s.sA};                            \
    const int ranks[] = {3, 3, 3, 3, 4, 4, 2};                                                            \
    for (int v = 0, k = 0; v < 7; ++v)                                                                    \
      for (int i = 0; i < ranks[v]; ++i) views[v][i] = strides[k++];                                     \
    s.softplus = softplus != 0;                                                                           \
    s.accumulate = accumulate != 0;                                                                       \
    s.gate_sum = gate_sum != 0;                                                                           \
    s.scale = static_cast<T>(scale);                                                                      \
    if (!valid(s.batch, s.dim, s.len, s.nstate, s.groups, nthreads)) return -2;                           \
    return forward_dispatch(s, nthreads);                                                                 \
  }                                                                                                       \
  SS_EXPORT int ss_backward_##suffix(                                                                     \
      const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* z,              \
      const T* bias, const T* dout, const T* dlast, T* du, T* ddelta, T* dz, T* dA_rows, T* dB_part,      \
      T* dC_part, T* dD_rows, T* dbias_rows, int64_t batch, int64_t dim, int64_t len, int64_t nstate,     \
      int64_t groups, int64_t slices, int softplus, int nthreads) {                                        \
    const Scan<T> s{u, delta, A, B, C, D, z, bias, batch, dim, len, nstate, groups, softplus != 0};       \
    const Grads<T> gr{dout, dlast, du, ddelta, dz, dA_rows, dB_part, dC_part, dD_rows, dbias_rows, slices}; \
    if (!valid(batch, dim, len, nstate, groups, nthreads) || slices < 1 || slices > dim / groups)          \
      return -2;                                                                                          \
    return backward_impl(s, gr, nthreads);                                                                \
  }

SS_DEFINE(f32, float)
SS_DEFINE(f64, double)

// The float32 backward for N = 1 or 16 on strided views (backward_block): u, delta, z, dout, du, ddelta, dz
// (batch, dim, L) and B, C (batch, G, N, L), strides in that
// order in `strides` (7 x 3 + 2 x 4), any sign (a reversed direction's views start at token L - 1); col_h > 0
// walks the (col_h, L / col_h) grid column by column, as the forward. add_du / add_dz add into du / dz;
// dout is multiplied by dout_scale. dB_part, dC_part are in scan order. The rest as ss_backward_f32.
// sizes: batch, dim, L, N, groups, slices.
SS_EXPORT int ss_backward_views_f32(const float* u, const float* delta, const float* A, const float* B,
                                    const float* C, const float* D, const float* z, const float* bias,
                                    const float* dout, const float* dlast, float* du, float* ddelta, float* dz,
                                    float* dA_rows,
                                    float* dB_part, float* dC_part, float* dD_rows, float* dbias_rows,
                                    const int64_t* sizes, const int64_t* strides, int64_t col_h,
                                    int softplus, int add_du, int add_dz, double dout_scale, int nthreads) {
  Scan<float> s{u, delta, A, B, C, D, z, bias, sizes[0], sizes[1], sizes[2], sizes[3], sizes[4], softplus != 0};
  Grads<float> gr{dout, dlast, du, ddelta, dz, dA_rows, dB_part, dC_part, dD_rows, dbias_rows, sizes[5]};
  if (!valid(s.batch, s.dim, s.len, s.nstate, s.groups, nthreads) || (s.nstate != 1 && s.nstate != 16) ||
      gr.slices < 1 || gr.slices > s.dim / s.groups || col_h < 0 || (col_h > 0 && s.len % col_h))
    return -2;
  s.col_h = col_h;
  int64_t* const views[] = {s.su, s.sdelta, s.sz, gr.sdout, gr.sdu, gr.sddelta, gr.sdz, s.sB, s.sC};
  for (int v = 0, k = 0; v < 9; ++v)
    for (int i = 0; i < (v < 7 ? 3 : 4); ++i) views[v][i] = strides[k++];
  gr.add_du = add_du != 0;
  gr.add_dz = add_dz != 0;
  gr.dout_scale = static_cast<float>(dout_scale);
  return s.nstate == 1 ? backward_impl_blocks<1>(s, gr, nthreads) : backward_impl_blocks<16>(s, gr, nthreads);
}

// Vim's norm with the residual add before it, for inference: over `rows` contiguous rows of `dim` floats,
// total = residual + x (x may be null: total = residual) and normed = total / sqrt(mean(total^2) + eps) * w;
// total_out may be null (not wanted). Vectorised over the row's channels; rows split between threads.
// -2 for inconsistent sizes.
SS_EXPORT int ss_add_rms_norm_f32(const float* x, const float* residual, const float* w, double eps,
                                  float* normed, float* total_out, int64_t rows, int64_t dim, int nthreads) {
  if (rows < 0 || dim < 1 || nthreads < 1) return -2;
  constexpr int W = Vec<float>::W;
  const int nt = usable_threads(nthreads);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x ? x + r * dim : nullptr;
    const float* rr = residual + r * dim;
    float* nr = normed + r * dim;
    float* tr = total_out ? total_out + r * dim : nr;  // the sum goes where it is wanted, else into normed
    VF acc{};
    float tail = 0.0f;
    int64_t c = 0;
    for (; c + W <= dim; c += W) {
      VF v, xv{};
      std::memcpy(&v, rr + c, sizeof(VF));
      if (xr) std::memcpy(&xv, xr + c, sizeof(VF));
      v += xv;
      std::memcpy(tr + c, &v, sizeof(VF));
      acc += v * v;
    }
    for (; c < dim; ++c) {
      const float v = rr[c] + (xr ? xr[c] : 0.0f);
      tr[c] = v;
      tail += v * v;
    }
    double sum = tail;
    for (int l = 0; l < W; ++l) sum += acc[l];
    const float scale = static_cast<float>(1.0 / std::sqrt(sum / static_cast<double>(dim) + eps));
    for (c = 0; c + W <= dim; c += W) {
      VF v, wv;
      std::memcpy(&v, tr + c, sizeof(VF));
      std::memcpy(&wv, w + c, sizeof(VF));
      v = v * scale * wv;
      std::memcpy(nr + c, &v, sizeof(VF));
    }
    for (; c < dim; ++c) nr[c] = tr[c] * scale * w[c];
  }
  return 0;
}

// The bidirectional causal conv1d above over all (batch, token) rows; -2 for inconsistent sizes.
SS_EXPORT int ss_bidir_conv_f32(const float* x, int64_t sxb, int64_t sxl, const float* w, const float* bias,
                                float* out, int64_t batch, int64_t len, int64_t channels, int64_t k,
                                int silu, int nthreads) {
  if (batch < 0 || len < 1 || channels < 1 || k < 1 || nthreads < 1) return -2;
  const int64_t rows = batch * len;
  const int nt = usable_threads(nthreads);
  // Each thread takes one contiguous range of rows, in a function of its own: a loop body outlined by
  // OpenMP reads every captured variable through a pointer and ran 2x slower.
#pragma omp parallel num_threads(nt)
  {
    const int64_t parts = team_size(), part = thread_index();
    conv_rows(x, sxb, sxl, w, bias, out, rows * part / parts, rows * (part + 1) / parts, len, channels, k,
              silu != 0);
  }
  return 0;
}

// The backward of ss_bidir_conv_f32: g (batch, L, 2C) workspace, dx (batch, L, C), and per-thread partial
// sums dw_part (nthreads, 2, k, C) and db_part (nthreads, 2, C), zeroed here and summed by the caller.
SS_EXPORT int ss_bidir_conv_backward_f32(const float* x, int64_t sxb, int64_t sxl, const float* w,
                                         const float* bias, const float* dout, float* g, float* dx,
                                         float* dw_part, float* db_part, int64_t batch, int64_t len,
                                         int64_t channels, int64_t k, int silu, int nthreads) {
  if (batch < 0 || len < 1 || channels < 1 || k < 1 || nthreads < 1) return -2;
  const int64_t rows = batch * len;
  const int nt = usable_threads(nthreads);
  std::memset(dw_part, 0, sizeof(float) * nt * 2 * k * channels);
  std::memset(db_part, 0, sizeof(float) * nt * 2 * channels);
#pragma omp parallel num_threads(nt)
  {
    const int64_t parts = team_size(), part = thread_index();
    conv_grad_rows(x, sxb, sxl, w, bias, dout, g, dw_part + part * 2 * k * channels,
                   db_part + part * 2 * channels, rows * part / parts, rows * (part + 1) / parts, len, channels,
                   k, silu != 0);
  }
#pragma omp parallel num_threads(nt)
  {
    const int64_t parts = team_size(), part = thread_index();
    conv_dx_rows(g, w, dx, rows * part / parts, rows * (part + 1) / parts, len, channels, k);
  }
  return 0;
}

// exp, softplus and sigmoid of n floats, through the same vector code as the scan (for the tests).
SS_EXPORT void ss_math_f32(int which, const float* x, float* y, int64_t n) {
  constexpr int W = Vec<float>::W;
  for (int64_t i = 0; i < n; i += W) {
    VF v{};
    const int64_t m = n - i < W ? n - i : W;
    std::memcpy(&v, x + i, sizeof(float) * m);
    v = which == 0 ? exp_fast(v) : which == 1 ? softplus(v) : sigmoid(v);
    std::memcpy(y + i, &v, sizeof(float) * m);
  }
}

// Vim's mixer between its two projections, for inference (float32), in one call: both directions' causal
// convolutions + SiLU of x into u (batch, L, 2E), as ss_bidir_conv_f32; each direction's x_proj of its half
// of u into xdbl (2, batch, L, P), P = R + 2N rounded up to whole vectors (xproj_rows; the weights packed
// here); the two scans on views of those (ss_forward_f32: the forward direction writes out, the reversed
// one runs back to front, adds into it, gates the sum by silu(z) and halves it), with A = -exp(A_log)
// computed here. x and z are (batch, L, E) views with unit channel stride; u, xdbl and out (batch, L, E)
// contiguous. params: 14 pointers, two per parameter (forward, backward direction), all contiguous float32:
// conv weight (E, k), conv bias (E,) or null, x_proj weight (R + 2N, E), A_log (E, N), D (E,), dt_proj bias
// (E,), dt_proj weight (E, R). Returns 0, -1 (no memory) or -2 (sizes; also P over kMaxProjVectors vectors).
SS_EXPORT int ss_vim_mixer_f32(const float* x, int64_t sxb, int64_t sxl, const float* z, int64_t szb,
                               int64_t szl, const float* const* params, float* u, float* xdbl, float* out,
                               int64_t batch, int64_t len, int64_t E, int64_t k, int64_t N, int64_t R,
                               int nthreads) {
  constexpr int W = Vec<float>::W;
  const int64_t width = R + 2 * N, nv = (width + W - 1) / W, P = nv * W, rows = batch * len;
  if (batch < 1 || len < 1 || E < 1 || k < 1 || N < 1 || R < 1 || nv > kMaxProjVectors || nthreads < 1)
    return -2;
  const float *conv_w[2] = {params[0], params[1]}, *conv_b[2] = {params[2], params[3]};
  const float *proj_w[2] = {params[4], params[5]}, *a_log[2] = {params[6], params[7]};
  const float *Dp[2] = {params[8], params[9]}, *dt_b[2] = {params[10], params[11]};
  const float* dt_w[2] = {params[12], params[13]};
  // One workspace: taps (2, k, E), conv bias (2, E), packed x_proj weights (2, E, P), A (2, E, N), and the
  // last states the scan writes (batch, E, N).
  const int64_t n_taps = 2 * k * E, n_bias = 2 * E, n_wt = 2 * E * P, n_a = 2 * E * N, n_last = batch * E * N;
  float* ws = static_cast<float*>(std::malloc(sizeof(float) * (n_taps + n_bias + n_wt + n_a + n_last)));
  if (!ws) return -1;
  float *taps = ws, *cbias = taps + n_taps, *wt = cbias + n_bias, *A = wt + n_wt, *last = A + n_a;
  const bool has_bias = conv_b[0] || conv_b[1];
  for (int d = 0; d < 2; ++d) {
    for (int64_t j = 0; j < k; ++j)
      for (int64_t c = 0; c < E; ++c) taps[(d * k + j) * E + c] = conv_w[d][c * k + j];
    for (int64_t c = 0; c < E; ++c) cbias[d * E + c] = conv_b[d] ? conv_b[d][c] : 0.0f;
    for (int64_t c = 0; c < E; ++c)
      for (int64_t p = 0; p < P; ++p) wt[(d * E + c) * P + p] = p < width ? proj_w[d][p * E + c] : 0.0f;
    ss_math_f32(0, a_log[d], A + d * E * N, E * N);  // exp, then negated
    for (int64_t i = 0; i < E * N; ++i) A[d * E * N + i] = -A[d * E * N + i];
  }
  int rc = ss_bidir_conv_f32(x, sxb, sxl, taps, has_bias ? cbias : nullptr, u, batch, len, E, k, 1, nthreads);
  if (rc == 0) {
    const int nt = usable_threads(nthreads);
#pragma omp parallel num_threads(nt)
    {
      const int64_t parts = team_size(), part = thread_index();
      for (int d = 0; d < 2; ++d)
        xproj_dispatch(static_cast<int>(nv), u + d * E, 2 * E, wt + d * E * P, xdbl + d * rows * P,
                       rows * part / parts, rows * (part + 1) / parts, E);
    }
  }
  // The two scans through ss_forward_f32, on direction d's views: u, delta, z, out (batch, E, L) and B, C
  // (batch, 1, N, L); the reversed direction's start at token L - 1 with negated token strides.
  const int64_t sizes[5] = {batch, E, len, N, 1};
  for (int d = 0; d < 2 && rc == 0; ++d) {
    const int64_t back = d == 1 ? len - 1 : 0, sign = d == 1 ? -1 : 1;
    const float* xd = xdbl + d * rows * P + back * P;
    const int64_t strides[23] = {len * 2 * E, 1, sign * 2 * E,  // u
                                 len * P,     1, sign * P,      // delta (the low-rank input)
                                 szb,         1, sign * szl,    // z
                                 len * E,     1, sign * E,      // out
                                 len * P, 0, 1, sign * P,       // B
                                 len * P, 0, 1, sign * P,       // C
                                 N,       1};                   // A
    // The forward direction writes out ungated; the reversed one adds into it, gates the sum and halves it.
    rc = ss_forward_f32(u + d * E + back * 2 * E, xd, A + d * E * N, xd + R, xd + R + N, Dp[d],
                        d == 1 ? z + back * szl : nullptr, dt_b[d], dt_w[d], R, 0, out + back * E, last,
                        sizes, strides, 1, d == 1, 1, d == 1 ? 0.5 : 1.0, nthreads);
  }
  std::free(ws);
  return rc;
}

// Channels per SIMD block of the forward, for float (suffix 0) and double (1).
SS_EXPORT int ss_lanes(int is_double) { return is_double ? Vec<double>::W : Vec<float>::W; }

// Steps per chunk (tests use it to pick lengths that are not a multiple of it).
SS_EXPORT int ss_chunk_size() { return static_cast<int>(kChunk); }

// 1 when built with OpenMP (rows run in parallel), else 0.
SS_EXPORT int ss_has_openmp() {
#if defined(_OPENMP)
  return 1;
#else
  return 0;
#endif
}
