// MXFP4 weight times activations on the CPU, without dequantizing the weight into memory.
//
// y [M, O] = x [M, I] @ W^T, W [O, I] stored as blocks uint8 [O, I/2] (two e2m1 codes a byte, the even input in the low
// nibble) and scales uint8 [O, I/32] (e8m0: 2^(s - 127) per 32 inputs). Float32 accumulation; each row of x is computed
// the same way whatever M is, so a verification of k + 1 tokens gives each token what decoding it alone gives.
// With AVX-512 a block's 16 bytes become 32 floats with two 16-entry table permutes; elsewhere a scalar table.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <cstdint>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static const float FP4[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

static inline float pow2(uint8_t s) {  // 2^(s - 127): the float whose exponent field is s (s = 0: 2^-127, subnormal)
  uint32_t bits = s ? uint32_t(s) << 23 : 0x00400000u;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#ifdef __AVX512F__
// A tile of MT rows of x by OT outputs. Every output is computed by the same expression in the same order whatever the
// tile (d = we*xe + wo*xo per block, then tot += d * scale), so a row's result does not depend on M or the tiling.
template <int MT, int OT>
static inline void tile(const float* X, const uint8_t* B, const uint8_t* S, float* Y, int64_t m0, int64_t o0,
                        int64_t O, int64_t G) {
  const __m512 lut = _mm512_loadu_ps(FP4);
  const __m512i low = _mm512_set1_epi32(15);
  __m512 acc[MT][OT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < OT; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 we[OT], wo[OT], sc[OT];
    for (int j = 0; j < OT; ++j) {
      const uint8_t* b = B + (o0 + j) * G * 16 + g * 16;
      __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
      we[j] = _mm512_permutexvar_ps(_mm512_and_si512(q, low), lut);
      wo[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), lut);
      sc[j] = _mm512_set1_ps(pow2(S[(o0 + j) * G + g]));
    }
    for (int i = 0; i < MT; ++i) {
      const float* xm = X + ((m0 + i) * G + g) * 32;
      const __m512 xe = _mm512_loadu_ps(xm), xo = _mm512_loadu_ps(xm + 16);
      for (int j = 0; j < OT; ++j)
        acc[i][j] = _mm512_fmadd_ps(_mm512_fmadd_ps(wo[j], xo, _mm512_mul_ps(we[j], xe)), sc[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < OT; ++j) Y[(m0 + i) * O + o0 + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int OT>
static void rows(const float* X, const uint8_t* B, const uint8_t* S, float* Y, int64_t M, int64_t o0, int64_t O,
                 int64_t G) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile<4, OT>(X, B, S, Y, m, o0, O, G);
  switch (M - m) {
    case 3: tile<3, OT>(X, B, S, Y, m, o0, O, G); break;
    case 2: tile<2, OT>(X, B, S, Y, m, o0, O, G); break;
    case 1: tile<1, OT>(X, B, S, Y, m, o0, O, G); break;
  }
}
#endif

torch::Tensor mxfp4_linear(torch::Tensor x, torch::Tensor blocks, torch::Tensor scales) {
  TORCH_CHECK(x.dim() == 2 && blocks.dim() == 2 && scales.dim() == 2, "mxfp4_linear: 2-D x, blocks, scales");
  TORCH_CHECK(blocks.scalar_type() == torch::kUInt8 && scales.scalar_type() == torch::kUInt8, "mxfp4_linear: uint8");
  const int64_t M = x.size(0), I = x.size(1), O = blocks.size(0), G = I / 32;
  TORCH_CHECK(I % 32 == 0 && blocks.size(1) == I / 2 && scales.size(0) == O && scales.size(1) == G,
              "mxfp4_linear: shapes do not match");
  auto xf = x.to(torch::kFloat32).contiguous();
  auto b = blocks.contiguous();
  auto s = scales.contiguous();
  // x split into even and odd inputs per block: [M, G, 2, 16], so the low and high nibbles meet contiguous inputs
  auto xs = xf.view({M, G, 16, 2}).transpose(2, 3).contiguous();
  auto y = torch::empty({M, O}, xf.options());
  const float* X = xs.data_ptr<float>();
  const uint8_t* B = b.data_ptr<uint8_t>();
  const uint8_t* S = s.data_ptr<uint8_t>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, (O + 1) / 2, 8, [&](int64_t p0, int64_t p1) {
#ifdef __AVX512F__
    for (int64_t p = p0; p < p1; ++p) {
      if (2 * p + 1 < O) rows<2>(X, B, S, Y, M, 2 * p, O, G);
      else rows<1>(X, B, S, Y, M, 2 * p, O, G);
    }
#else
    std::vector<float> acc(M);
    float w[32];
    for (int64_t o = std::min(2 * p0, O); o < std::min(2 * p1, O); ++o) {
      const uint8_t* bo = B + o * (I / 2);
      const uint8_t* so = S + o * G;
      for (int64_t m = 0; m < M; ++m) acc[m] = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        for (int j = 0; j < 16; ++j) {
          w[j] = FP4[bo[g * 16 + j] & 15];
          w[16 + j] = FP4[bo[g * 16 + j] >> 4];
        }
        const float sc = pow2(so[g]);
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = X + (m * G + g) * 32;
          float d = 0.f;
          for (int j = 0; j < 32; ++j) d += w[j] * xm[j];
          acc[m] += d * sc;
        }
      }
      for (int64_t m = 0; m < M; ++m) Y[m * O + o] = acc[m];
    }
#endif
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("mxfp4_linear", &mxfp4_linear, "MXFP4 weight times x"); }
