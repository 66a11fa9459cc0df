// Fused selective scan (Mamba's S6) for CPUs: forward and backward, in float and double.
//
// Built on first use by vmamba/kernels/cpu.py with the system compiler and loaded through ctypes, so the
// file uses no torch headers and no C++ runtime library (it also builds with a plain C compiler driver).
// Layout, all contiguous: u, delta, z, out, du, ddelta, dz (batch, dim, L); A (dim, N); B, C (batch, G, L, N)
// (the state index is innermost so one time step's N values are adjacent); D, delta_bias (dim,).
//
// Each (batch, channel) row is one sequential recurrence; rows run in parallel with OpenMP when the build
// has it. A row is processed in chunks of kChunk steps: the decays exp(dt * A) of a whole chunk are
// computed first in one vectorisable loop, then the recurrence runs over the chunk with the N-state in a
// small local array (vectorised over N). The backward pass stores nothing of size (L, N): it keeps the
// state at every chunk start, then walks the chunks backwards, recomputing each chunk's states before
// running the adjoint recurrence through it.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

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
inline int usable_threads(int requested) { return requested; }
#else
inline int thread_index() { return 0; }
inline int usable_threads(int) { return 1; }
#endif

// ---------------------------------------------------------------------------------------------------
// Elementwise math. The float versions are branch-free and call no library function so that loops over
// them vectorise; the double versions use the C library (double is for gradient checks, not speed).

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// exp(x) to about 1 ulp: x = k ln2 + r with |r| <= ln2 / 2 (two-constant reduction), a degree-7 polynomial
// for exp(r) (Cephes coefficients), and 2^k built directly in the exponent bits. k is read from the bits of
// the rounding sum x log2(e) + 1.5 * 2^23 (no float-to-int conversion). NaN propagates; results below
// FLT_MIN (x < -87.34) are flushed to 0, and x > 88.37 gives +inf.
inline float exp_fast(float x) {
  constexpr float lo = -87.3365447505531f, hi = 88.3762626647949f, magic = 12582912.0f;
  float xc = lo > x ? lo : x;  // NaN compares false and stays NaN
  xc = xc > hi ? hi : xc;
  const float shifted = xc * 1.44269504088896341f + magic;
  const float k = shifted - magic;
  float r = xc - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // The low bits of `shifted` hold k (two's complement), so (bits + 127) << 23 is 2^k's bit pattern.
  const float res = p * bits_to_float((float_to_bits(shifted) + 127u) << 23);
  const float flushed = x < lo ? 0.0f : res;
  return x > hi ? HUGE_VALF : flushed;
}

// log(w) for w in [1, 2] (Cephes logf polynomial on the mantissa folded into [sqrt(1/2), sqrt(2))).
inline float log_1_2(float w) {
  const bool big = w > 1.41421356237f;
  const float e = big ? 1.0f : 0.0f;
  const float f = (big ? 0.5f * w : w) - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = f * z * p + e * -2.12194440e-4f - 0.5f * z;
  return f + y + e * 0.693359375f;
}

// softplus(x) = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), with log1p(v) = log(1 + v) * v / ((1 + v) - 1)
// correcting the rounding of 1 + v.
inline float softplus(float x) {
  const float v = exp_fast(-std::fabs(x));
  const float w = 1.0f + v;
  const float lp = w == 1.0f ? v : log_1_2(w) * (v / (w - 1.0f));
  return (x > 0.0f ? x : 0.0f) + lp;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_fast(-x)); }

inline double exp_fast(double x) { return std::exp(x); }
inline double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }  // torch's threshold
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// ---------------------------------------------------------------------------------------------------

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
template <typename T, int NS>
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

// Floats of per-thread workspace the row kernels need.
inline int64_t forward_workspace(int64_t N) { return 2 * kChunk + kChunk * N + N; }
inline int64_t backward_workspace(int64_t N, int64_t L) {
  const int64_t chunks = (L + kChunk - 1) / kChunk;
  return 5 * kChunk + kChunk * N + (kChunk + 1) * N + chunks * N + 3 * N;
}

// One row of the forward pass. NS > 0 fixes the state size at compile time (N == NS); NS == 0 is generic.
template <typename T, int NS>
void forward_row(const Scan<T>& s, int64_t row, T* __restrict__ out, T* __restrict__ last, T* ws) {
  const int64_t N = NS > 0 ? NS : s.nstate;
  const int64_t L = s.len;
  const int64_t b = row / s.dim, d = row % s.dim;
  const int64_t g = d / (s.dim / s.groups);
  const T* __restrict__ u = s.u + row * L;
  const T* __restrict__ delta = s.delta + row * L;
  const T* __restrict__ z = s.z ? s.z + row * L : nullptr;
  const T* __restrict__ Bg = s.B + (b * s.groups + g) * L * N;
  const T* __restrict__ Cg = s.C + (b * s.groups + g) * L * N;
  const T* __restrict__ Ad = s.A + d * N;
  const T Dd = s.D ? s.D[d] : T(0);
  const T bias = s.bias ? s.bias[d] : T(0);
  out += row * L;

  T* __restrict__ dt = ws;
  T* __restrict__ y = dt + kChunk;
  T* __restrict__ a = y + kChunk;
  T hloc[NS > 0 ? NS : 1];
  T* __restrict__ h = NS > 0 ? hloc : a + kChunk * N;
  for (int64_t n = 0; n < N; ++n) h[n] = T(0);

  for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
    const int64_t n_steps = L - t0 < kChunk ? L - t0 : kChunk;
    chunk_dt(s, delta + t0, bias, n_steps, dt, static_cast<T*>(nullptr));
    chunk_decay<T, NS>(dt, Ad, n_steps, N, a);
    for (int64_t t = 0; t < n_steps; ++t) {
      const T* __restrict__ Bt = Bg + (t0 + t) * N;
      const T* __restrict__ Ct = Cg + (t0 + t) * N;
      const T* __restrict__ at = a + t * N;
      const T dtu = dt[t] * u[t0 + t];
      T acc = T(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t n = 0; n < N; ++n) {
        const T hn = at[n] * h[n] + dtu * Bt[n];
        h[n] = hn;
        acc += Ct[n] * hn;
      }
      y[t] = acc;
    }
    if (z) {
#pragma omp simd
      for (int64_t t = 0; t < n_steps; ++t) {
        const T zt = z[t0 + t];
        out[t0 + t] = (y[t] + Dd * u[t0 + t]) * zt * sigmoid(zt);
      }
    } else {
#pragma omp simd
      for (int64_t t = 0; t < n_steps; ++t) out[t0 + t] = y[t] + Dd * u[t0 + t];
    }
  }
  for (int64_t n = 0; n < N; ++n) last[row * N + n] = h[n];
}

// One row of the backward pass; dB/dC contributions are added into this row's slice buffers.
template <typename T, int NS>
void backward_row(const Scan<T>& s, const Grads<T>& gr, int64_t row, T* __restrict__ dB, T* __restrict__ dC,
                  T* ws) {
  const int64_t N = NS > 0 ? NS : s.nstate;
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
  T hloc[NS > 0 ? NS : 1], gloc[NS > 0 ? NS : 1], dAloc[NS > 0 ? NS : 1];
  T* __restrict__ h = NS > 0 ? hloc : wvec;
  T* __restrict__ G = NS > 0 ? gloc : wvec + N;    // a_{t+1} * g_{t+1}: the adjoint carried into step t
  T* __restrict__ dA = NS > 0 ? dAloc : wvec + 2 * N;

  // Pass 1: the state entering every chunk.
  for (int64_t n = 0; n < N; ++n) h[n] = T(0);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t t0 = c * kChunk;
    const int64_t n_steps = L - t0 < kChunk ? L - t0 : kChunk;
    for (int64_t n = 0; n < N; ++n) ckpt[c * N + n] = h[n];
    if (c == chunks - 1) break;  // the last chunk's end state is not needed
    chunk_dt(s, delta + t0, bias, n_steps, dt, static_cast<T*>(nullptr));
    chunk_decay<T, NS>(dt, Ad, n_steps, N, a);
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
    chunk_decay<T, NS>(dt, Ad, n_steps, N, a);
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
        const T v = at[n] * h[n] + dtu * Bt[n];  // the running state stays in h (registers), hs is a copy
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

template <typename T, int NS>
int forward_impl(const Scan<T>& s, T* out, T* last, int nthreads) {
  const int64_t rows = s.batch * s.dim;
  const int64_t ws_size = forward_workspace(s.nstate);
  const int nt = usable_threads(nthreads);
  T* ws_all = static_cast<T*>(std::malloc(sizeof(T) * ws_size * nt));
  if (!ws_all) return -1;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nt)
  for (int64_t r = 0; r < rows; ++r) forward_row<T, NS>(s, r, out, last, ws_all + thread_index() * ws_size);
  std::free(ws_all);
  return 0;
}

// Work units are (batch, group, slice): the slice splits a group's channels so that there are enough units
// for the threads, and each unit owns its own dB/dC buffer, so no two threads ever add into the same place.
template <typename T, int NS>
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
      backward_row<T, NS>(s, gr, b * s.dim + d, gr.dB_part + unit * part, gr.dC_part + unit * part, ws);
  }
  std::free(ws_all);
  return 0;
}

// Fixed state sizes get their own compiled loops (the state then lives in registers); others run generic.
template <typename T>
int forward_dispatch(const Scan<T>& s, T* out, T* last, int nthreads) {
  switch (s.nstate) {
    case 1: return forward_impl<T, 1>(s, out, last, nthreads);
    case 16: return forward_impl<T, 16>(s, out, last, nthreads);
    default: return forward_impl<T, 0>(s, out, last, nthreads);
  }
}

// Double precision is for gradient checks, not speed: one generic instantiation keeps the build short.
int forward_dispatch(const Scan<double>& s, double* out, double* last, int nthreads) {
  return forward_impl<double, 0>(s, out, last, nthreads);
}

// Fixed state sizes get their own compiled loops (the state then lives in registers); others run generic.
template <typename T>
int backward_dispatch(const Scan<T>& s, const Grads<T>& gr, int nthreads) {
  switch (s.nstate) {
    case 1: return backward_impl<T, 1>(s, gr, nthreads);
    case 16: return backward_impl<T, 16>(s, gr, nthreads);
    default: return backward_impl<T, 0>(s, gr, nthreads);
  }
}

// Double precision is for gradient checks, not speed: one generic instantiation keeps the build short.
int backward_dispatch(const Scan<double>& s, const Grads<double>& gr, int nthreads) {
  return backward_impl<double, 0>(s, gr, nthreads);
}

template <typename T>
bool valid(const Scan<T>& s, int nthreads) {
  return s.batch >= 0 && s.dim > 0 && s.len > 0 && s.nstate > 0 && s.groups > 0 && s.dim % s.groups == 0 &&
         nthreads > 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// C entry points (ctypes). Return 0 on success, -1 when a per-thread buffer could not be allocated and
// -2 for inconsistent sizes.

#define SS_DEFINE(suffix, T)                                                                              \
  SS_EXPORT int ss_forward_##suffix(const T* u, const T* delta, const T* A, const T* B, const T* C,        \
                                    const T* D, const T* z, const T* bias, T* out, T* last, int64_t batch, \
                                    int64_t dim, int64_t len, int64_t nstate, int64_t groups, int softplus, \
                                    int nthreads) {                                                       \
    const Scan<T> s{u, delta, A, B, C, D, z, bias, batch, dim, len, nstate, groups, softplus != 0};       \
    if (!valid(s, nthreads)) return -2;                                                                   \
    return forward_dispatch(s, out, last, nthreads);                                                      \
  }                                                                                                       \
  SS_EXPORT int ss_backward_##suffix(                                                                     \
      const T* u, const T* delta, const T* A, const T* B, const T* C, const T* D, const T* z,              \
      const T* bias, const T* dout, const T* dlast, T* du, T* ddelta, T* dz, T* dA_rows, T* dB_part,      \
      T* dC_part, T* dD_rows, T* dbias_rows, int64_t batch, int64_t dim, int64_t len, int64_t nstate,     \
      int64_t groups, int64_t slices, int softplus, int nthreads) {                                        \
    const Scan<T> s{u, delta, A, B, C, D, z, bias, batch, dim, len, nstate, groups, softplus != 0};       \
    const Grads<T> gr{dout, dlast, du, ddelta, dz, dA_rows, dB_part, dC_part, dD_rows, dbias_rows, slices}; \
    if (!valid(s, nthreads) || slices < 1 || slices > dim / groups) return -2;                            \
    return backward_dispatch(s, gr, nthreads);                                                            \
  }

SS_DEFINE(f32, float)
SS_DEFINE(f64, double)

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
