// Weight-only quantized products on CPU: y[M, N] = x[M, K] W^T with W stored as
//   int8:  q [N, K] int8,            W[n, k] = q[n, k] * scale[n, k / group]
//   int4:  q [N, K / 2] uint8,       W[n, k] = q4[n, k] * scale[n, k / group] + offset[n, k / group]
// where byte j of a group holds value j in its low nibble and value j + group / 2 in its high nibble
// (GGUF's Q4_0 / Q4_1 order). Scales and offsets are fp16 or fp32. x is fp32 or bf16; products run in fp32.
//
// Why not torch's own _weight_int8pack_mm / _weight_int4pack_mm_for_cpu, or inductor: on an AVX2 machine
// (AMD EPYC, 2026-12-07, bench/quant_products.py) they stream 1.9 / 0.7 GB/s of weights, and inductor's
// int8 -> float loads 1.2-3 GB/s, against 20 GB/s for fp32. These loops read the weight once per
// (row of W, 4 rows of x), at a few rows of x; above kDirectRows they dequantize tiles for the BLAS product.
// Schemas, fake kernels and the reference are in kernels/quant.py, which builds and loads this file.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define LEMMA_AVX2 1
#endif

namespace {

constexpr int64_t kDirectRows = 16;
constexpr int64_t kTileRows = 256;

inline float scale_at(const float* s, int64_t i) { return s[i]; }
#if defined(__F16C__)
inline float scale_at(const c10::Half* s, int64_t i) { return _cvtsh_ss(s[i].x); }
#else
inline float scale_at(const c10::Half* s, int64_t i) { return static_cast<float>(s[i]); }
#endif

#ifdef LEMMA_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 int8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// The direct path quantizes each row of x to int8 per block of 32 (scale = max |x| / 127, as llama.cpp
// does for its Q8_0 / Q4_x dot products) and takes integer dot products of 32 values at a time: on an AVX2
// core that is ~8 instructions per 32 weights against ~20 for int -> float -> FMA.
struct QuantizedRows {
  std::vector<int8_t> q;  // [M, K]
  std::vector<float> scale;  // [M, K / 32]
  std::vector<float> group_sum;  // [M, K / group]: sums of the float values (int4's offsets multiply them)
  std::vector<float> group_sum_quantized;  // [M, K / group]: sums of the values as quantized
};

// With `halves`, the 32 values of a block are those an int4 W's 16 bytes hold (values j..j+15 of a group
// and half+j..half+j+15), so that one load of x meets one load of W.
QuantizedRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t group, bool halves) {
  QuantizedRows out{std::vector<int8_t>(M * K), std::vector<float>(M * K / 32), std::vector<float>(M * K / group, 0.f),
                    std::vector<float>(M * K / group, 0.f)};
  const int64_t half = group / 2;
  float values[32];
  for (int64_t b = 0; b < M * K / 32; ++b) {
    const int64_t start = b * 32, g = start / group, j = (start % group) / 2;
    for (int i = 0; i < 32; ++i)
      values[i] = halves ? x[g * group + (i < 16 ? j + i : half + j + i - 16)] : x[start + i];
    float amax = 0.f, total = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::abs(values[i])), total += values[i];
    const float inverse = amax > 0.f ? 127.f / amax : 0.f;
    int32_t quantized = 0;
    for (int i = 0; i < 32; ++i) {
      out.q[start + i] = static_cast<int8_t>(std::nearbyint(values[i] * inverse));
      quantized += out.q[start + i];
    }
    out.scale[b] = amax / 127.f;
    out.group_sum[g] += total;
    out.group_sum_quantized[g] += static_cast<float>(quantized) * out.scale[b];
  }
  return out;
}

#ifdef LEMMA_AVX2
inline __m256 dot_u8_s8(__m256i u, __m256i s) {  // 8 float sums of 4 products each
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
inline __m256 dot_s8_s8(__m256i a, __m256i b) {
  return dot_u8_s8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}
#endif

inline int32_t dot32_scalar(const int8_t* a, const int8_t* b) {
  int32_t total = 0;
  for (int i = 0; i < 32; ++i) total += static_cast<int32_t>(a[i]) * b[i];
  return total;
}

// out[r * ldo] = sum_k x[r, k] W[n, k] for R rows of x (quantized: xq, xs with K / 32 blocks per row)
// and one row n of an int8 W (group % 32 == 0).
template <int R, typename S>
void int8_row(const int8_t* xq, const float* xs, int64_t K, const int8_t* w, const S* s, int64_t group, float* out,
              int64_t ldo) {
  const int64_t blocks = K / 32, per_group = group / 32;
#ifdef LEMMA_AVX2
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / group; ++g) {
    const float ws = scale_at(s, g);
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 32));
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * 32));
        acc[r] = _mm256_fmadd_ps(dot_s8_s8(wv, xv), _mm256_set1_ps(ws * xs[r * blocks + b]), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(acc[r]);
#else
  for (int r = 0; r < R; ++r) {
    float total = 0.f;
    for (int64_t b = 0; b < blocks; ++b)
      total += static_cast<float>(dot32_scalar(w + b * 32, xq + r * K + b * 32)) * scale_at(s, b / per_group) *
               xs[r * blocks + b];
    out[r * ldo] = total;
  }
#endif
}

// The same for an int4 W (group % 32 == 0), x quantized with `halves`; gsum / ghat[r, g] sum x's row r over
// group g as floats / as quantized. W x = d sum (q - 8) x + (m + 8 d) sum x: the rounding of x meets q - 8
// (|q - 8| <= 8) rather than q (<= 15), which halves its error, and the integer dot still takes q as unsigned.
template <int R, typename S>
void int4_row(const int8_t* xq, const float* xs, const float* gsum, const float* ghat, int64_t K, const uint8_t* w, const S* s,
              const S* m, int64_t group, float* out, int64_t ldo) {
  const int64_t blocks = K / 32, groups = K / group, per_group = group / 32, half = group / 2;
  float offset[R];
  for (int r = 0; r < R; ++r) offset[r] = 0.f;
#ifdef LEMMA_AVX2
  const __m128i nibble = _mm_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const float ws = scale_at(s, g), wm = scale_at(m, g);
    for (int64_t c = 0; c < per_group; ++c) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + g * half + c * 16));
      const __m256i wv = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), _mm_and_si128(bytes, nibble));
      const int64_t b = g * per_group + c;
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * 32));
        acc[r] = _mm256_fmadd_ps(dot_u8_s8(wv, xv), _mm256_set1_ps(ws * xs[r * blocks + b]), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) offset[r] += (wm + 8.f * ws) * gsum[r * groups + g] - 8.f * ws * ghat[r * groups + g];
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(acc[r]) + offset[r];
#else
  for (int r = 0; r < R; ++r) {
    float total = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t c = 0; c < per_group; ++c) {
        const int64_t b = g * per_group + c;
        int32_t dot = 0;
        for (int i = 0; i < 16; ++i) {
          const uint8_t byte = w[g * half + c * 16 + i];
          dot += (byte & 15) * xq[r * K + b * 32 + i] + (byte >> 4) * xq[r * K + b * 32 + 16 + i];
        }
        total += static_cast<float>(dot) * scale_at(s, g) * xs[r * blocks + b];
      }
      offset[r] += (scale_at(m, g) + 8.f * scale_at(s, g)) * gsum[r * groups + g] - 8.f * scale_at(s, g) * ghat[r * groups + g];
    }
    out[r * ldo] = total + offset[r];
  }
#endif
}

// f.template operator()<R>() for R = rows (1..4): the row kernels are unrolled over R rows of x.
template <typename F>
void with_rows(int64_t rows, const F& f) {
  switch (rows) {
    case 4: f.template operator()<4>(); break;
    case 3: f.template operator()<3>(); break;
    case 2: f.template operator()<2>(); break;
    default: f.template operator()<1>();
  }
}

template <typename Row>
void for_rows(int64_t M, int64_t N, const Row& row) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t r = 0; r < M; r += 4) row(n, r, std::min<int64_t>(4, M - r));
  });
}

template <typename S>
void dequant_int8(const int8_t* w, const S* s, int64_t n0, int64_t n1, int64_t K, int64_t group, float* dst) {
  at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n)
      for (int64_t k = 0; k < K; ++k)
        dst[(n - n0) * K + k] = static_cast<float>(w[n * K + k]) * scale_at(s + n * (K / group), k / group);
  });
}

template <typename S>
void dequant_int4(const uint8_t* w, const S* s, const S* m, int64_t n0, int64_t n1, int64_t K, int64_t group, float* dst) {
  const int64_t half = group / 2;
  at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = k / group, j = k % group;
        const uint8_t byte = w[n * (K / 2) + g * half + (j % half)];
        const float q = static_cast<float>(j < half ? (byte & 15) : (byte >> 4));
        dst[(n - n0) * K + k] = q * scale_at(s + n * (K / group), g) + scale_at(m + n * (K / group), g);
      }
  });
}

void check_common(const at::Tensor& x, const at::Tensor& scales, int64_t N, int64_t K, int64_t group, int64_t multiple) {
  TORCH_CHECK(x.size(-1) == K, "lemma quantized linear: x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(group > 0 && group % multiple == 0 && K % group == 0, "lemma quantized linear: group ", group,
              " must be a multiple of ", multiple, " dividing ", K);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / group && scales.is_contiguous(),
              "lemma quantized linear: scales must be contiguous [", N, ", ", K / group, "]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kHalf,
              "lemma quantized linear: scales must be float32 or float16");
}

at::Tensor finish(const at::Tensor& out, const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.to(x.scalar_type()).view(shape);
}

// Above kDirectRows rows: dequantize kTileRows rows of W at a time and let BLAS multiply.
template <typename Dequant>
at::Tensor tiled(const at::Tensor& xf, int64_t N, int64_t K, const Dequant& dequant) {
  auto out = at::empty({xf.size(0), N}, xf.options());
  auto tile = at::empty({std::min(kTileRows, N), K}, xf.options());
  for (int64_t n0 = 0; n0 < N; n0 += kTileRows) {
    const int64_t n1 = std::min(N, n0 + kTileRows);
    dequant(n0, n1, tile.data_ptr<float>());
    out.narrow(1, n0, n1 - n0).copy_(xf.mm(tile.narrow(0, 0, n1 - n0).t()));
  }
  return out;
}

// The two paths of every quantized product: dequantized tiles for many rows of x, the row kernels for few.
template <typename Dequant, typename Row>
at::Tensor product(const at::Tensor& x, int64_t N, int64_t K, int64_t group, bool halves, const Dequant& dequant,
                   const Row& row) {
  auto xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  if (M > kDirectRows) return finish(tiled(xf, N, K, dequant), x, N);
  const QuantizedRows xq = quantize_rows(xf.data_ptr<float>(), M, K, group, halves);
  auto out = at::empty({M, N}, xf.options());
  float* op = out.data_ptr<float>();
  for_rows(M, N, [&](int64_t n, int64_t r, int64_t rows) { row(xq, n, r, rows, op + r * N + n); });
  return finish(out, x, N);
}

template <typename S>
at::Tensor int8_linear_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t group) {
  const int64_t N = weight.size(0), K = weight.size(1), G = K / group, B = K / 32;
  const int8_t* w = weight.data_ptr<int8_t>();
  const S* s = reinterpret_cast<const S*>(scales.data_ptr());
  return product(
      x, N, K, group, false, [&](int64_t n0, int64_t n1, float* dst) { dequant_int8(w, s, n0, n1, K, group, dst); },
      [&](const QuantizedRows& xq, int64_t n, int64_t r, int64_t rows, float* o) {
        with_rows(rows, [&]<int R>() {
          int8_row<R>(xq.q.data() + r * K, xq.scale.data() + r * B, K, w + n * K, s + n * G, group, o, N);
        });
      });
}

template <typename S>
at::Tensor int4_linear_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                            const at::Tensor& offsets, int64_t group) {
  const int64_t N = weight.size(0), K = 2 * weight.size(1), G = K / group, B = K / 32;
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const S* s = reinterpret_cast<const S*>(scales.data_ptr());
  const S* m = reinterpret_cast<const S*>(offsets.data_ptr());
  return product(
      x, N, K, group, true, [&](int64_t n0, int64_t n1, float* dst) { dequant_int4(w, s, m, n0, n1, K, group, dst); },
      [&](const QuantizedRows& xq, int64_t n, int64_t r, int64_t rows, float* o) {
        with_rows(rows, [&]<int R>() {
          int4_row<R>(xq.q.data() + r * K, xq.scale.data() + r * B, xq.group_sum.data() + r * G,
                      xq.group_sum_quantized.data() + r * G, K, w + n * (K / 2), s + n * G, m + n * G, group, o, N);
        });
      });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, int64_t group) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "lemma::int8_linear: weight must be contiguous int8 [N, K]");
  check_common(x, scales, weight.size(0), weight.size(1), group, 32);
  if (scales.scalar_type() == at::kHalf) return int8_linear_impl<c10::Half>(x, weight, scales, group);
  return int8_linear_impl<float>(x, weight, scales, group);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales, const at::Tensor& offsets,
                       int64_t group) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.is_contiguous(),
              "lemma::int4_linear: weight must be contiguous uint8 [N, K / 2]");
  check_common(x, scales, weight.size(0), 2 * weight.size(1), group, 32);
  TORCH_CHECK(offsets.sizes() == scales.sizes() && offsets.scalar_type() == scales.scalar_type() && offsets.is_contiguous(),
              "lemma::int4_linear: offsets must match scales");
  if (scales.scalar_type() == at::kHalf) return int4_linear_impl<c10::Half>(x, weight, scales, offsets, group);
  return int4_linear_impl<float>(x, weight, scales, offsets, group);
}

}  // namespace

TORCH_LIBRARY_IMPL(lemma, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
}
