// CPU decode kernels: block-quantized linear layers (int4 or int8 weights times int8
// activations), a whole Llama decoder layer for one decode step, and its attention alone.
//
// Weights are stored in blocks of 32 inputs, each with its own fp16 scale (and, for int4, an
// fp16 minimum), the grid GGUF's Q4_1 and Q8_0 use:
//   int4: w = d * (q - 8) + c, q in [0, 15]; 16 bytes a block, byte j = q[j] | q[j + 16] << 4
//   int8: w = d * q,     q in [-127, 127]; 32 bytes a block
// Each call quantizes every row of x to int8 in blocks of 32 (scale = max|x| / 127), so the
// inner product of a block is an integer dot product (AVX-512 or AVX VNNI vpdpbusd, else AVX2
// maddubs + madd; isa() says which was built), scaled once:
//   int4: sum_g d_g * xs_g * sum((q - 8) * xq) + c_g * sum(x over the block)
//         (the integer products take q as is; 8 * sum(xq) comes off per block after)
// The centred codes keep the rounding of x from scaling with the block's offset: the offset
// multiplies the exact fp32 sum of x.
//   int8: sum_g d_g * xs_g * sum(q * xq)
// Everything about one output (x row m, weight row n) is computed in the same order whatever
// the other rows of the call: results are batch-invariant, bit for bit.
//
// Ops (registered as torch.ops.meshllm_kernels.*):
//   q4_linear(x f32 [M, K], codes u8 [N, K/2], scale f16 [N, G], offset f16 [N, G]) -> f32 [M, N]
//   q8_linear(x f32 [M, K], codes i8 [N, K],   scale f16 [N, G])        -> f32 [M, N]
//   decode_layer(x, norms, [codes, scale(, offset)] of qkv/out/gate_up/down, k, v caches,
//     slots, positions, rotary tables, eps, heads, kv_heads) -> (): one decode step of a
//     whole layer, x and the caches updated in place (see decode_layer below)
//   decode_attention(q f32 [B, H, D], k, v f32 or f16 [slots, KV, T, D], slots, lengths i64
//     [B]) -> f32 [B, H, D]: that layer's attention alone, each sequence over its own cache
//     slot's first lengths[b] positions
//   isa() -> str: the instructions the products were compiled for

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MESHLLM_AVX2 1
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define MESHLLM_VNNI 1  // vpdpbusd on 256-bit registers (AVX512-VNNI)
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define MESHLLM_AVX512 1  // and on 512-bit ones: two blocks an instruction
#endif
#elif defined(__AVXVNNI__)
#define MESHLLM_VNNI 2  // the same instruction, VEX-encoded (AVX-VNNI)
#endif
#endif

namespace {

constexpr int64_t kBlock = 32;
constexpr int kRowTile = 4;  // x rows sharing one pass over a weight row
constexpr int64_t kMaxGroups = 1024;  // blocks a row: K <= 32768
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead of a tile its weights are fetched

inline float half_to_float(uint16_t h) {
#ifdef MESHLLM_AVX2
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

// Memory of the calling thread, reused across calls: grown to ``floats`` when short, never
// shrunk. Each use ends before the next begins (one call at a time per thread).
float* scratch(std::vector<float>& buffer, size_t floats) {
  if (buffer.size() < floats) buffer.resize(floats);
  return buffer.data();
}

// x rows quantized to int8 blocks: codes [M, K]; per block [M, G]: the scale, the exact sum
// of x, and 8 * scale * sum(codes) (what centring int4 codes takes off a block's product).
struct QuantizedRows {
  const int8_t* codes;
  const float *scale, *sum, *centring;
};

#ifdef MESHLLM_AVX2
inline float hmax(__m256 v) {
  __m128 lo = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_max_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
#endif

#ifdef MESHLLM_AVX2
// e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-7 polynomial,
// 2^n put into the exponent bits. Relative error about 2e-7; x is clamped to
// [-87.3, 88.4] (e^-87.3 ~ 1e-38 stands in for smaller results).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)),
                    _mm256_set1_ps(-87.3365478515625f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                        5.0000001201e-1f}) {
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  }
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i exponent =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(exponent));
}
#endif

// v[i] = e^(v[i] - shift) for i < count; every element by the same arithmetic, wherever it
// sits (a tail of fewer than 8 goes through a padded vector too).
inline void exp_rows(float* v, int64_t count, float shift) {
#ifdef MESHLLM_AVX2
  const __m256 s = _mm256_set1_ps(shift);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(v + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(v + i), s)));
  }
  if (i < count) {
    alignas(32) float tail[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    std::copy(v + i, v + count, tail);
    _mm256_store_ps(tail, exp8(_mm256_sub_ps(_mm256_load_ps(tail), s)));
    std::copy(tail, tail + (count - i), v + i);
  }
#else
  for (int64_t i = 0; i < count; ++i) v[i] = std::exp(v[i] - shift);
#endif
}

// out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i], for i < count.
inline void silu_gate(const float* gate, const float* up, float* out, int64_t count) {
  std::copy(gate, gate + count, out);
  for (int64_t i = 0; i < count; ++i) out[i] = -out[i];
  exp_rows(out, count, 0.f);  // e^-gate
  for (int64_t i = 0; i < count; ++i) out[i] = gate[i] / (1.f + out[i]) * up[i];
}

// One block of 32 inputs: its int8 codes (round to nearest, ties to even), scale max|x| / 127,
// exact sum and 8 * sum(codes).
inline void quantize_block(const float* src, int8_t* codes, float* scale, float* sum,
                           float* centring) {
#ifdef MESHLLM_AVX2
  __m256 v[4];
  for (int j = 0; j < 4; ++j) v[j] = _mm256_loadu_ps(src + 8 * j);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 amax = _mm256_max_ps(
      _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
      _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  const float step = hmax(amax) / 127.f;
  const __m256 inverse = _mm256_set1_ps(step > 0.f ? 1.f / step : 0.f);
  __m256i q[4];  // cvtps rounds as nearbyint does: to nearest, ties to even
  for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inverse));
  // 32 int32 -> 32 int8: the packs interleave 128-bit lanes; the permute puts them back
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                           _mm256_packs_epi32(q[2], q[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(1, 0, 3, 2)));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, _MM_SHUFFLE(2, 3, 0, 1)));
  *scale = step;
  *sum = hsum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
  *centring = static_cast<float>(8 * _mm_cvtsi128_si32(t));
#else
  float amax = 0.f, total = 0.f;
  for (int64_t i = 0; i < kBlock; ++i) {
    amax = std::max(amax, std::fabs(src[i]));
    total += src[i];
  }
  const float step = amax / 127.f;
  const float inverse = step > 0.f ? 1.f / step : 0.f;
  int32_t count = 0;
  for (int64_t i = 0; i < kBlock; ++i) {
    codes[i] = static_cast<int8_t>(std::nearbyint(src[i] * inverse));
    count += codes[i];
  }
  *scale = step;
  *sum = total;
  *centring = static_cast<float>(8 * count);
#endif
}

// x [rows, k] (contiguous) quantized into the calling thread's scratch memory, valid until
// its next call.
QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t k) {
  thread_local std::vector<float> buffer;
  const int64_t blocks = rows * (k / kBlock);
  float* scales = scratch(buffer, static_cast<size_t>(3 * blocks + rows * k / 4));
  float* sums = scales + blocks;
  float* centrings = sums + blocks;
  int8_t* codes = reinterpret_cast<int8_t*>(centrings + blocks);
  // rows are contiguous: block b of the flat array
  at::parallel_for(0, blocks, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      quantize_block(x + b * kBlock, codes + b * kBlock, scales + b, sums + b, centrings + b);
    }
  });
  return QuantizedRows{codes, scales, sums, centrings};
}

#ifdef MESHLLM_AVX2

// 32 int4 codes of a block as 32 bytes in [0, 15], in input order.
inline __m256i unpack_q4(const uint8_t* block) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_and_si128(bytes, mask);
  const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  return _mm256_set_m128i(high, low);
}

// The 8 int32 sums of 4 adjacent products u[j] * s[j] (u unsigned, s signed), exact: the
// products of a block here never saturate maddubs' int16 pairs (|u| <= 127 or u <= 15 with
// |s| <= 127), so the VNNI instruction and the AVX2 pair give the same integers.
inline __m256i dot_u8_i8(__m256i u, __m256i s) {
#if MESHLLM_VNNI == 1
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif MESHLLM_VNNI == 2
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

#ifdef MESHLLM_AVX512
// Two adjacent int4 blocks (32 bytes) as 64 codes in [0, 15], in input order.
inline __m512i unpack_q4_pair(const uint8_t* blocks) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blocks));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i low = _mm256_and_si256(bytes, mask);  // [first's low | second's low]
  const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
  const __m512i lanes = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
  // 128-bit lanes (first low, second low, first high, second high) -> (0, 2, 1, 3)
  return _mm512_shuffle_i64x2(lanes, lanes, _MM_SHUFFLE(3, 1, 2, 0));
}

// Two block scales as 16 lanes: the first for lanes 0-7 (block g), the second for 8-15.
inline __m512 pair_scales(const float* scales) {
  const __m128 two = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(scales)));
  return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                               _mm512_castps128_ps512(two));
}
#endif

#endif

// A block-quantized weight: codes, fp16 scale per block and, for int4, fp16 minimum.
struct Weights {
  const uint8_t* codes;
  const uint16_t* scale;
  const uint16_t* offset;  // int4 only
  int64_t k, groups, row_bytes;
};

#ifdef MESHLLM_AVX2
// dst[g] = float(src[g]) for g < count, 8 at a time.
inline void halves_to_floats(const uint16_t* src, float* dst, int64_t count) {
  int64_t g = 0;
  for (; g + 8 <= count; g += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + g));
    _mm256_storeu_ps(dst + g, _mm256_cvtph_ps(h));
  }
  for (; g < count; ++g) dst[g] = half_to_float(src[g]);
}

// sum_g a[g] * b[g], in one fixed order for a given count.
inline float dot_floats(const float* a, const float* b, int64_t count) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= count; g += 8) {
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + g), _mm256_loadu_ps(b + g), acc);
  }
  float total = hsum(acc);
  for (; g < count; ++g) total = std::fma(a[g], b[g], total);
  return total;
}
#endif

// Weight rows [n0, n0 + RN) against x rows [m0, m0 + RM): RN * RM independent outputs, each
// computed by the same sequence of operations whatever RN and RM are (batch invariance).
template <bool kInt4, int RN, int RM>
void tile_kernel(const Weights& w, const QuantizedRows& q, int64_t n0, int64_t m0, float* out,
                 int64_t out_stride) {
  const int64_t k = w.k, groups = w.groups;
  constexpr int64_t kBlockBytes = kInt4 ? kBlock / 2 : kBlock;
  const int8_t* xq = q.codes + m0 * k;
  const float* xs = q.scale + m0 * groups;
  const float* xsum = q.sum + m0 * groups;
  const uint8_t* wc = w.codes + n0 * w.row_bytes;
#ifdef MESHLLM_AVX2
  const float* centring = q.centring + m0 * groups;
  // The scale of each block product: weight block scale times x block scale.
  alignas(32) float scaled[RN][RM][kMaxGroups];
  {
    alignas(32) float d[kMaxGroups];
    for (int i = 0; i < RN; ++i) {
      halves_to_floats(w.scale + (n0 + i) * groups, d, groups);
      for (int r = 0; r < RM; ++r) {
        const float* s = xs + r * groups;
        float* dst = scaled[i][r];
        int64_t g = 0;
        for (; g + 8 <= groups; g += 8) {
          _mm256_store_ps(dst + g, _mm256_mul_ps(_mm256_load_ps(d + g), _mm256_loadu_ps(s + g)));
        }
        for (; g < groups; ++g) dst[g] = d[g] * s[g];
      }
    }
  }
  __m256 acc[RN][RM];
  for (int i = 0; i < RN; ++i) {
    for (int r = 0; r < RM; ++r) acc[i][r] = _mm256_setzero_ps();
  }
  // The tile's rows are adjacent: RN * kBlockBytes bytes a step. Fetch as far ahead, so the
  // short rows (a few cache lines each) stream at memory speed, not at its latency.
  constexpr int64_t kStepBytes = RN * kBlockBytes;
  const char* ahead = reinterpret_cast<const char*>(wc) + kPrefetchBytes;
  for (int i = 0; i < RN; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(w.scale + (n0 + i) * groups) + kPrefetchBytes / 8,
                 _MM_HINT_T0);
  }
  int64_t g = 0;
#ifdef MESHLLM_AVX512
  // Two blocks a step on 512-bit registers: lanes 0-7 hold block g's sums, 8-15 block g + 1's.
  __m512 wide[RN][RM];
  for (int i = 0; i < RN; ++i) {
    for (int r = 0; r < RM; ++r) wide[i][r] = _mm512_setzero_ps();
  }
  for (; g + 2 <= groups; g += 2) {
    for (int64_t b = 0; b < 2 * kStepBytes; b += 64) {
      _mm_prefetch(ahead + g * kStepBytes + b, _MM_HINT_T0);
    }
    __m512i x[RM];
    for (int r = 0; r < RM; ++r) x[r] = _mm512_loadu_si512(xq + r * k + g * kBlock);
    for (int i = 0; i < RN; ++i) {
      const uint8_t* blocks = wc + i * w.row_bytes + g * kBlockBytes;
      __m512i wq, w_abs = _mm512_setzero_si512();
      __mmask64 negative = 0;
      if constexpr (kInt4) {
        wq = unpack_q4_pair(blocks);
      } else {
        wq = _mm512_loadu_si512(blocks);
        w_abs = _mm512_abs_epi8(wq);
        negative = _mm512_movepi8_mask(wq);
      }
      for (int r = 0; r < RM; ++r) {
        __m512i sums;
        if constexpr (kInt4) {
          sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, x[r]);
        } else {  // |w| times x carrying w's sign
          const __m512i signed_x =
              _mm512_mask_sub_epi8(x[r], negative, _mm512_setzero_si512(), x[r]);
          sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w_abs, signed_x);
        }
        wide[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), pair_scales(&scaled[i][r][g]),
                                     wide[i][r]);
      }
    }
  }
#endif
  for (; g < groups; ++g) {  // the blocks left: one at a time on 256-bit registers
    for (int64_t b = 0; b < kStepBytes; b += 64) _mm_prefetch(ahead + g * kStepBytes + b, _MM_HINT_T0);
    __m256i x[RM];
    for (int r = 0; r < RM; ++r) {
      x[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + g * kBlock));
    }
    for (int i = 0; i < RN; ++i) {
      const uint8_t* block = wc + i * w.row_bytes + g * kBlockBytes;
      __m256i wq;
      if constexpr (kInt4) {
        wq = unpack_q4(block);
      } else {
        wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block));
      }
      const __m256i w_abs = _mm256_sign_epi8(wq, wq);  // int8 only: maddubs takes |w|
      for (int r = 0; r < RM; ++r) {
        // int8 weights: |w| times x carrying w's sign, so the unsigned operand is |w|
        __m256i sums;
        if constexpr (kInt4) {
          sums = dot_u8_i8(wq, x[r]);  // the codes q in [0, 15], centred below
        } else {
          sums = dot_u8_i8(w_abs, _mm256_sign_epi8(x[r], wq));
        }
        const __m256 dots = _mm256_cvtepi32_ps(sums);
        acc[i][r] = _mm256_fmadd_ps(dots, _mm256_broadcast_ss(&scaled[i][r][g]), acc[i][r]);
      }
    }
  }
  alignas(32) float offset[kInt4 ? kMaxGroups : 1];
  for (int i = 0; i < RN; ++i) {
    if constexpr (kInt4) halves_to_floats(w.offset + (n0 + i) * groups, offset, groups);
    for (int r = 0; r < RM; ++r) {
      float total = hsum(acc[i][r]);
#ifdef MESHLLM_AVX512
      total += _mm512_reduce_add_ps(wide[i][r]);
#endif
      if constexpr (kInt4) {
        // sum_g d_g xs_g * 8 sum(xq) turns the products of q into those of q - 8; then the
        // offsets times the exact block sums
        total -= dot_floats(scaled[i][r], centring + r * groups, groups);
        total += dot_floats(offset, xsum + r * groups, groups);
      }
      out[r * out_stride + i] = total;
    }
  }
#else
  for (int i = 0; i < RN; ++i) {
    for (int r = 0; r < RM; ++r) {
      float total = 0.f, mins = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* block = wc + i * w.row_bytes + g * kBlockBytes;
        const int8_t* x = xq + r * k + g * kBlock;
        int32_t dot = 0;
        for (int64_t j = 0; j < kBlock; ++j) {
          int32_t wj;
          if constexpr (kInt4) {
            wj = (j < kBlock / 2 ? (block[j] & 0x0F) : (block[j - kBlock / 2] >> 4)) - 8;
          } else {
            wj = static_cast<int8_t>(block[j]);
          }
          dot += wj * x[j];
        }
        const float d = half_to_float(w.scale[(n0 + i) * groups + g]);
        total = std::fma(static_cast<float>(dot), d * xs[r * groups + g], total);
        if constexpr (kInt4) {
          const float m = half_to_float(w.offset[(n0 + i) * groups + g]);
          mins = std::fma(m, xsum[r * groups + g], mins);
        }
      }
      out[r * out_stride + i] = total + mins;
    }
  }
#endif
}

// Weight rows [n0, n0 + RN) against every x row, RM rows at a time, then the rest.
template <bool kInt4, int RN, int RM>
void weight_rows(const Weights& w, const QuantizedRows& q, int64_t n0, int64_t rows, float* out,
                 int64_t n) {
  int64_t m0 = 0;
  for (; m0 + RM <= rows; m0 += RM) tile_kernel<kInt4, RN, RM>(w, q, n0, m0, out + m0 * n + n0, n);
  for (; m0 < rows; ++m0) tile_kernel<kInt4, RN, 1>(w, q, n0, m0, out + m0 * n + n0, n);
}

void check_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [M, K]");
}

// The weight of K inputs a row: codes, scale and (int4 only) offset, checked.
Weights check_weights(int64_t k, const at::Tensor& codes, const at::Tensor& scale,
                      const at::Tensor* offset, const char* name = "the weight") {
  const int64_t groups = k / kBlock;
  TORCH_CHECK(k % kBlock == 0 && groups <= kMaxGroups, "K must be a multiple of ", kBlock,
              " up to ", kBlock * kMaxGroups, ", got ", k);
  const int64_t row_bytes = offset ? k / 2 : k;
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) == row_bytes && codes.is_contiguous() &&
                  codes.element_size() == 1,
              name, "'s codes must be contiguous bytes [N, ", row_bytes, "] (", k,
              " inputs a row)");
  const int64_t n = codes.size(0);
  for (const at::Tensor* t : {&scale, offset}) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == n && t->size(1) == groups,
                name, "'s block scales and offsets must be contiguous float16 [N, ", groups,
                "]");
  }
  return Weights{reinterpret_cast<const uint8_t*>(codes.data_ptr()),
                 reinterpret_cast<const uint16_t*>(scale.data_ptr()),
                 offset ? reinterpret_cast<const uint16_t*>(offset->data_ptr()) : nullptr, k,
                 groups, row_bytes};
}

// out [rows, n] = x [rows, K] (contiguous float32) times the weight's n rows, transposed.
template <bool kInt4>
void block_linear_into(const float* x, int64_t rows, const Weights& w, int64_t n, float* out) {
  if (rows == 0 || n == 0) return;
  const QuantizedRows q = quantize_rows(x, rows, w.k);
  // Work is split over weight rows only, so each thread streams its own part of the weights.
  // One to three x rows: 4 weight rows at a time (independent accumulators); more: 2 x 4 tiles.
  const int64_t grain = std::max<int64_t>(4, 64 / rows) / 4 * 4;
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
    if (rows < kRowTile) {
      for (; j + 4 <= end; j += 4) weight_rows<kInt4, 4, 1>(w, q, j, rows, out, n);
    } else {
      for (; j + 2 <= end; j += 2) weight_rows<kInt4, 2, kRowTile>(w, q, j, rows, out, n);
    }
    for (; j < end; ++j) weight_rows<kInt4, 1, kRowTile>(w, q, j, rows, out, n);
  });
}

void linear_into(const float* x, int64_t rows, const Weights& w, int64_t n, float* out) {
  if (w.offset != nullptr) {
    block_linear_into<true>(x, rows, w, n, out);
  } else {
    block_linear_into<false>(x, rows, w, n, out);
  }
}

at::Tensor block_linear(const at::Tensor& x_in, const Weights& w, int64_t n) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({x.size(0), n}, at::kFloat);
  linear_into(x.data_ptr<float>(), x.size(0), w, n, out.data_ptr<float>());
  return out;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                     const at::Tensor& offset) {
  check_rows(x);
  return block_linear(x, check_weights(x.size(1), codes, scale, &offset), codes.size(0));
}

at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale) {
  check_rows(x);
  return block_linear(x, check_weights(x.size(1), codes, scale, nullptr), codes.size(0));
}

// The KV cache holds float32 or float16 (as its bits, uint16_t); rows are read as float32.
inline float cache_value(float v) { return v; }
inline float cache_value(uint16_t h) { return half_to_float(h); }

inline void store_row(const float* src, float* dst, int64_t count) {
  std::memcpy(dst, src, count * sizeof(float));
}

// float16 rounded to nearest, ties to even (as torch's .half())
inline void store_row(const float* src, uint16_t* dst, int64_t count) {
  int64_t i = 0;
#ifdef MESHLLM_AVX2
  for (; i + 8 <= count; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  for (; i < count; ++i) dst[i] = c10::Half(src[i]).x;
}

#ifdef MESHLLM_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// sum_i a[i] * b[i] over a row of the attention head, in one fixed order.
template <typename T>
inline float dot_row(const float* a, const T* b, int64_t count) {
  int64_t i = 0;
  float total = 0.f;
#ifdef MESHLLM_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= count; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  total = hsum(acc);
#endif
  for (; i < count; ++i) total = std::fma(a[i], cache_value(b[i]), total);
  return total;
}

// out[i] += p * v[i]
template <typename T>
inline void axpy_row(float p, const T* v, float* out, int64_t count) {
  int64_t i = 0;
#ifdef MESHLLM_AVX2
  const __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= count; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, load8(v + i), _mm256_loadu_ps(out + i)));
  }
#endif
  for (; i < count; ++i) out[i] = std::fma(p, cache_value(v[i]), out[i]);
}

// One layer's cache and where each sequence of a decode step sits in it.
template <typename T>
struct CacheView {
  T *k, *v;
  int64_t kv_heads, span, dim;
  const int64_t* slots;    // [B]
  const int64_t* lengths;  // [B]: positions to attend to, the new one included
};

template <typename T>
CacheView<T> cache_view(const at::Tensor& k, const at::Tensor& v, const int64_t* slots,
                        const int64_t* lengths) {
  return CacheView<T>{reinterpret_cast<T*>(k.data_ptr()), reinterpret_cast<T*>(v.data_ptr()),
                      k.size(1), k.size(2), k.size(3), slots, lengths};
}

// One decode step of attention for B sequences, each over exactly its own cached keys.
// Query b's heads start at q + b * q_stride (D floats each); out is [B, H, D]. Query head h
// reads kv head h / (H / KV) (grouped-query attention). Every (sequence, head) is computed
// alone, in the same order whatever else is in the batch.
template <typename T>
void attend(const float* q, int64_t q_stride, const CacheView<T>& cache, int64_t batch,
            int64_t heads, float* out) {
  const int64_t dim = cache.dim, span = cache.span, group = heads / cache.kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / heads, h = i % heads, length = cache.lengths[b];
      const int64_t offset = (cache.slots[b] * cache.kv_heads + h / group) * span * dim;
      const float* query = q + b * q_stride + h * dim;
      scores.resize(length);
      float best = -INFINITY;
      for (int64_t t = 0; t < length; ++t) {
        scores[t] = dot_row(query, cache.k + offset + t * dim, dim) * scale;
        best = std::max(best, scores[t]);
      }
      exp_rows(scores.data(), length, best);
      float total = 0.f;
      for (int64_t t = 0; t < length; ++t) total += scores[t];
      float* row = out + i * dim;
      std::fill(row, row + dim, 0.f);
      for (int64_t t = 0; t < length; ++t) axpy_row(scores[t], cache.v + offset + t * dim, row, dim);
      const float inverse = 1.f / total;
      for (int64_t d = 0; d < dim; ++d) row[d] *= inverse;
    }
  });
}

// Whether the cache is float16 (else float32), after checking it.
bool check_cache(const at::Tensor& k, const at::Tensor& v) {
  const auto dtype = k.scalar_type();
  TORCH_CHECK(k.dim() == 4 && (dtype == at::kFloat || dtype == at::kHalf) && k.is_contiguous() &&
                  v.sizes() == k.sizes() && v.scalar_type() == dtype && v.is_contiguous(),
              "k and v must be contiguous float32 or float16 caches [slots, KV, T, D] of one "
              "shape and dtype");
  return dtype == at::kHalf;
}

// slots and a per-sequence count as int64 [B], checked against the cache: each slot in
// [0, slots) and each count in [low, high].
void check_positions(const at::Tensor& slots, const at::Tensor& counts, int64_t batch,
                     int64_t cache_slots, const char* name, int64_t low, int64_t high) {
  for (const at::Tensor* t : {&slots, &counts}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == batch && t->scalar_type() == at::kLong &&
                    t->is_contiguous(),
                "slots and ", name, "s must be contiguous int64 [B]");
  }
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < cache_slots, "slot ", sp[b], " out of range [0, ",
                cache_slots, ")");
    TORCH_CHECK(cp[b] >= low && cp[b] <= high, name, " ", cp[b], " out of range [", low, ", ",
                high, "]");
  }
}

// q [B, H, D]; k, v: one layer's cache [slots, KV, T, D]; slots, lengths: int64 [B] (the
// cache slot of each sequence and how many of its positions to attend to).
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& slots_in, const at::Tensor& lengths_in) {
  TORCH_CHECK(q_in.dim() == 3 && q_in.scalar_type() == at::kFloat, "q must be float32 [B, H, D]");
  check_cache(k, v);
  const at::Tensor q = q_in.contiguous();
  const at::Tensor slots = slots_in.contiguous(), lengths = lengths_in.contiguous();
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k.size(1), span = k.size(2);
  TORCH_CHECK(k.size(3) == dim, "q's head dim ", dim, " differs from the cache's ", k.size(3));
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "query heads ", heads,
              " are not a multiple of kv heads ", kv_heads);
  check_positions(slots, lengths, batch, k.size(0), "length", 1, span);
  at::Tensor out = at::empty({batch, heads, dim}, at::kFloat);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  if (k.scalar_type() == at::kHalf) {
    attend(q.data_ptr<float>(), heads * dim, cache_view<uint16_t>(k, v, sp, lp), batch, heads,
           out.data_ptr<float>());
  } else {
    attend(q.data_ptr<float>(), heads * dim, cache_view<float>(k, v, sp, lp), batch, heads,
           out.data_ptr<float>());
  }
  return out;
}

// out = x * weight / sqrt(mean(x^2) + eps), row by row (the sum of squares in double).
void rms_norm_rows(const float* x, const float* weight, float* out, int64_t rows, int64_t dim,
                   double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * dim;
    double squares = 0.0;
    for (int64_t i = 0; i < dim; ++i) squares += static_cast<double>(row[i]) * row[i];
    const float inverse = static_cast<float>(1.0 / std::sqrt(squares / dim + eps));
    for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = row[i] * inverse * weight[i];
  }
}

// A linear layer of the fused op: [codes, scale] (int8) or [codes, scale, offset] (int4)
// with n rows of k inputs.
Weights layer_weights(at::TensorList parts, const char* name, int64_t n, int64_t k) {
  TORCH_CHECK(parts.size() == 2 || parts.size() == 3, name,
              " must be [codes, scale] (int8) or [codes, scale, offset] (int4), got ",
              parts.size(), " tensors");
  TORCH_CHECK(parts[0].dim() == 2 && parts[0].size(0) == n, name, " must have ", n,
              " output rows, got shape ", parts[0].sizes());
  return check_weights(k, parts[0], parts[1], parts.size() == 3 ? &parts[2] : nullptr, name);
}

// The attention of a decode step: rotate the q and k heads of each row of ``fused`` [B, qkv]
// in place (adjacent pairs by the tables' row of the sequence's position), store k and v at
// that position of the sequence's cache slot, and attend over positions [0, position]:
// out [B, H * D].
template <typename T>
void attention_stage(float* fused, int64_t qkv_width, int64_t heads, CacheView<T> cache,
                     const int64_t* positions, const float* cos, const float* sin, int64_t batch,
                     float* out) {
  const int64_t dim = cache.dim, kv_heads = cache.kv_heads;
  const int64_t q_width = heads * dim, kv_width = kv_heads * dim;
  std::vector<int64_t> lengths(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const float* c = cos + positions[b] * dim;
    const float* s = sin + positions[b] * dim;
    float* row = fused + b * qkv_width;
    for (int64_t head = 0; head < heads + kv_heads; ++head) {
      float* v = row + head * dim;
      for (int64_t i = 0; i < dim; i += 2) {
        const float even = v[i], odd = v[i + 1];
        v[i] = even * c[i] + odd * s[i];
        v[i + 1] = odd * c[i + 1] + even * s[i + 1];
      }
    }
    for (int64_t head = 0; head < kv_heads; ++head) {
      const int64_t at = ((cache.slots[b] * kv_heads + head) * cache.span + positions[b]) * dim;
      store_row(row + q_width + head * dim, cache.k + at, dim);
      store_row(row + q_width + kv_width + head * dim, cache.v + at, dim);
    }
    lengths[b] = positions[b] + 1;
  }
  cache.lengths = lengths.data();
  attend(fused, qkv_width, cache, batch, heads, out);
}

// One decoder layer of a Llama decode step, all in one call: x [B, hidden] (updated in
// place) is one new token of each of B sequences.
//   h = rms_norm(x) * attn_norm; q, k, v = h W_qkv^T; rotate q and k (adjacent pairs, the
//   tables cos and sin [context, D] as the model builds them: (cos, cos) and (-sin, sin));
//   store k and v at each sequence's position; attend; x += attn W_out^T;
//   h = rms_norm(x) * ffn_norm; g, u = h W_gate_up^T; x += (silu(g) * u) W_down^T
// Each sequence attends over its cache slot's positions [0, positions[b]]. Every row goes
// through the same operations whatever else is in the batch: batch-invariant.
void decode_layer(const at::Tensor& x, const at::Tensor& attn_norm, at::TensorList qkv,
                  at::TensorList out_proj, const at::Tensor& ffn_norm, at::TensorList gate_up,
                  at::TensorList down, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slots, const at::Tensor& positions, const at::Tensor& cos,
                  const at::Tensor& sin, double eps, int64_t heads, int64_t kv_heads) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be contiguous float32 [B, hidden]");
  const int64_t batch = x.size(0), hidden = x.size(1);
  for (const at::Tensor* norm : {&attn_norm, &ffn_norm}) {
    TORCH_CHECK(norm->dim() == 1 && norm->size(0) == hidden &&
                    norm->scalar_type() == at::kFloat && norm->is_contiguous(),
                "norm weights must be contiguous float32 [", hidden, "]");
  }
  const bool half_cache = check_cache(k_cache, v_cache);
  const int64_t dim = k_cache.size(3), span = k_cache.size(2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0 && k_cache.size(1) == kv_heads,
              "query heads ", heads, " must be a multiple of kv heads ", kv_heads,
              " and the cache must hold ", kv_heads, " kv heads");
  TORCH_CHECK(dim % 2 == 0, "the head dim must be even, got ", dim);
  for (const at::Tensor* table : {&cos, &sin}) {
    TORCH_CHECK(table->dim() == 2 && table->size(1) == dim &&
                    table->scalar_type() == at::kFloat && table->is_contiguous(),
                "rotary tables must be contiguous float32 [context, ", dim, "]");
  }
  TORCH_CHECK(sin.size(0) == cos.size(0), "rotary tables must have one length");
  check_positions(slots, positions, batch, k_cache.size(0), "position", 0,
                  std::min(span, cos.size(0)) - 1);
  const int64_t q_width = heads * dim, kv_width = kv_heads * dim;
  const int64_t qkv_width = q_width + 2 * kv_width;
  const Weights w_qkv = layer_weights(qkv, "qkv", qkv_width, hidden);
  const Weights w_out = layer_weights(out_proj, "out", hidden, q_width);
  TORCH_CHECK(gate_up.size() >= 1 && gate_up[0].dim() == 2 && gate_up[0].size(0) % 2 == 0,
              "gate_up must stack the gate and up rows: an even row count");
  const int64_t ffn = gate_up[0].size(0) / 2;
  const Weights w_gate_up = layer_weights(gate_up, "gate_up", 2 * ffn, hidden);
  const Weights w_down = layer_weights(down, "down", hidden, ffn);

  float* xp = x.data_ptr<float>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  // the step's intermediates, in the calling thread's scratch memory
  thread_local std::vector<float> buffer;
  float* hp = scratch(buffer, static_cast<size_t>(batch * (2 * hidden + qkv_width + q_width +
                                                           3 * ffn)));
  float* dp = hp + batch * hidden;   // [B, hidden]: a product to add to x
  float* fp = dp + batch * hidden;   // [B, qkv_width]
  float* ap = fp + batch * qkv_width;  // [B, q_width]: attention
  float* gp = ap + batch * q_width;  // [B, 2 * ffn]: gate and up
  float* gated = gp + batch * 2 * ffn;  // [B, ffn]: silu(gate) * up

  // Each stage is a profiler scope (torch.profiler shows where the layer's time goes).
  {
    RECORD_FUNCTION("decode_layer.qkv", std::vector<c10::IValue>());
    rms_norm_rows(xp, attn_norm.data_ptr<float>(), hp, batch, hidden, eps);
    linear_into(hp, batch, w_qkv, qkv_width, fp);
  }
  {
    RECORD_FUNCTION("decode_layer.attention", std::vector<c10::IValue>());
    const float* cp = cos.data_ptr<float>();
    const float* sn = sin.data_ptr<float>();
    if (half_cache) {
      attention_stage(fp, qkv_width, heads, cache_view<uint16_t>(k_cache, v_cache, sp, nullptr),
                      pp, cp, sn, batch, ap);
    } else {
      attention_stage(fp, qkv_width, heads, cache_view<float>(k_cache, v_cache, sp, nullptr), pp,
                      cp, sn, batch, ap);
    }
  }
  {
    RECORD_FUNCTION("decode_layer.out", std::vector<c10::IValue>());
    linear_into(ap, batch, w_out, hidden, dp);
    for (int64_t i = 0; i < batch * hidden; ++i) xp[i] += dp[i];
  }
  {
    RECORD_FUNCTION("decode_layer.gate_up", std::vector<c10::IValue>());
    rms_norm_rows(xp, ffn_norm.data_ptr<float>(), hp, batch, hidden, eps);
    linear_into(hp, batch, w_gate_up, 2 * ffn, gp);
    for (int64_t b = 0; b < batch; ++b) {
      silu_gate(gp + b * 2 * ffn, gp + b * 2 * ffn + ffn, gated + b * ffn, ffn);
    }
  }
  {
    RECORD_FUNCTION("decode_layer.down", std::vector<c10::IValue>());
    linear_into(gated, batch, w_down, hidden, dp);
    for (int64_t i = 0; i < batch * hidden; ++i) xp[i] += dp[i];
  }
}

// The instructions the block products were compiled for.
std::string isa() {
#if defined(MESHLLM_AVX512)
  return "avx512-vnni";
#elif defined(MESHLLM_VNNI)
  return "avx2-vnni";
#elif defined(MESHLLM_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

}  // namespace

TORCH_LIBRARY(meshllm_kernels, m) {
  m.def("q4_linear(Tensor x, Tensor codes, Tensor scale, Tensor offset) -> Tensor", &q4_linear);
  m.def("q8_linear(Tensor x, Tensor codes, Tensor scale) -> Tensor", &q8_linear);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor slots, Tensor lengths) -> Tensor",
        &decode_attention);
  m.def(
      "decode_layer(Tensor(a!) x, Tensor attn_norm, Tensor[] qkv, Tensor[] out, "
      "Tensor ffn_norm, Tensor[] gate_up, Tensor[] down, Tensor(b!) k_cache, "
      "Tensor(c!) v_cache, Tensor slots, Tensor positions, Tensor cos, Tensor sin, float eps, "
      "int heads, int kv_heads) -> ()",
      &decode_layer);
  m.def("isa() -> str", &isa);
}
