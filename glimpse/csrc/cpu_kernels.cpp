// Steps 5 and 8 on CPU in bf16, on AVX512-BF16 dot products with float32 accumulation:
// attention inside segments of a flat batch (vision segments, bidirectional; prefill chunks over
// the paged cache, causal), decode attention (one query row per sequence), one-row linear
// layers (batch-1 decode), RMSNorm fused with the residual add before it, and the elementwise steps
// of prefill and the vision tower (SwiGLU's product, the text and vision rotaries) with torch's roundings.
//
// segment_attention_bf16(q, k, v, q_starts, q_lens, kv_slots, kv_offsets, causal, scale, out)
//   q, out: [T, heads, D] bf16 contiguous; k, v: [slots, kv_heads, D] bf16 contiguous (a flat
//   paged KV cache, or the vision rows themselves; heads a multiple of kv_heads: grouped-query
//   attention); D in {32, 48, ..., 128};
//   segment s: query rows [q_starts[s], + q_lens[s]) attend to the keys at rows
//   kv_slots[kv_offsets[s] : kv_offsets[s+1]] (int64). Causal: the queries are the last q_lens[s]
//   positions of those keys. Writes out's rows of the segments and leaves every other row untouched.
//
// Why it exists: torch's CPU flash attention converts bf16 to float32 and runs float32 GEMMs on
// machines without AMX (~175 GFLOP/s here); on AVX512-BF16 dot products the segment kernel runs
// 2.5-4.3x faster (`glimpse bench kernels`). Where the CPU has AMX-BF16 (and Linux grants the
// tiles), the segment kernel's two products run on AMX tiles instead: 3.1x its AVX512-BF16 path on
// vision segments, faster than torch's flash kernel on the decoder's prefill chunks once that one's
// K/V gather is counted; `use_tile_attention(False)` asks for the AVX512-BF16 path. Numerics:
// scores, softmax and sums in float32; the segment kernel rounds the probabilities to bf16 for the
// product with V (as torch's flash kernel does), the decode kernel keeps them and V in float32.
//
// Every entry point checks its tables and raises (a Python RuntimeError) on a bad one; none reads
// outside the tensors it is given. They release the GIL while they run.

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cpuid.h>
#include <immintrin.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlockQ = 32;  // query rows per work item
constexpr int64_t kBlockK = 64;  // keys per inner block: four vectors of 16 scores

// float32 exp for x <= 0: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6 Taylor
// polynomial (relative error ~1e-7); below about -87 the result is denormal, and 0 below -104.
inline __m512 exp_ps(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline uint32_t load_pair(const at::BFloat16* p) {  // two adjacent bf16 as one 32-bit word
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// One sequence (or vision segment): query rows [q_start, q_start + n) of q and out; its keys are
// rows slots[0..ctx) of k and v. Causal: query i sits at position ctx - n + i and sees keys up to it.
struct Segment {
  int64_t q_start, n, ctx, padded;  // padded: ctx rounded up to a multiple of kBlockK (packed rows)
  const int64_t* slots;
};

struct Layout {
  int64_t q_stride, kv_stride;  // elements from one row to the next: heads * D, kv_heads * D
  bool causal;
  float scale;
};

// 16 rows of 16 dwords (r[i]: row i) -> their 16 columns (r[c]: dword c of rows 0..15), in registers.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: pairs of rows interleaved by dword
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + m], lane L: column 4L + m of rows i..i+3
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // gather lane L of u[m], u[4 + m], u[8 + m], u[12 + m]: column 4L + m
    const __m512i a = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x88), b = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xdd);
    const __m512i c = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x88), d = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xdd);
    r[m] = _mm512_shuffle_i32x4(a, c, 0x88);
    r[4 + m] = _mm512_shuffle_i32x4(b, d, 0x88);
    r[8 + m] = _mm512_shuffle_i32x4(a, c, 0xdd);
    r[12 + m] = _mm512_shuffle_i32x4(b, d, 0xdd);
  }
}

// Word indices that interleave two vectors of 32 bf16 by pairs: (a[i], b[i]) for i in 0..15 (kInterleaveLo),
// 16..31 (kInterleaveHi), as _mm512_permutex2var_epi16 reads them (b's words are 32..63).
struct InterleaveIndex {
  alignas(64) uint16_t lo[32], hi[32];
  InterleaveIndex() {
    for (int i = 0; i < 16; ++i) lo[2 * i] = i, lo[2 * i + 1] = 32 + i, hi[2 * i] = 16 + i, hi[2 * i + 1] = 48 + i;
  }
};
const InterleaveIndex kInterleave;

// K of one (segment, kv head) packed for S = Q K^T: word [p][j] holds the pair (K[j, 2p], K[j, 2p+1]),
// so 16 consecutive words are 16 keys' pair p. V packed for O = P V: word [j/2][d] holds the pair
// (V[j, d], V[j+1, d]). Padding keys are zero. K goes 16 keys x 16 pairs at a time through a register
// transpose, V a pair of keys x 16 dims at a time through one word permutation: the words a scalar
// loop would write (a vision-shaped call spent ~22% of its time packing with that loop, ~10% now).
void pack_kv(const at::BFloat16* k, const at::BFloat16* v, int64_t kv_stride, int64_t D, const Segment& seg,
             uint32_t* kt, uint32_t* vp) {
  const int64_t P = D / 2;  // pairs per key: a multiple of 8 (D is a multiple of 16)
  for (int64_t j0 = 0; j0 < seg.padded; j0 += 16) {
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      const int64_t cols = std::min<int64_t>(16, P - p0);
      const __mmask16 m = cols == 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t j = j0 + i;
        r[i] = j < seg.ctx ? _mm512_maskz_loadu_epi32(m, k + seg.slots[j] * kv_stride + 2 * p0) : _mm512_setzero_si512();
      }
      transpose16x16(r);
      for (int64_t c = 0; c < cols; ++c) _mm512_storeu_si512(kt + (p0 + c) * seg.padded + j0, r[c]);
    }
  }
  const __m512i lo = _mm512_load_si512(kInterleave.lo), hi = _mm512_load_si512(kInterleave.hi);
  for (int64_t j = 0; j < seg.padded; j += 2) {
    uint32_t* dst = vp + (j / 2) * D;
    const at::BFloat16* v0 = j < seg.ctx ? v + seg.slots[j] * kv_stride : nullptr;
    const at::BFloat16* v1 = j + 1 < seg.ctx ? v + seg.slots[j + 1] * kv_stride : nullptr;
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const __mmask32 m = D - d0 >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << (D - d0)) - 1);
      const __m512i a = v0 ? _mm512_maskz_loadu_epi16(m, v0 + d0) : _mm512_setzero_si512();
      const __m512i b = v1 ? _mm512_maskz_loadu_epi16(m, v1 + d0) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + d0, _mm512_permutex2var_epi16(a, lo, b));
      if (D - d0 > 16) _mm512_storeu_si512(dst + d0 + 16, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// Online softmax of one query row over one block of kBlockK scores, the first `visible` of them
// valid: scales them, raises the running max m, adds the block's exponentials to the running sum l,
// writes them to p as bf16 pairs (invalid ones 0) and returns the factor for the row's earlier sums.
inline float softmax_row(const float* scores, int64_t visible, float scale, float& m, float& l, uint32_t* p) {
  __mmask16 valid[4];
  for (int c = 0; c < 4; ++c) {
    const int64_t left = std::clamp<int64_t>(visible - 16 * c, 0, 16);
    valid[c] = left == 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 s[4];
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int c = 0; c < 4; ++c) {
    s[c] = _mm512_mul_ps(_mm512_load_ps(scores + 16 * c), vscale);
    mx = _mm512_mask_max_ps(mx, valid[c], mx, s[c]);
  }
  const float m_new = std::max(m, _mm512_reduce_max_ps(mx));  // finite: key 0 is in the first block
  const float alpha = std::exp(m - m_new);  // 0 on the first block (m = -inf)
  const __m512 vm = _mm512_set1_ps(m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < 4; ++c) {
    s[c] = _mm512_maskz_mov_ps(valid[c], exp_ps(_mm512_sub_ps(s[c], vm)));
    sum = _mm512_add_ps(sum, s[c]);
  }
  l = l * alpha + _mm512_reduce_add_ps(sum);
  m = m_new;
  _mm512_store_si512(p, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(s[1], s[0])));
  _mm512_store_si512(p + 16, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(s[3], s[2])));
  return alpha;
}

// Output rows i < nq: the float32 sums O[i] (rows ND * 16 floats apart) over their softmax sums l[i], rounded
// to bf16 at out + i * stride.
template <int ND>
inline void store_rows(const float* O, const float* l, int64_t nq, at::BFloat16* out, int64_t stride) {
  for (int64_t i = 0; i < nq; ++i) {
    const __m512 inv = _mm512_set1_ps(1.f / l[i]);
    const float* row = O + i * ND * 16;
    at::BFloat16* o = out + i * stride;
    for (int c = 0; c < ND; ++c) {
      const __m256bh r = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(row + 16 * c), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * c), reinterpret_cast<__m256i>(r));
    }
  }
}

// One work item: rows [q0, q0 + nq) of a segment, one head, against all its keys.
// Causal: query row i of the segment sits at position ctx - n + i and sees keys 0..ctx - n + i.
// Rows go through the two products R at a time (R x 4 score vectors, then R x ND output vectors, in
// registers): every row's sums are the same additions in the same order whatever R is, so R changes
// the speed, not the bits. R = 4 keeps 16 accumulators in flight, enough to cover the dot product's
// latency on two FMA pipes (AMD Zen 5); R = 2 is the earlier kernel (`use_wide_attention_rows(False)`).
template <int ND, int R>
void attend_block(const at::BFloat16* q, const Layout& lay, const Segment& seg, int64_t q0, int64_t nq,
                  const uint32_t* kt, const uint32_t* vp, at::BFloat16* out) {
  constexpr int64_t D = ND * 16, P = D / 2;
  constexpr int RV = ND * R <= 16 ? R : 2;  // rows per pass of P V: at most 16 accumulators (D > 64: two rows)
  constexpr int64_t kRows = kBlockQ + R - 1;  // a last group of rows may run past nq: those repeat row nq - 1
  alignas(64) float S[kRows][kBlockK];
  alignas(64) uint32_t Pp[kRows][kBlockK / 2];
  alignas(64) float O[kRows][D];
  float m[kRows], l[kRows], alpha[kRows];
  std::memset(O, 0, sizeof(O));
  std::memset(Pp, 0, sizeof(Pp));
  for (int64_t i = 0; i < kRows; ++i) m[i] = -INFINITY, l[i] = 0.f, alpha[i] = 0.f;
  const at::BFloat16* qrow[kRows];
  for (int64_t i = 0; i < nq; ++i) qrow[i] = q + (seg.q_start + q0 + i) * lay.q_stride;
  for (int64_t i = nq; i < kRows; ++i) qrow[i] = qrow[nq - 1];  // computed and dropped

  const int64_t offset = lay.causal ? seg.ctx - seg.n : 0;  // position of query row 0 (causal)
  const int64_t key_end = lay.causal ? offset + q0 + nq : seg.ctx;  // no key past the last row's position
  for (int64_t j0 = 0; j0 < key_end; j0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, seg.ctx - j0);
    // S = Q K^T for this key block, R query rows at a time.
    for (int64_t i = 0; i < nq; i += R) {
      __m512 acc[R][4];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
      const uint32_t* kb = kt + j0;
      for (int64_t p = 0; p < P; ++p, kb += seg.padded) {
        const __m512bh k0 = as_bh(_mm512_loadu_si512(kb)), k1 = as_bh(_mm512_loadu_si512(kb + 16));
        const __m512bh k2 = as_bh(_mm512_loadu_si512(kb + 32)), k3 = as_bh(_mm512_loadu_si512(kb + 48));
        for (int r = 0; r < R; ++r) {
          const __m512bh x = as_bh(_mm512_set1_epi32(load_pair(qrow[i + r] + 2 * p)));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], k0, x), acc[r][1] = _mm512_dpbf16_ps(acc[r][1], k1, x);
          acc[r][2] = _mm512_dpbf16_ps(acc[r][2], k2, x), acc[r][3] = _mm512_dpbf16_ps(acc[r][3], k3, x);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c) _mm512_store_ps(S[i + r] + 16 * c, acc[r][c]);
    }
    // Online softmax: running max m and sum l per row; probabilities rounded to bf16 pairs.
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t visible = lay.causal ? std::min(nk, offset + q0 + i - j0 + 1) : nk;  // may be <= 0 (causal)
      alpha[i] = softmax_row(S[i], visible, lay.scale, m[i], l[i], Pp[i]);
    }
    // O = alpha O + P V, RV rows at a time (rows past nq: alpha 0, P 0).
    const int64_t npairs = (nk + 1) / 2;
    const uint32_t* vb0 = vp + (j0 / 2) * D;
    for (int64_t i = 0; i < nq; i += RV) {
      __m512 o[RV][ND];
      for (int r = 0; r < RV; ++r) {
        const __m512 a = _mm512_set1_ps(alpha[i + r]);
        for (int c = 0; c < ND; ++c) o[r][c] = _mm512_mul_ps(_mm512_load_ps(O[i + r] + 16 * c), a);
      }
      const uint32_t* vb = vb0;
      for (int64_t jp = 0; jp < npairs; ++jp, vb += D) {
        __m512bh pr[RV];
        for (int r = 0; r < RV; ++r) pr[r] = as_bh(_mm512_set1_epi32(Pp[i + r][jp]));
        for (int c = 0; c < ND; ++c) {
          const __m512bh vv = as_bh(_mm512_loadu_si512(vb + 16 * c));
          for (int r = 0; r < RV; ++r) o[r][c] = _mm512_dpbf16_ps(o[r][c], vv, pr[r]);
        }
      }
      for (int r = 0; r < RV; ++r)
        for (int c = 0; c < ND; ++c) _mm512_store_ps(O[i + r] + 16 * c, o[r][c]);
    }
  }
  store_rows<ND>(O[0], l, nq, out + (seg.q_start + q0) * lay.q_stride, lay.q_stride);
}

using BlockFn = void (*)(const at::BFloat16*, const Layout&, const Segment&, int64_t, int64_t, const uint32_t*,
                         const uint32_t*, at::BFloat16*);

// ---- The same block on AMX tiles (Intel since Sapphire Rapids) ----
// S = Q K^T and P V as tile products (TDPBF16PS: bf16 pairs, float32 sums) on the packed K and V
// above, which are already in the tiles' pair layout; the softmax is softmax_row's, so the result
// differs from attend_block's only in float32 rounding: the order of each dot product's additions,
// and a block's P V summed apart before it is added to the rescaled running sums. Tile
// registers, one configuration for both products: 0-3 the float32 results (16 x 16), 4 and 5 a
// 16 x 32 bf16 operand and its 32 x 16 partner, 6 and 7 the same for a last 16 of the head dim
// when D is an odd multiple of 16.
// Compilers without AMX intrinsics (GCC < 11, Clang < 12) build the AVX512-BF16 path alone.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define GLIMPSE_HAVE_TILES 1
#else
#define GLIMPSE_HAVE_TILES 0
#endif

#if GLIMPSE_HAVE_TILES
#define GLIMPSE_TILES __attribute__((target("amx-tile,amx-bf16")))

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

GLIMPSE_TILES void tiles_configure() {
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  cfg.rows[6] = 16, cfg.colsb[6] = 32;  // Q: 16 rows x the last 16 bf16 of the head dim
  cfg.rows[7] = 8, cfg.colsb[7] = 64;   // K: those 16 dims as 8 pair rows x 16 keys
  asm volatile("" : : "r"(&cfg) : "memory");  // GCC 12 does not see ldtilecfg read cfg and drops the stores
  _tile_loadconfig(&cfg);
}

GLIMPSE_TILES void tiles_release() { _tile_release(); }

// Tile numbers are immediates in the instructions: OP(i) for result tile t in 0-3.
#define GLIMPSE_ON_TILE(t, OP) \
  switch (t) {                 \
    case 0: OP(0); break;      \
    case 1: OP(1); break;      \
    case 2: OP(2); break;      \
    default: OP(3); break;     \
  }
#define GLIMPSE_ZERO(i) _tile_zero(i)
#define GLIMPSE_STORE(i) _tile_stored(i, p, stride)
#define GLIMPSE_MADD(i) _tile_dpbf16ps(i, 4, 5)
#define GLIMPSE_MADD_TAIL(i) _tile_dpbf16ps(i, 6, 7)

GLIMPSE_TILES inline void tile_zero(int t) { GLIMPSE_ON_TILE(t, GLIMPSE_ZERO) }

GLIMPSE_TILES inline void tile_store(int t, void* p, int64_t stride) { GLIMPSE_ON_TILE(t, GLIMPSE_STORE) }

// tile t += tile 4 x (the 32 x 16 pairs at p, rows `stride` bytes apart, loaded into tile 5)
GLIMPSE_TILES inline void tile_madd(int t, const void* p, int64_t stride) {
  _tile_loadd(5, p, stride);
  GLIMPSE_ON_TILE(t, GLIMPSE_MADD)
}

// tile t += tile 6 x (the 16 x 16 pairs at p, loaded into tile 7)
GLIMPSE_TILES inline void tile_madd_tail(int t, const void* p, int64_t stride) {
  _tile_loadd(7, p, stride);
  GLIMPSE_ON_TILE(t, GLIMPSE_MADD_TAIL)
}

// Rows [q0, q0 + nq) of a segment, nq <= 16, one head; the calling thread has configured its tiles.
template <int ND>
GLIMPSE_TILES void attend_rows_tiles(const at::BFloat16* q, const Layout& lay, const Segment& seg, int64_t q0,
                                     int64_t nq, const uint32_t* kt, const uint32_t* vp, at::BFloat16* out) {
  constexpr int64_t D = ND * 16, kChunks = D / 32;
  alignas(64) at::BFloat16 Q[16][D];  // the rows, zero past nq: one tile operand per 32 dims
  alignas(64) float S[16][kBlockK];
  alignas(64) uint32_t Pp[16][kBlockK / 2];
  alignas(64) float O[16][D], Ob[16][D];  // running sums; this block's P V
  float m[16], l[16], alpha[16];
  std::memset(Q, 0, sizeof(Q));
  std::memset(Pp, 0, sizeof(Pp));
  std::memset(O, 0, sizeof(O));
  for (int64_t i = 0; i < 16; ++i) m[i] = -INFINITY, l[i] = 0.f;
  for (int64_t i = 0; i < nq; ++i) std::memcpy(Q[i], q + (seg.q_start + q0 + i) * lay.q_stride, D * sizeof(at::BFloat16));
  // GCC's tile loads are asm without a memory operand: the barriers keep the writes to Q and Pp before them.
  asm volatile("" ::: "memory");

  const int64_t offset = lay.causal ? seg.ctx - seg.n : 0;
  const int64_t key_end = lay.causal ? offset + q0 + nq : seg.ctx;
  const int64_t kt_stride = seg.padded * 4;  // bytes from one pair row of packed K to the next
  for (int64_t j0 = 0; j0 < key_end; j0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, seg.ctx - j0);
    for (int t = 0; t < 4; ++t) tile_zero(t);
    for (int64_t c = 0; c < kChunks; ++c) {
      _tile_loadd(4, &Q[0][32 * c], D * 2);
      for (int t = 0; t < 4; ++t) tile_madd(t, kt + 16 * c * seg.padded + j0 + 16 * t, kt_stride);
    }
    if constexpr (ND % 2 == 1) {
      _tile_loadd(6, &Q[0][32 * kChunks], D * 2);
      for (int t = 0; t < 4; ++t) tile_madd_tail(t, kt + 16 * kChunks * seg.padded + j0 + 16 * t, kt_stride);
    }
    for (int t = 0; t < 4; ++t) tile_store(t, &S[0][16 * t], kBlockK * 4);
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t visible = lay.causal ? std::min(nk, offset + q0 + i - j0 + 1) : nk;
      alpha[i] = softmax_row(S[i], visible, lay.scale, m[i], l[i], Pp[i]);
    }
    asm volatile("" ::: "memory");
    const int64_t halves = nk > 32 ? 2 : 1;  // keys past nk have probability 0
    for (int g0 = 0; g0 < ND; g0 += 4) {
      const int ng = std::min(4, ND - g0);
      for (int t = 0; t < ng; ++t) tile_zero(t);
      for (int64_t h = 0; h < halves; ++h) {
        _tile_loadd(4, &Pp[0][16 * h], kBlockK * 2);
        for (int t = 0; t < ng; ++t) tile_madd(t, vp + (j0 / 2 + 16 * h) * D + 16 * (g0 + t), D * 4);
      }
      for (int t = 0; t < ng; ++t) tile_store(t, &Ob[0][16 * (g0 + t)], D * 4);
    }
    for (int64_t i = 0; i < nq; ++i) {
      const __m512 a = _mm512_set1_ps(alpha[i]);
      for (int c = 0; c < ND; ++c)
        _mm512_store_ps(O[i] + 16 * c, _mm512_fmadd_ps(_mm512_load_ps(O[i] + 16 * c), a, _mm512_load_ps(Ob[i] + 16 * c)));
    }
  }
  store_rows<ND>(O[0], l, nq, out + (seg.q_start + q0) * lay.q_stride, lay.q_stride);
}

template <int ND>
void attend_block_tiles(const at::BFloat16* q, const Layout& lay, const Segment& seg, int64_t q0, int64_t nq,
                        const uint32_t* kt, const uint32_t* vp, at::BFloat16* out) {
  for (int64_t r = 0; r < nq; r += 16) attend_rows_tiles<ND>(q, lay, seg, q0 + r, std::min<int64_t>(16, nq - r), kt, vp, out);
}

#else  // no AMX intrinsics: never used (tiles_available() is false)
void tiles_configure() {}
void tiles_release() {}
template <int ND>
void attend_block_tiles(const at::BFloat16* q, const Layout& lay, const Segment& seg, int64_t q0, int64_t nq,
                        const uint32_t* kt, const uint32_t* vp, at::BFloat16* out) {
  attend_block<ND>(q, lay, seg, q0, nq, kt, vp, out);
}
#endif

// Whether this CPU has AMX-BF16 and the kernel lets this process use its tile registers (Linux asks
// each process to request them once). Decided on first use.
bool tiles_available() {
  if (!GLIMPSE_HAVE_TILES) return false;
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;  // AMX-BF16, AMX-TILE
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;    // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

std::atomic<bool> tiles_wanted{true};  // use_tile_attention(false): the AVX512-BF16 path (tests, benchmarks)

bool tiles_on() { return tiles_wanted.load(std::memory_order_relaxed) && tiles_available(); }

// Decode: one query row per sequence, K and V read straight from the cache through the slots (a
// single query cannot amortise packing). Per (sequence, kv head), each query head of the group
// scores every key with AVX512-BF16 dot products over D, takes a float32 softmax, and sums the
// float32 V rows weighted by it, tile by tile of keys.
// out[i] = the sum of a[i]'s 16 lanes, for 16 vectors at once (45 shuffles and adds where 16
// horizontal sums take ~150): pairs of vectors interleave and add, then pairs of pairs, then the
// four 128-bit quarters fold; quarter q of the result ends up holding the sums of a[4q..4q+3].
inline __m512 sum_lanes16(const __m512* a) {
  __m512 b[8], c[4];
  for (int k = 0; k < 8; ++k)
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {
    const __m512d lo = _mm512_castps_pd(b[2 * k]), hi = _mm512_castps_pd(b[2 * k + 1]);
    c[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(lo, hi)), _mm512_castpd_ps(_mm512_unpackhi_pd(lo, hi)));
  }
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// K and V rows are read through the slots, one head's D values at a time (a head's row lies Hkv * D
// values from the next slot's): the hardware prefetcher does not follow that, so each row is
// requested kPrefetch keys ahead. Measured on a 2-core AMX Xeon, 64 sequences x 213 keys, 12 query on 4 KV
// heads of 64, 12 layers: 16.5 -> 8.4-9.4 ms with the KV in cache (10 -> 18-20 GB/s), 17.2 -> 11.0-11.8 ms
// after a 512 MiB flush; 8 and 32-64 keys ahead were slower than 16.
constexpr int64_t kPrefetch = 16;

template <int64_t D>
inline void prefetch_row(const at::BFloat16* p) {
  for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
}

inline void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
}

// A head's scores -> their softmax, in place (float32; exp_ps as the segment kernels).
inline void softmax_in_place(float* s, int64_t ctx) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < ctx; j += 16) {
    const __mmask16 m = ctx - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (ctx - j)) - 1);
    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, s + j));
  }
  const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < ctx; j += 16) {
    const __mmask16 m = ctx - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (ctx - j)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(m, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), vmax)));
    _mm512_mask_storeu_ps(s + j, m, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float inv = 1.f / _mm512_reduce_add_ps(sum);
  for (int64_t j = 0; j < ctx; ++j) s[j] *= inv;
}

// sums[h] += sum over keys j in [j0, j1) of p[h][j] * V[j], for ng <= kHeads query heads sharing one KV head:
// p the first head's probabilities (heads ctx apart), sums its [D] running sums (heads D apart), V row j at
// vcol + slots[j] * stride. With prefetch_n > 0, key j + kPrefetch's row is requested (prefetch_n bytes from
// its start at vcol's row: a whole slot row for decode_seq).
template <int ND, int64_t kHeads>
inline void pv_pass(const float* p, int64_t ctx, int64_t ng, const at::BFloat16* vcol, int64_t stride,
                    const int64_t* slots, int64_t j0, int64_t j1, int64_t prefetch_n, float* sums) {
  constexpr int64_t D = ND * 16;
  __m512 acc[kHeads][ND];
  for (int64_t g = 0; g < ng; ++g)
    for (int c = 0; c < ND; ++c) acc[g][c] = _mm512_loadu_ps(sums + g * D + 16 * c);
  for (int64_t j = j0; j < j1; ++j) {
    const at::BFloat16* vr = vcol + slots[j] * stride;
    if (prefetch_n && j + kPrefetch < ctx) prefetch_bytes(vcol + slots[j + kPrefetch] * stride, prefetch_n);
    __m512 vf[ND];
    for (int c = 0; c < ND; ++c)
      vf[c] = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vr + 16 * c))), 16));
    for (int64_t g = 0; g < ng; ++g) {
      const __m512 pv = _mm512_set1_ps(p[g * ctx + j]);
      for (int c = 0; c < ND; ++c) acc[g][c] = _mm512_fmadd_ps(vf[c], pv, acc[g][c]);
    }
  }
  for (int64_t g = 0; g < ng; ++g)
    for (int c = 0; c < ND; ++c) _mm512_storeu_ps(sums + g * D + 16 * c, acc[g][c]);
}

// heads x [D] float32 sums -> bf16 rows of out (heads D apart).
template <int ND>
inline void store_sums(const float* sums, int64_t heads, at::BFloat16* out) {
  for (int64_t h = 0; h < heads; ++h)
    for (int c = 0; c < ND; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * ND * 16 + 16 * c),
                          reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(sums + h * ND * 16 + 16 * c))));
}

template <int ND>  // D / 16
void decode_group(const at::BFloat16* q, int64_t G, const at::BFloat16* kc, const at::BFloat16* vc, int64_t kv_stride,
                  const int64_t* slots, int64_t ctx, float scale, float* scores, at::BFloat16* out) {
  // q, out: the group's first head in its row (the group's heads D apart); kc, vc: this kv head's column.
  constexpr int64_t D = ND * 16;
  constexpr int NC = (ND + 1) / 2;  // 32-element chunks of a row, the last one half full when ND is odd
  auto load_chunk = [](const at::BFloat16* p, int c) {
    return (ND % 2 && c == NC - 1) ? _mm512_maskz_loadu_epi16(__mmask32(0xFFFF), p + 32 * c)
                                   : _mm512_loadu_si512(p + 32 * c);
  };
  constexpr int64_t kGroupMax = 16;
  for (int64_t g0 = 0; g0 < G; g0 += kGroupMax) {
    const int64_t ng = std::min(kGroupMax, G - g0);
    __m512i qv[kGroupMax][NC];
    for (int64_t g = 0; g < ng; ++g)
      for (int c = 0; c < NC; ++c) qv[g][c] = load_chunk(q + (g0 + g) * D, c);
    // Keys in blocks of 16: each (head, key) dot product leaves 16 float32 partial sums, parked in
    // `part`; one transposed reduction per head then turns the block's 16 vectors into its 16 scores
    // (a horizontal sum per key cost ~3x more instructions than the dot product itself).
    alignas(64) float part[kGroupMax][16][16];
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t j0 = 0; j0 < ctx; j0 += 16) {
      const int64_t nk = std::min<int64_t>(16, ctx - j0);
      for (int64_t i = 0; i < nk; ++i) {
        const at::BFloat16* kr = kc + slots[j0 + i] * kv_stride;
        if (j0 + i + kPrefetch < ctx) prefetch_row<D>(kc + slots[j0 + i + kPrefetch] * kv_stride);
        __m512bh kv[NC];
        for (int c = 0; c < NC; ++c) kv[c] = as_bh(load_chunk(kr, c));
        for (int64_t g = 0; g < ng; ++g) {
          __m512 acc = _mm512_setzero_ps();
          for (int c = 0; c < NC; ++c) acc = _mm512_dpbf16_ps(acc, kv[c], as_bh(qv[g][c]));
          _mm512_store_ps(part[g][i], acc);
        }
      }
      const __mmask16 m = nk == 16 ? __mmask16(0xFFFF) : __mmask16((1u << nk) - 1);
      for (int64_t g = 0; g < ng; ++g) {
        __m512 rows[16];
        for (int64_t i = 0; i < 16; ++i) rows[i] = i < nk ? _mm512_load_ps(part[g][i]) : _mm512_setzero_ps();
        _mm512_mask_storeu_ps(scores + (g0 + g) * ctx + j0, m, _mm512_mul_ps(sum_lanes16(rows), vscale));
      }
    }
  }
  for (int64_t j = 0; j < std::min(ctx, kPrefetch); ++j) prefetch_row<D>(vc + slots[j] * kv_stride);  // V's first rows
  for (int64_t g = 0; g < G; ++g) softmax_in_place(scores + g * ctx, ctx);  // each head's scores
  // O = P V over tiles of keys: every query head's pass over a tile reads V from L1, so V leaves
  // memory once however many query heads share it. Partial sums wait in `sums` ([G][D] floats).
  constexpr int64_t kHeads = ND <= 4 ? 4 : 2;  // query heads per pass (their accumulators in registers)
  constexpr int64_t kTile = 64;                // keys per tile: 64 * D bf16 rows, at most 16 KB
  float* sums = scores + G * ctx;
  std::fill(sums, sums + G * D, 0.f);
  for (int64_t j0 = 0; j0 < ctx; j0 += kTile) {
    const int64_t j1 = std::min(ctx, j0 + kTile);
    for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
      const int64_t ng = std::min(kHeads, G - g0);
      pv_pass<ND, kHeads>(scores + g0 * ctx, ctx, ng, vc, kv_stride, slots, j0, j1, g0 == 0 ? D * 2 : 0,
                          sums + g0 * D);
    }
  }
  store_sums<ND>(sums, G, out);
}

// Decode, one sequence per call: every KV head of its slots at once. The same arithmetic as
// decode_group, head by head and in the same order (so the same bits), but each slot's row of all KV
// heads (Hkv * D values, contiguous) is read in one pass, in slot order: decode_group's
// (sequence, KV head) items each read D of every Hkv * D, a strided walk the hardware prefetcher
// does not follow. Measured on a 2-core AMD EPYC (AVX512-BF16), 64 sequences x ~210 keys, 12 query
// on 4 KV heads of 64, 12 layers: see docs/benchmarks.md "Session 11".
constexpr int64_t kSeqHeadsMax = 64;  // query heads one call handles (more: decode_group per KV head)

template <int ND>  // D / 16
void decode_seq(const at::BFloat16* q, int64_t Hkv, int64_t G, const at::BFloat16* kc, const at::BFloat16* vc,
                const int64_t* slots, int64_t ctx, float scale, float* scores, at::BFloat16* out) {
  // q, out: the sequence's row, [Hkv * G, D]; kc, vc: the caches' first slot, rows Hkv * D apart.
  constexpr int64_t D = ND * 16;
  constexpr int NC = (ND + 1) / 2;
  auto load_chunk = [](const at::BFloat16* p, int c) {
    return (ND % 2 && c == NC - 1) ? _mm512_maskz_loadu_epi16(__mmask32(0xFFFF), p + 32 * c)
                                   : _mm512_loadu_si512(p + 32 * c);
  };
  const int64_t H = Hkv * G, row = Hkv * D;
  __m512i qv[kSeqHeadsMax][NC];
  for (int64_t hh = 0; hh < H; ++hh)
    for (int c = 0; c < NC; ++c) qv[hh][c] = load_chunk(q + hh * D, c);
  alignas(64) float part[kSeqHeadsMax][16][16];
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < ctx; j0 += 16) {
    const int64_t nk = std::min<int64_t>(16, ctx - j0);
    for (int64_t i = 0; i < nk; ++i) {
      const at::BFloat16* kr = kc + slots[j0 + i] * row;
      if (j0 + i + kPrefetch < ctx) prefetch_bytes(kc + slots[j0 + i + kPrefetch] * row, row * 2);
      for (int64_t h = 0; h < Hkv; ++h) {
        __m512bh kv[NC];
        for (int c = 0; c < NC; ++c) kv[c] = as_bh(load_chunk(kr + h * D, c));
        for (int64_t g = 0; g < G; ++g) {
          __m512 acc = _mm512_setzero_ps();
          for (int c = 0; c < NC; ++c) acc = _mm512_dpbf16_ps(acc, kv[c], as_bh(qv[h * G + g][c]));
          _mm512_store_ps(part[h * G + g][i], acc);
        }
      }
    }
    const __mmask16 m = nk == 16 ? __mmask16(0xFFFF) : __mmask16((1u << nk) - 1);
    for (int64_t hh = 0; hh < H; ++hh) {
      __m512 rows[16];
      for (int64_t i = 0; i < 16; ++i) rows[i] = i < nk ? _mm512_load_ps(part[hh][i]) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(scores + hh * ctx + j0, m, _mm512_mul_ps(sum_lanes16(rows), vscale));
    }
  }
  for (int64_t j = 0; j < std::min(ctx, kPrefetch); ++j) prefetch_bytes(vc + slots[j] * row, row * 2);
  for (int64_t hh = 0; hh < H; ++hh) softmax_in_place(scores + hh * ctx, ctx);  // each head's scores
  // O = P V over tiles of keys, each KV head's query heads in passes of kHeads (decode_group's order);
  // the first pass over a tile prefetches whole slot rows, so the other heads' passes read V from cache.
  constexpr int64_t kHeads = ND <= 4 ? 4 : 2;
  constexpr int64_t kTile = 64;
  float* sums = scores + H * ctx;
  std::fill(sums, sums + H * D, 0.f);
  for (int64_t j0 = 0; j0 < ctx; j0 += kTile) {
    const int64_t j1 = std::min(ctx, j0 + kTile);
    for (int64_t h = 0; h < Hkv; ++h) {
      for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
        const int64_t ng = std::min(kHeads, G - g0);
        const int64_t first = h * G + g0;  // query head of this pass's first accumulator
        pv_pass<ND, kHeads>(scores + first * ctx, ctx, ng, vc + h * D, row, slots, j0, j1,
                            h == 0 && g0 == 0 ? row * 2 : 0, sums + first * D);
      }
    }
  }
  store_sums<ND>(sums, H, out);
}

using SeqDecodeFn = void (*)(const at::BFloat16*, int64_t, int64_t, const at::BFloat16*, const at::BFloat16*,
                             const int64_t*, int64_t, float, float*, at::BFloat16*);

using DecodeFn = void (*)(const at::BFloat16*, int64_t, const at::BFloat16*, const at::BFloat16*, int64_t,
                          const int64_t*, int64_t, float, float*, at::BFloat16*);

// The kernel instantiated for head dim D (make(std::integral_constant<int, D / 16>)); nullptr for
// a head dim it is not built for (glimpse/kernels.py NATIVE_HEAD_DIMS lists the same ones).
template <typename Make>
auto for_head_dim(int64_t D, const Make& make) -> decltype(make(std::integral_constant<int, 2>{})) {
  switch (D) {
    case 32: return make(std::integral_constant<int, 2>{});
    case 48: return make(std::integral_constant<int, 3>{});
    case 64: return make(std::integral_constant<int, 4>{});
    case 80: return make(std::integral_constant<int, 5>{});
    case 96: return make(std::integral_constant<int, 6>{});
    case 112: return make(std::integral_constant<int, 7>{});
    case 128: return make(std::integral_constant<int, 8>{});
    default: return nullptr;
  }
}

// One-row linear layer: y[n] = sum_k W[n, k] x[k] (+ b[n]). Four weight rows at a time, 32 products
// per dot-product instruction, one float32 sum per row rounded once to bf16. torch's own one-row
// bf16 kernel and oneDNN's stream weights at 39-47 and ~31 GB/s here, this one at ~50 when the
// machine's read probe gives ~48 and at 67-75 when it gives ~80 (`glimpse bench kernels`).
void linear_rows(const at::BFloat16* x, const at::BFloat16* w, const at::BFloat16* bias, int64_t K, int64_t n0,
                 int64_t n1, at::BFloat16* y) {
  const int64_t full = K / 32 * 32;
  const __mmask32 tail = __mmask32((uint64_t(1) << (K - full)) - 1);
  auto row_sum = [&](const at::BFloat16* r, int64_t count, float* sums) {  // count (<= 4) rows from r
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t k = 0; k < full; k += 32) {
      const __m512bh xv = as_bh(_mm512_loadu_si512(x + k));
      for (int64_t i = 0; i < count; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], as_bh(_mm512_loadu_si512(r + i * K + k)), xv);
    }
    if (full < K) {
      const __m512bh xv = as_bh(_mm512_maskz_loadu_epi16(tail, x + full));
      for (int64_t i = 0; i < count; ++i)
        acc[i] = _mm512_dpbf16_ps(acc[i], as_bh(_mm512_maskz_loadu_epi16(tail, r + i * K + full)), xv);
    }
    for (int64_t i = 0; i < count; ++i) sums[i] = _mm512_reduce_add_ps(acc[i]);
  };
  float sums[4];
  for (int64_t n = n0; n < n1; n += 4) {
    const int64_t count = std::min<int64_t>(4, n1 - n);
    if (count == 4) {  // the hot loop, unrolled by the compiler for a fixed count
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      const at::BFloat16* r = w + n * K;
      for (int64_t k = 0; k < full; k += 32) {
        const __m512bh xv = as_bh(_mm512_loadu_si512(x + k));
        a0 = _mm512_dpbf16_ps(a0, as_bh(_mm512_loadu_si512(r + k)), xv);
        a1 = _mm512_dpbf16_ps(a1, as_bh(_mm512_loadu_si512(r + K + k)), xv);
        a2 = _mm512_dpbf16_ps(a2, as_bh(_mm512_loadu_si512(r + 2 * K + k)), xv);
        a3 = _mm512_dpbf16_ps(a3, as_bh(_mm512_loadu_si512(r + 3 * K + k)), xv);
      }
      if (full < K) {
        const __m512bh xv = as_bh(_mm512_maskz_loadu_epi16(tail, x + full));
        a0 = _mm512_dpbf16_ps(a0, as_bh(_mm512_maskz_loadu_epi16(tail, r + full)), xv);
        a1 = _mm512_dpbf16_ps(a1, as_bh(_mm512_maskz_loadu_epi16(tail, r + K + full)), xv);
        a2 = _mm512_dpbf16_ps(a2, as_bh(_mm512_maskz_loadu_epi16(tail, r + 2 * K + full)), xv);
        a3 = _mm512_dpbf16_ps(a3, as_bh(_mm512_maskz_loadu_epi16(tail, r + 3 * K + full)), xv);
      }
      sums[0] = _mm512_reduce_add_ps(a0), sums[1] = _mm512_reduce_add_ps(a1);
      sums[2] = _mm512_reduce_add_ps(a2), sums[3] = _mm512_reduce_add_ps(a3);
    } else {
      row_sum(w + n * K, count, sums);
    }
    for (int64_t i = 0; i < count; ++i) y[n + i] = at::BFloat16(sums[i] + (bias ? float(bias[n + i]) : 0.f));
  }
}

// ---- bf16 <-> float32 in vectors of 16, rounding as torch does (nearest even) ----
inline __m512 load_bf16x16(const at::BFloat16* p, __mmask16 m) {  // up to 16 bf16 -> float32
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, reinterpret_cast<const void*>(p))), 16));
}

inline void store_bf16x16(at::BFloat16* p, __m512 v, __mmask16 m) {  // round to nearest even, as torch does
  _mm256_mask_storeu_epi16(reinterpret_cast<void*>(p), m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

inline __mmask16 lanes(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

inline __m512 round_bf16x16(__m512 v) {  // to bf16 (nearest even, as torch) and back to float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v))), 16));
}

// RMSNorm of one row with HF's roundings: float32 x, its mean square, x * rsqrt(ms + eps) rounded to
// bf16, then times the bf16 weight rounded to bf16 (weight * x.to(bf16) in torch). With a delta, the
// row is first x + delta rounded to bf16 (the residual add), written to `sum`. Only the order of the
// mean square's float32 sum differs from torch's. Why: eager, the norm is eight torch ops (and the
// add a ninth), ~20-40 us per row of decode for what is a few hundred nanoseconds of arithmetic.
void rms_norm_row(const at::BFloat16* x, const at::BFloat16* delta, const at::BFloat16* w, int64_t H, float eps,
                  at::BFloat16* sum, at::BFloat16* y) {
  // The mean square sums in 16 float32 lanes (lane j takes values j, j + 16, ...; a product, then an
  // add: the file is built without contraction), then adds the lanes in order.
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < H; i += 16) {
    const __mmask16 m = lanes(H - i);
    __m512 v = load_bf16x16(x + i, m);
    if (delta) {
      v = round_bf16x16(_mm512_add_ps(v, load_bf16x16(delta + i, m)));
      store_bf16x16(sum + i, v, m);
    }
    acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));  // masked-off lanes add 0 * 0
  }
  alignas(64) float lane[16];
  _mm512_store_ps(lane, acc);
  float ss = 0.f;
  for (int j = 0; j < 16; ++j) ss += lane[j];
  const __m512 r = _mm512_set1_ps(1.f / std::sqrt(ss / float(H) + eps));
  const at::BFloat16* src = delta ? sum : x;  // the row the norm sees, already rounded to bf16
  for (int64_t i = 0; i < H; i += 16) {
    const __mmask16 m = lanes(H - i);
    const __m512 normed = round_bf16x16(_mm512_mul_ps(load_bf16x16(src + i, m), r));
    store_bf16x16(y + i, _mm512_mul_ps(load_bf16x16(w + i, m), normed), m);
  }
}

// Scratch for the packed K and V, kept per calling thread: reused across calls and layers instead of
// a fresh (page-faulting) allocation each time. It grows to the largest call (4 * kv_heads *
// padded rows * D bytes: ~84 MB for 16k vision patches of 16 heads of 80) and is kept. Called
// only on the calling thread, before its parallel region: the workers write and read through the
// pointer, and the region's end orders the packing before the attention.
uint32_t* scratch(size_t words) {
  thread_local std::vector<uint32_t> buf;
  if (buf.size() < words) buf.resize(words);
  return buf.data();
}

// Runs fn(i) for i in [0, n) on torch's threads, each taking the next item when it is free: work
// items of very different cost (causal blocks late in a segment, long contexts) stay balanced,
// where at::parallel_for would give each thread one fixed contiguous range.
// tiles: each thread configures its AMX tile registers before its first item and releases them after its last.
template <typename Fn>
void for_each_item(int64_t n, const Fn& fn, bool tiles = false) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
    if (tiles) tiles_configure();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
    if (tiles) tiles_release();
  });
}

void check_cpu_bf16(std::initializer_list<const torch::Tensor*> tensors, const char* what) {
  for (const torch::Tensor* t : tensors)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->is_contiguous(), what,
                " must be contiguous bfloat16 CPU tensors");
}

void check_tables(std::initializer_list<const torch::Tensor*> tensors) {
  for (const torch::Tensor* t : tensors)
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->is_contiguous(),
                "segment, row and slot tables must be contiguous int64 CPU tensors");
}

// q, out [T, heads, D] and k, v [slots, kv_heads, D]: contiguous bf16 CPU tensors, grouped-query heads.
void check_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && out.sizes() == q.sizes(),
              "q and out must be [T, heads, D], k and v [slots, kv_heads, D]");
  TORCH_CHECK(k.size(2) == q.size(2), "q, k and v must have the same head dim");
  check_cpu_bf16({&q, &k, &v, &out}, "q, k, v and out");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "heads (", q.size(1), ") must be a multiple of kv heads (",
              k.size(1), ")");
}

// count key ranges kv_slots[ko[i] : ko[i+1]]: in order, within kv_slots, every slot a row of the cache.
void check_kv_ranges(const torch::Tensor& kv_slots, const int64_t* ko, int64_t count, int64_t num_slots) {
  TORCH_CHECK(ko[0] >= 0 && ko[count] <= kv_slots.numel(), "kv_offsets must lie within kv_slots");
  for (int64_t i = 0; i < count; ++i) TORCH_CHECK(ko[i] <= ko[i + 1], "kv_offsets must be non-decreasing");
  const int64_t* slots = kv_slots.data_ptr<int64_t>();
  for (int64_t j = ko[0]; j < ko[count]; ++j) TORCH_CHECK(slots[j] >= 0 && slots[j] < num_slots, "kv slot out of range");
}

}  // namespace

std::atomic<bool> wide_attention_rows{true};  // use_wide_attention_rows(false): two rows per pass (tests)

bool use_wide_attention_rows(std::optional<bool> enable) {
  if (enable.has_value()) wide_attention_rows.store(*enable);
  return wide_attention_rows.load();
}

void segment_attention_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            const torch::Tensor& q_starts, const torch::Tensor& q_lens, const torch::Tensor& kv_slots,
                            const torch::Tensor& kv_offsets, bool causal, double scale, const torch::Tensor& out) {
  check_attention(q, k, v, out);
  const int64_t T = q.size(0), H = q.size(1), Hkv = k.size(1), D = q.size(2);
  const bool tiles = tiles_on();
  const BlockFn fn = tiles ? for_head_dim(D, [](auto nd) -> BlockFn { return attend_block_tiles<decltype(nd)::value>; })
                    : wide_attention_rows.load()
                        ? for_head_dim(D, [](auto nd) -> BlockFn { return attend_block<decltype(nd)::value, 4>; })
                        : for_head_dim(D, [](auto nd) -> BlockFn { return attend_block<decltype(nd)::value, 2>; });
  TORCH_CHECK(fn != nullptr, "head dim ", D, " is not one of 32, 48, ..., 128");
  check_tables({&q_starts, &q_lens, &kv_slots, &kv_offsets});
  const int64_t S = q_starts.numel();
  TORCH_CHECK(q_lens.numel() == S && kv_offsets.numel() == S + 1, "one q_start, q_len and kv range per segment");
  const int64_t *qs = q_starts.data_ptr<int64_t>(), *ql = q_lens.data_ptr<int64_t>();
  const int64_t *slots = kv_slots.data_ptr<int64_t>(), *ko = kv_offsets.data_ptr<int64_t>();
  check_kv_ranges(kv_slots, ko, S, k.size(0));
  std::vector<Segment> segs;
  std::vector<int64_t> packed_at;  // first packed row of each segment
  int64_t packed_rows = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t ctx = ko[s + 1] - ko[s];
    TORCH_CHECK(qs[s] >= 0 && qs[s] <= T && ql[s] >= 0 && ql[s] <= T - qs[s], "segment ", s,
                "'s query rows lie outside the ", T, " rows");
    TORCH_CHECK(ctx >= (causal ? ql[s] : 1) || ql[s] == 0, "segment ", s, " has ", ql[s], " queries but ", ctx, " keys");
    if (ql[s] == 0) continue;
    const int64_t padded = (ctx + kBlockK - 1) / kBlockK * kBlockK;
    segs.push_back({qs[s], ql[s], ctx, padded, slots + ko[s]});
    packed_at.push_back(packed_rows);
    packed_rows += padded;
  }
  if (segs.empty()) return;

  const Layout lay{H * D, Hkv * D, causal, float(scale)};
  const int64_t group = H / Hkv, n_segs = segs.size(), head_words = packed_rows * D / 2;
  // Packed K and V per kv head: [Hkv][packed_rows * D / 2] words each.
  uint32_t* kt = scratch(2 * Hkv * head_words);
  uint32_t* vp = kt + Hkv * head_words;
  const auto* qp = q.data_ptr<at::BFloat16>();
  const auto* kp = k.data_ptr<at::BFloat16>();
  const auto* vptr = v.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  for_each_item(n_segs * Hkv, [&](int64_t w) {
    const int64_t s = w / Hkv, h = w % Hkv, base = h * head_words + packed_at[s] * D / 2;
    pack_kv(kp + h * D, vptr + h * D, lay.kv_stride, D, segs[s], kt + base, vp + base);
  });
  struct Item {
    int64_t s, q0;
  };
  std::vector<Item> items;  // causal blocks late in a segment cost more: listed first, so taken first
  for (int64_t s = 0; s < n_segs; ++s)
    for (int64_t q0 = (segs[s].n - 1) / kBlockQ * kBlockQ; q0 >= 0; q0 -= kBlockQ) items.push_back({s, q0});
  const int64_t n_items = items.size();
  for_each_item(n_items * H, [&](int64_t w) {
    const Item& it = items[w / H];
    const int64_t h = w % H, base = (h / group) * head_words + packed_at[it.s] * D / 2;
    const Segment& seg = segs[it.s];
    fn(qp + h * D, lay, seg, it.q0, std::min(kBlockQ, seg.n - it.q0), kt + base, vp + base, op + h * D);
  }, tiles);
}

// Whether segment attention runs on AMX tiles; `enable` (when given) asks for them or for the
// AVX512-BF16 path. Tiles are used only where the CPU has them and the OS grants them.
std::atomic<bool> decode_by_sequence{true};  // use_sequence_decode(false): (sequence, KV head) items (tests)

bool use_sequence_decode(std::optional<bool> enable) {
  if (enable.has_value()) decode_by_sequence.store(*enable);
  return decode_by_sequence.load();
}

bool use_tile_attention(std::optional<bool> enable) {
  if (enable.has_value()) tiles_wanted.store(*enable);
  return tiles_on();
}

void decode_attention_bf16(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           const torch::Tensor& rows, const torch::Tensor& kv_slots, const torch::Tensor& kv_offsets,
                           double scale, const torch::Tensor& out) {
  check_attention(q, k, v, out);
  const int64_t T = q.size(0), H = q.size(1), Hkv = k.size(1), D = q.size(2);
  const DecodeFn fn = for_head_dim(D, [](auto nd) -> DecodeFn { return decode_group<decltype(nd)::value>; });
  TORCH_CHECK(fn != nullptr, "head dim ", D, " is not one of 32, 48, ..., 128");
  check_tables({&rows, &kv_slots, &kv_offsets});
  const int64_t B = rows.numel();
  TORCH_CHECK(kv_offsets.numel() == B + 1, "one kv range per row");
  const int64_t *rp = rows.data_ptr<int64_t>(), *slots = kv_slots.data_ptr<int64_t>(), *ko = kv_offsets.data_ptr<int64_t>();
  check_kv_ranges(kv_slots, ko, B, k.size(0));
  int64_t max_ctx = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(rp[b] >= 0 && rp[b] < T, "row ", rp[b], " lies outside the ", T, " rows");
    TORCH_CHECK(ko[b + 1] > ko[b], "row ", b, " has no keys");
    max_ctx = std::max(max_ctx, ko[b + 1] - ko[b]);
  }
  const int64_t G = H / Hkv;
  const auto* qp = q.data_ptr<at::BFloat16>();
  const auto* kp = k.data_ptr<at::BFloat16>();
  const auto* vp = v.data_ptr<at::BFloat16>();
  auto* op = out.data_ptr<at::BFloat16>();
  // Whole sequences per work item once there are enough of them to keep every thread busy (the same
  // bits either way: decode_seq is decode_group per head, in the same order).
  if (decode_by_sequence.load(std::memory_order_relaxed) && H <= kSeqHeadsMax && B >= 2 * at::get_num_threads()) {
    const SeqDecodeFn seq = for_head_dim(D, [](auto nd) -> SeqDecodeFn { return decode_seq<decltype(nd)::value>; });
    for_each_item(B, [&](int64_t b) {
      thread_local std::vector<float> scores;  // per worker thread: [H][ctx] scores, then [H][D] sums
      if (scores.size() < size_t(H * (max_ctx + D))) scores.resize(H * (max_ctx + D));
      const int64_t offset = rp[b] * H * D;
      seq(qp + offset, Hkv, G, kp, vp, slots + ko[b], ko[b + 1] - ko[b], float(scale), scores.data(), op + offset);
    });
    return;
  }
  for_each_item(B * Hkv, [&](int64_t w) {
    thread_local std::vector<float> scores;  // per worker thread: [G][ctx] scores, then [G][D] sums
    if (scores.size() < size_t(G * (max_ctx + D))) scores.resize(G * (max_ctx + D));
    const int64_t b = w / Hkv, h = w % Hkv, offset = (rp[b] * H + h * G) * D;
    fn(qp + offset, G, kp + h * D, vp + h * D, Hkv * D, slots + ko[b], ko[b + 1] - ko[b], float(scale),
       scores.data(), op + offset);
  });
}

torch::Tensor linear_one_row_bf16(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1) && x.numel() == w.size(1),
              "x must hold one row of ", w.size(1), " features");
  check_cpu_bf16({&x, &w}, "x and the weight");
  const int64_t N = w.size(0), K = w.size(1);
  const at::BFloat16* bp = nullptr;
  if (bias.has_value()) {
    check_cpu_bf16({&*bias}, "the bias");
    TORCH_CHECK(bias->numel() == N, "the bias must have one value per output");
    bp = bias->data_ptr<at::BFloat16>();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  torch::Tensor y = torch::empty(shape, x.options());
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = w.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {  // groups of four rows
    linear_rows(xp, wp, bp, K, 4 * b0, std::min(N, 4 * b1), yp);
  });
  return y;
}

// x (and delta) [..., H], weight [H]: contiguous bf16. Returns (x + delta, norm(x + delta)), or
// (x, norm(x)) without a delta.
std::vector<torch::Tensor> rms_norm_bf16(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                                         const torch::Tensor& weight, double eps) {
  check_cpu_bf16({&x, &weight}, "x and the weight");
  const int64_t H = weight.numel();
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == H, "x must have rows of ", H, " values (the weight's size)");
  const at::BFloat16* dp = nullptr;
  torch::Tensor sum = x;
  if (delta.has_value()) {
    check_cpu_bf16({&*delta}, "delta");
    TORCH_CHECK(delta->sizes() == x.sizes(), "delta must have x's shape");
    dp = delta->data_ptr<at::BFloat16>();
    sum = torch::empty_like(x);
  }
  torch::Tensor y = torch::empty_like(x);
  const auto* xp = x.data_ptr<at::BFloat16>();
  const auto* wp = weight.data_ptr<at::BFloat16>();
  auto *sp = sum.data_ptr<at::BFloat16>(), *yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, x.numel() / H, 64, [&](int64_t r0, int64_t r1) {  // rows; one thread below 64 rows
    for (int64_t r = r0; r < r1; ++r)
      rms_norm_row(xp + r * H, dp ? dp + r * H : nullptr, wp, H, float(eps), sp + r * H, yp + r * H);
  });
  return {sum, y};
}

// ---- elementwise steps of prefill and the vision tower, with torch's roundings ----------------------
// Why: eager, each is 3-8 torch ops over strided views, every one a pass over memory with its own
// rounding; on 2 cores SwiGLU's silu-and-product took ~2.5 ms per 512x2048 layer and the vision
// rotary ~1 ms per layer, against ~0.2 ms for one fused pass.

// x [..., 2I] (gate, then up: the fused gate_up projection's output) -> silu(gate) * up [..., I]:
// silu in float32 as x / (1 + exp(-x)), rounded to bf16 (torch's silu), then the product of two bf16
// values rounded to bf16 (torch's mul). exp_ps is exact to ~1e-7 relative over the whole range
// here (its clamp is on the low side only; above ~88.7 it returns inf, and x / inf = 0 as in torch).
torch::Tensor silu_mul_bf16(const torch::Tensor& x) {
  check_cpu_bf16({&x}, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 2 == 0, "x must have an even number of values per row (gate, up)");
  const int64_t I = x.size(-1) / 2, rows = I ? x.numel() / (2 * I) : 0;
  auto shape = x.sizes().vec();
  shape.back() = I;
  torch::Tensor y = torch::empty(shape, x.options());
  const auto* xp = x.data_ptr<at::BFloat16>();
  auto* yp = y.data_ptr<at::BFloat16>();
  const __m512 one = _mm512_set1_ps(1.f);
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const at::BFloat16* g = xp + r * 2 * I;
      const at::BFloat16* u = g + I;
      at::BFloat16* o = yp + r * I;
      for (int64_t i = 0; i < I; i += 16) {
        const __mmask16 m = lanes(I - i);
        const __m512 gv = load_bf16x16(g + i, m);
        const __m512 act = _mm512_div_ps(gv, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        // round silu to bf16 and back (a float32 with the low 16 bits cleared, rounded to nearest even)
        const __m512 act_bf16 = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(act))), 16));
        store_bf16x16(o + i, _mm512_mul_ps(act_bf16, load_bf16x16(u + i, m)), m);
      }
    }
  });
  return y;
}

// The vision towers' rotary (NeoX halves over the whole head) of q and k as HF computes it: in
// float32, x * cos + rotate_half(x) * sin with each product and the sum rounded to float32 (no
// fused multiply-add: the file is built with -ffp-contract=off), then cast to bf16. qkv [N, 3, heads, D] bf16 (the qkv projection's output);
// cos, sin [N, D] float32. Returns q and k rotated, each [N, heads, D] bf16.
std::vector<torch::Tensor> vision_rotary_bf16(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin) {
  check_cpu_bf16({&qkv}, "qkv");
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(1) == 3 && qkv.size(3) % 2 == 0, "qkv must be [N, 3, heads, D] with D even");
  const int64_t N = qkv.size(0), H = qkv.size(2), D = qkv.size(3), half = D / 2;
  for (const torch::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == N && t->size(1) == D,
                "cos and sin must be contiguous float32 [N, D] CPU tensors matching qkv");
  torch::Tensor q = torch::empty({N, H, D}, qkv.options()), k = torch::empty({N, H, D}, qkv.options());
  const auto* xp = qkv.data_ptr<at::BFloat16>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  auto *qp = q.data_ptr<at::BFloat16>(), *kp = k.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float *c = cp + n * D, *s = sp + n * D;
      for (int part = 0; part < 2; ++part) {
        at::BFloat16* out = (part ? kp : qp) + n * H * D;
        for (int64_t h = 0; h < H; ++h) {
          const at::BFloat16* x = xp + ((n * 3 + part) * H + h) * D;
          at::BFloat16* o = out + h * D;
          for (int64_t i = 0; i < half; i += 16) {
            const __mmask16 m = lanes(half - i);
            const __m512 x1 = load_bf16x16(x + i, m), x2 = load_bf16x16(x + half + i, m);
            const __m512 c1 = _mm512_maskz_loadu_ps(m, c + i), c2 = _mm512_maskz_loadu_ps(m, c + half + i);
            const __m512 s1 = _mm512_maskz_loadu_ps(m, s + i), s2 = _mm512_maskz_loadu_ps(m, s + half + i);
            // first half: x1 * cos - x2 * sin (rotate_half gives -x2); second: x2 * cos + x1 * sin
            const __m512 lo = _mm512_add_ps(_mm512_mul_ps(x1, c1), _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), s1));
            const __m512 hi = _mm512_add_ps(_mm512_mul_ps(x2, c2), _mm512_mul_ps(x1, s2));
            store_bf16x16(o + i, lo, m);
            store_bf16x16(o + half + i, hi, m);
          }
        }
      }
    }
  });
  return {q, k};
}

// The text towers' rotary as HF computes it in bf16, in place: for the first `heads` heads of qkv
// [T, all heads, D] (q and k side by side), the first rd = cos.size(1) dims become
// x * cos + rotated(x) * sin, with each product and the sum rounded to bf16 (three torch ops), and
// the rest of each head passes. Pairs: NeoX halves of the rd dims (neox) or GPT-J neighbours
// (x[2i], x[2i+1]). cos, sin [T, rd] bf16.
void text_rotary_bf16_(const torch::Tensor& qkv, int64_t heads, const torch::Tensor& cos, const torch::Tensor& sin, bool neox) {
  check_cpu_bf16({&qkv, &cos, &sin}, "qkv, cos and sin");
  TORCH_CHECK(qkv.dim() == 3 && heads >= 0 && heads <= qkv.size(1), "qkv must be [T, heads, D] with at least `heads` heads");
  const int64_t T = qkv.size(0), H = qkv.size(1), D = qkv.size(2), rd = cos.dim() == 2 ? cos.size(1) : -1;
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && sin.sizes() == cos.sizes() && rd % 2 == 0 && rd <= D,
              "cos and sin must be [T, rd] with rd even and at most the head dim");
  auto* xp = qkv.data_ptr<at::BFloat16>();
  const auto *cp = cos.data_ptr<at::BFloat16>(), *sp = sin.data_ptr<at::BFloat16>();
  const int64_t half = rd / 2;
  const __m512 zero = _mm512_setzero_ps();
  const __mmask16 even = 0x5555;  // lanes 0, 2, ...: the first of each GPT-J pair
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const at::BFloat16 *c = cp + t * rd, *s = sp + t * rd;
      for (int64_t h = 0; h < heads; ++h) {
        at::BFloat16* row = xp + (t * H + h) * D;
        if (neox) {  // rotated = (-x2, x1) over the halves
          for (int64_t i = 0; i < half; i += 16) {
            const __mmask16 m = lanes(half - i);
            const __m512 x1 = load_bf16x16(row + i, m), x2 = load_bf16x16(row + half + i, m);
            const __m512 lo = _mm512_add_ps(round_bf16x16(_mm512_mul_ps(x1, load_bf16x16(c + i, m))),
                                            round_bf16x16(_mm512_mul_ps(_mm512_sub_ps(zero, x2), load_bf16x16(s + i, m))));
            const __m512 hi = _mm512_add_ps(round_bf16x16(_mm512_mul_ps(x2, load_bf16x16(c + half + i, m))),
                                            round_bf16x16(_mm512_mul_ps(x1, load_bf16x16(s + half + i, m))));
            store_bf16x16(row + i, lo, m);
            store_bf16x16(row + half + i, hi, m);
          }
        } else {  // rotated pair (a, b) = (-b, a); chunks start at even dims, so pairs never straddle them
          for (int64_t i = 0; i < rd; i += 16) {
            const __mmask16 m = lanes(rd - i);
            const __m512 x = load_bf16x16(row + i, m);
            const __m512 swapped = _mm512_permute_ps(x, 0xB1);  // (b, a) in each pair
            const __m512 other = _mm512_mask_sub_ps(swapped, even, zero, swapped);
            const __m512 y = _mm512_add_ps(round_bf16x16(_mm512_mul_ps(x, load_bf16x16(c + i, m))),
                                           round_bf16x16(_mm512_mul_ps(other, load_bf16x16(s + i, m))));
            store_bf16x16(row + i, y, m);
          }
        }
      }
    }
  });
}

// Pins torch's intra-op threads: OpenMP thread i of the calling thread's team (the caller is thread 0)
// to the CPUs cpus[i]. OpenMP's own binding (OMP_PROC_BIND, OMP_PLACES) is read once, when the runtime
// loads, before glimpse knows which cores a process should have; here each thread binds itself with
// sched_setaffinity, and as the OpenMP pool keeps its threads, the binding lasts. A failure raises.
void bind_threads(const std::vector<std::vector<int64_t>>& cpus) {
  const int64_t n = at::get_num_threads();
  TORCH_CHECK(int64_t(cpus.size()) >= n, n, " threads need as many CPU sets, got ", cpus.size());
  std::atomic<int> failed{0}, ran{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int64_t t = at::get_thread_num();
    if (t < 0 || t >= n) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    for (const int64_t c : cpus[t]) {
      if (c < 0 || c >= CPU_SETSIZE) { failed.store(EINVAL); return; }
      CPU_SET(int(c), &set);
    }
    if (sched_setaffinity(0, sizeof(set), &set) != 0) failed.store(errno);
    ran.fetch_add(1);
  });
  TORCH_CHECK(failed.load() == 0, "sched_setaffinity failed: ", std::strerror(failed.load()));
  TORCH_CHECK(ran.load() == n, "only ", ran.load(), " of ", n, " threads ran the binding");
}

// The decode step's kernels as torch operators (namespace glimpse_cpu), for a compiled decode step
// (glimpse/engine/decode_graph.py): torch.compile keeps a registered operator as one node of its graph
// and calls it through the dispatcher from the graph's code, where eager code calls the functions
// above through this module. The same functions, so the same bits. Their shapes for tracing
// (register_fake) are in glimpse/kernels.py. RMSNorm is two operators: without a
// residual the pybind function returns x itself as the sum, which an operator may not alias.
torch::Tensor rms_norm_op(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  return rms_norm_bf16(x, c10::nullopt, weight, eps)[1];
}

std::tuple<torch::Tensor, torch::Tensor> add_rms_norm_op(const torch::Tensor& x, const torch::Tensor& delta,
                                                         const torch::Tensor& weight, double eps) {
  auto outs = rms_norm_bf16(x, delta, weight, eps);
  return {outs[0], outs[1]};
}

// oneDNN's linear on a weight packed once at load (glimpse/backends/onednn_packed.py), as an operator of
// ours that takes the packed weight by handle. Inductor lowers mkldnn::_linear_pointwise only for weights
// that are graph constants (freezing), and a graph with a packed (mkldnn) tensor among its inputs is never
// stored in inductor's FX graph cache ("mkldnn tensors unpickleable": ~13 s of compilation at every start);
// an int handle is a plain constant of the graph. The same oneDNN call eager code makes.
std::mutex packed_mutex;
std::vector<torch::Tensor> packed_weights;  // by handle; an undefined tensor once released

int64_t keep_packed(const torch::Tensor& packed) {
  std::lock_guard<std::mutex> lock(packed_mutex);
  packed_weights.push_back(packed);
  return int64_t(packed_weights.size()) - 1;
}

void release_packed(int64_t handle) {  // the decode graph that kept it is gone (weakref.finalize)
  std::lock_guard<std::mutex> lock(packed_mutex);
  if (handle >= 0 && handle < int64_t(packed_weights.size())) packed_weights[handle] = torch::Tensor();
}

torch::Tensor packed_linear_op(const torch::Tensor& x, int64_t handle, int64_t out_features,
                               const c10::optional<torch::Tensor>& bias) {
  torch::Tensor packed;
  {
    std::lock_guard<std::mutex> lock(packed_mutex);
    TORCH_CHECK(handle >= 0 && handle < int64_t(packed_weights.size()) && packed_weights[handle].defined(),
                "no packed weight has handle ", handle);
    packed = packed_weights[handle];
  }
  TORCH_CHECK(packed.size(0) == out_features, "packed weight ", handle, " has ", packed.size(0), " outputs, not ",
              out_features);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, bias, std::string("none"), c10::List<c10::optional<c10::Scalar>>(),
                          c10::optional<std::string>(std::string(""))};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// One layer's new K and V rows into their slots of the paged cache ([layers, blocks, block size, kv
// heads, D]), in place. In a compiled graph torch's index_copy_ on a graph input becomes a copy of the
// whole cache and a copy back; a mutating operator on the whole cache (not a view of one layer, whose
// offset inductor 2.14 lost in a reinplaced mutation) stays in place.
void write_kv_op(const torch::Tensor& k_cache, const torch::Tensor& v_cache, int64_t layer, const torch::Tensor& slots,
                 const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes() && layer >= 0 && layer < k_cache.size(0),
              "k_cache, v_cache: [layers, blocks, block size, kv heads, D]; layer ", layer);
  k_cache.select(0, layer).flatten(0, 1).index_copy_(0, slots, k);
  v_cache.select(0, layer).flatten(0, 1).index_copy_(0, slots, v);
}

TORCH_LIBRARY(glimpse_cpu, m) {
  m.def("write_kv_(Tensor(a!) k_cache, Tensor(b!) v_cache, int layer, Tensor slots, Tensor k, Tensor v) -> ()");
  m.def("packed_linear(Tensor x, int handle, int out_features, Tensor? bias) -> Tensor");
  m.def("decode_attention_bf16(Tensor q, Tensor k, Tensor v, Tensor rows, Tensor kv_slots, Tensor kv_offsets, "
        "float scale, Tensor(a!) out) -> ()");
  m.def("linear_one_row_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("rms_norm_bf16(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_bf16(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_mul_bf16(Tensor x) -> Tensor");
  m.def("text_rotary_bf16_(Tensor(a!) qkv, int heads, Tensor cos, Tensor sin, bool neox) -> ()");
}

TORCH_LIBRARY_IMPL(glimpse_cpu, CPU, m) {
  m.impl("decode_attention_bf16", &decode_attention_bf16);
  m.impl("write_kv_", &write_kv_op);
  m.impl("packed_linear", &packed_linear_op);
  m.impl("linear_one_row_bf16", &linear_one_row_bf16);
  m.impl("rms_norm_bf16", &rms_norm_op);
  m.impl("add_rms_norm_bf16", &add_rms_norm_op);
  m.impl("silu_mul_bf16", &silu_mul_bf16);
  m.impl("text_rotary_bf16_", &text_rotary_bf16_);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;  // no Python object is touched past argument conversion
  m.def("segment_attention_bf16", &segment_attention_bf16, "bf16 attention inside each segment of a flat batch",
        release());
  m.def("use_tile_attention", &use_tile_attention,
        "whether segment attention runs on AMX tiles (where the CPU has them); enable=False: AVX512-BF16",
        py::arg("enable") = py::none());
  m.def("decode_attention_bf16", &decode_attention_bf16, "bf16 attention of one query row per sequence", release());
  m.def("use_sequence_decode", &use_sequence_decode,
        "whether decode attention takes whole sequences as work items (with enough of them); enable=False: "
        "(sequence, KV head) items", py::arg("enable") = py::none());
  m.def("use_wide_attention_rows", &use_wide_attention_rows,
        "whether segment attention's AVX512-BF16 path takes query rows four at a time (True) or two; the same bits",
        py::arg("enable") = py::none());
  m.def("linear_one_row_bf16", &linear_one_row_bf16, "bf16 linear layer of one input row", py::arg("x"), py::arg("w"),
        py::arg("bias") = py::none(), release());
  m.def("rms_norm_bf16", &rms_norm_bf16, "bf16 RMSNorm of each row, after an optional residual add", py::arg("x"),
        py::arg("delta"), py::arg("weight"), py::arg("eps"), release());
  m.def("silu_mul_bf16", &silu_mul_bf16, "silu(gate) * up of bf16 rows laid out (gate, up)", release());
  m.def("text_rotary_bf16_", &text_rotary_bf16_, "bf16 rotary of the first heads of a [T, heads, D] qkv, in place",
        release());
  m.def("vision_rotary_bf16", &vision_rotary_bf16, "float32 NeoX rotary of q and k from a [N, 3, heads, D] qkv",
        release());
  m.def("keep_packed", &keep_packed, "keep a packed weight for the packed_linear operator; returns its handle");
  m.def("release_packed", &release_packed, "let go of the packed weight of a handle");
  m.def("bind_threads", &bind_threads, "pin torch's intra-op thread i to the CPUs cpus[i]", release());
}
