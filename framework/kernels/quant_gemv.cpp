// Few-row matrix products for CPU decoding (a few activation rows against an fp32, int8 or int4 weight).
//
// Decoding at small batches reads every weight once per step, so these kernels are written to stream the weight
// once, in its (out, in) layout: each output row's weights are loaded (int8 / int4: widened to fp32 in registers,
// int4 through a 16-entry table per group that turns a nibble into its dequantized value) and multiplied into up to
// MB activation rows at once, with fp32 accumulation. fp32: a step verifying a few draft tokens (speculative
// decoding) costs about what one row costs, where the BLAS's few-row GEMM costs 1.3-1.6x its GEMV.
// The summation order of one output row depends on nothing but K (16 lanes, k = j mod 16 in lane j, in order; the
// lanes reduced in a fixed tree; a K % 16 tail added last), never on the batch, the thread count or the other rows:
// a row's result is the same whatever shares its batch, and a tensor-parallel slice of rows gives the same bits.
// Every multiply-add is an explicit fused one and the build turns the compiler's own contraction off
// (-ffp-contract=off): GCC 12 on an AVX-512 EPYC had vectorised the K % 16 tail across a 4-row pass with FMAs and
// left a 1-row pass's tail as a multiply and an add, so a row's bits depended on its batch (K = 100, 529).
// Output rows are split over ATen's threads (torch.get_num_threads()).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kRowsPass = 4;  // output rows a pass: their weight streams interleave, x is loaded once for them
// activation rows a pass (more are done in further passes over the weights, cached by then): int8 / int4 need
// registers for their widening, fp32 has them for 6 rows (24 accumulators over 4 output rows)
constexpr int64_t kMaxBatch = 4;
constexpr int64_t kMaxBatchF32 = 6;
// How far ahead of the pass (in passes of kRowsPass rows) its weights are prefetched. A pass widens each byte in a few
// instructions, so the out-of-order window covers few cache lines and the hardware prefetcher alone left the kernels
// waiting on memory: measured on 100-600 MB of weights, one thread streamed 5-7 GB/s where fp32 mv streams 14.5.
constexpr int64_t kAheadPasses = 2;

// Prefetch the i-th cache line of a region; a line past the weights' end is a harmless hint (no fault on x86/ARM).
inline void prefetch_line(const void* base, int64_t i) {
  __builtin_prefetch(static_cast<const char*>(base) + 64 * i, 0, 3);
}

#if defined(__AVX512F__)
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline Vec widen_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// 16 bytes of a 32-feature int4 block -> features 0..15 (low nibbles) and 16..31 (high nibbles), each looked up in
// the group's table of 16 dequantized values: vpermps reads only the low 4 bits of each index lane.
inline void widen_i4(const uint8_t* p, Vec table, Vec* lo, Vec* hi) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  *lo = _mm512_permutexvar_ps(b, table);
  *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
}
inline Vec group_table(float scale, float zero) {  // (u - zero) * scale for u = 0..15, as dequantize_int4 computes it
  const Vec iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(zero)), _mm512_set1_ps(scale));
}
#else
// Portable lanes: the same order of operations, left to the compiler's auto-vectoriser.
struct Vec { float v[kLanes]; };
inline Vec vzero() { Vec r; for (int j = 0; j < kLanes; ++j) r.v[j] = 0.f; return r; }
inline Vec vload(const float* p) { Vec r; for (int j = 0; j < kLanes; ++j) r.v[j] = p[j]; return r; }
inline Vec vfma(Vec a, Vec b, Vec c) { for (int j = 0; j < kLanes; ++j) c.v[j] = std::fma(a.v[j], b.v[j], c.v[j]); return c; }
inline float vsum(Vec v) {  // the same pairwise tree as _mm512_reduce_add_ps
  for (int w = kLanes / 2; w >= 1; w /= 2) for (int j = 0; j < w; ++j) v.v[j] += v.v[j + w];
  return v.v[0];
}
inline Vec widen_i8(const int8_t* p) { Vec r; for (int j = 0; j < kLanes; ++j) r.v[j] = float(p[j]); return r; }
inline Vec group_table(float scale, float zero) {
  Vec r; for (int j = 0; j < kLanes; ++j) r.v[j] = (float(j) - zero) * scale; return r;
}
inline void widen_i4(const uint8_t* p, Vec table, Vec* lo, Vec* hi) {
  for (int j = 0; j < kLanes; ++j) { lo->v[j] = table.v[p[j] & 15]; hi->v[j] = table.v[p[j] >> 4]; }
}
#endif

inline Vec load_weights(const int8_t* p) { return widen_i8(p); }
inline Vec load_weights(const float* p) { return vload(p); }

// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] for R rows n.. and MB rows m.. (x, y row strides K, N); w int8, or
// fp32 (as nn.Linear holds it) with no scale (nullptr).
template <int64_t MB, int64_t R, typename W>
void dense_pass(const float* x, const W* w, const float* scale, float* y, int64_t K, int64_t N, int64_t n) {
  Vec acc[MB][R];
  for (int64_t m = 0; m < MB; ++m) for (int64_t r = 0; r < R; ++r) acc[m][r] = vzero();
  // this pass reads R * K contiguous weights in K / 16 steps: the cache lines of a later pass that start within a
  // step's share of the bytes (int8: a line every 4 / R steps; fp32: R lines a step) keep pace with it
  constexpr int64_t kStepBytes = R * kLanes * int64_t(sizeof(W));
  const W* ahead = w + (n + kAheadPasses * R) * K;
  int64_t k = 0;
  for (int64_t at = 0; k + kLanes <= K; k += kLanes, at += kStepBytes) {
    for (int64_t b = (at + 63) / 64 * 64; b < at + kStepBytes; b += 64) prefetch_line(ahead, b / 64);
    Vec wv[R];
    for (int64_t r = 0; r < R; ++r) wv[r] = load_weights(w + (n + r) * K + k);
    for (int64_t m = 0; m < MB; ++m) {
      Vec xv = vload(x + m * K + k);
      for (int64_t r = 0; r < R; ++r) acc[m][r] = vfma(xv, wv[r], acc[m][r]);
    }
  }
  for (int64_t m = 0; m < MB; ++m) {
    for (int64_t r = 0; r < R; ++r) {
      float s = vsum(acc[m][r]);
      for (int64_t t = k; t < K; ++t) s = std::fma(x[m * K + t], float(w[(n + r) * K + t]), s);
      y[m * N + n + r] = scale ? s * scale[n + r] : s;
    }
  }
}

// int4: w (N, K/2) bytes, 32-feature blocks of 16 bytes (byte j: feature j low nibble, feature j + 16 high);
// scale, zero (N, K/group) fp32, zero = the integer zero point + 8 (the nibbles are q + 8).
template <int64_t MB, int64_t R>
void int4_pass(const float* x, const uint8_t* w, const float* scale, const float* zero, float* y, int64_t K,
               int64_t N, int64_t group, int64_t n) {
  Vec acc[MB][R];
  for (int64_t m = 0; m < MB; ++m) for (int64_t r = 0; r < R; ++r) acc[m][r] = vzero();
  const int64_t groups = K / group;
  const uint8_t* ahead = w + (n + kAheadPasses * R) * (K / 2);  // R * K / 2 bytes a pass, R * 16 a 32-feature step
  for (int64_t g = 0; g < groups; ++g) {
    Vec table[R];
    for (int64_t r = 0; r < R; ++r) table[r] = group_table(scale[(n + r) * groups + g], zero[(n + r) * groups + g]);
    for (int64_t k = g * group; k < (g + 1) * group; k += 2 * kLanes) {
      if (R >= 4 || (k & 127) == 0) prefetch_line(ahead, (k * R) / 128);
      Vec lo[R], hi[R];
      for (int64_t r = 0; r < R; ++r) widen_i4(w + (n + r) * (K / 2) + k / 2, table[r], &lo[r], &hi[r]);
      for (int64_t m = 0; m < MB; ++m) {
        Vec x0 = vload(x + m * K + k), x1 = vload(x + m * K + k + kLanes);
        for (int64_t r = 0; r < R; ++r) acc[m][r] = vfma(x1, hi[r], vfma(x0, lo[r], acc[m][r]));
      }
    }
  }
  for (int64_t m = 0; m < MB; ++m)
    for (int64_t r = 0; r < R; ++r) y[m * N + n + r] = vsum(acc[m][r]);
}

// Calls pass<MB, R>(x + m0 * K, y + m0 * N, n) over the rows [n0, n1) and all M activation rows, MB <= MaxB at a time.
template <template <int64_t, int64_t> class Pass, int64_t MaxB, typename... A>
void run_rows(int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1, const float* x, float* y, A... a) {
  int64_t n = n0;
  auto rows = [&](auto R) {
    constexpr int64_t RR = decltype(R)::value;
    for (int64_t m = 0; m < M;) {
      const float* xm = x + m * K;
      float* ym = y + m * N;
      const int64_t left = std::min<int64_t>(M - m, MaxB);
      if constexpr (MaxB >= 6) {
        if (left == 6) { Pass<6, RR>::run(xm, ym, K, N, n, a...); m += 6; continue; }
        if (left == 5) { Pass<5, RR>::run(xm, ym, K, N, n, a...); m += 5; continue; }
      }
      switch (left) {
        case 4: Pass<4, RR>::run(xm, ym, K, N, n, a...); m += 4; break;
        case 3: Pass<3, RR>::run(xm, ym, K, N, n, a...); m += 3; break;
        case 2: Pass<2, RR>::run(xm, ym, K, N, n, a...); m += 2; break;
        default: Pass<1, RR>::run(xm, ym, K, N, n, a...); m += 1; break;
      }
    }
  };
  for (; n + kRowsPass <= n1; n += kRowsPass) rows(std::integral_constant<int64_t, kRowsPass>());
  for (; n < n1; ++n) rows(std::integral_constant<int64_t, 1>());
}

template <int64_t MB, int64_t R>
struct F32Pass {
  static void run(const float* x, float* y, int64_t K, int64_t N, int64_t n, const float* w) {
    dense_pass<MB, R>(x, w, static_cast<const float*>(nullptr), y, K, N, n);
  }
};

template <int64_t MB, int64_t R>
struct Int8Pass {
  static void run(const float* x, float* y, int64_t K, int64_t N, int64_t n, const int8_t* w, const float* s) {
    dense_pass<MB, R>(x, w, s, y, K, N, n);
  }
};

template <int64_t MB, int64_t R>
struct Int4Pass {
  static void run(const float* x, float* y, int64_t K, int64_t N, int64_t n, const uint8_t* w, const float* s,
                  const float* z, int64_t group) {
    int4_pass<MB, R>(x, w, s, z, y, K, N, group, n);
  }
};

// Enough rows a thread that the fork costs little beside the weights it streams (~64 KiB of them).
int64_t grain(int64_t row_bytes) { return std::max<int64_t>(kRowsPass, (int64_t(1) << 16) / std::max<int64_t>(row_bytes, 1)); }

at::Tensor f32_gemv(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "f32_gemv: x (M, K), w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "f32_gemv: x and w fp32");
  auto xc = x.contiguous(), wc = w.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(4 * K), [&](int64_t n0, int64_t n1) {
    run_rows<F32Pass, kMaxBatchF32>(M, K, N, n0, n1, xp, yp, wp);
  });
  return y;
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "int8_gemv: x (M, K), w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kChar && scale.scalar_type() == at::kFloat,
              "int8_gemv: x fp32, w int8, scale fp32");
  TORCH_CHECK(scale.numel() == w.size(0), "int8_gemv: one scale an output row");
  auto xc = x.contiguous(), wc = w.contiguous(), sc = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(K), [&](int64_t n0, int64_t n1) {
    run_rows<Int8Pass, kMaxBatch>(M, K, N, n0, n1, xp, yp, wp, sp);
  });
  return y;
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                     int64_t group) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == 2 * w.size(1), "int4_gemv: x (M, K), w (N, K/2)");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kByte && scale.scalar_type() == at::kFloat &&
              zero.scalar_type() == at::kFloat, "int4_gemv: x fp32, w uint8, scale and zero fp32");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(group % (2 * kLanes) == 0 && K % group == 0, "int4_gemv: the group size must be a multiple of 32 dividing K");
  TORCH_CHECK(scale.numel() == N * (K / group) && zero.numel() == N * (K / group), "int4_gemv: scale, zero (N, K/group)");
  auto xc = x.contiguous(), wc = w.contiguous(), sc = scale.contiguous(), zc = zero.contiguous();
  auto y = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* zp = zc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, grain(K / 2), [&](int64_t n0, int64_t n1) {
    run_rows<Int4Pass, kMaxBatch>(M, K, N, n0, n1, xp, yp, wp, sp, zp, group);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(miaotui_quant, m) {
  m.def("f32_gemv(Tensor x, Tensor w) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor w, Tensor scale, Tensor zero, int group) -> Tensor");
}

TORCH_LIBRARY_IMPL(miaotui_quant, CPU, m) {
  m.impl("f32_gemv", &f32_gemv);
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int4_gemv", &int4_gemv);
}
