// Attention over the paged KV cache.
//
// decode_attention: flash-decoding. The keys of row b are cut into splits(len_b) chunks; one block
// per (split, kv head, row) runs an online softmax over its chunk for ALL query heads of the kv
// head's group, so each K/V load is shared by the group (GQA is never expanded). A second kernel
// merges the per-split partials of the rows with more than one split (log-sum-exp combine).
//
// Batch invariance: a row's split count is decode_row_splits(len_b, nkv), a function of that row's
// own length (positions[b] + 1, read on the device) and of the model's nkv, never of B, of max_len
// or of the other rows; its chunk boundaries, the per-block reduction order and the combine's order
// (over the row's own splits, blockDim = D) follow from it. So a row's output is bitwise the same
// alone or in any batch. The host int max_len only sizes the grid: gridDim.x =
// decode_row_splits(max_len, nkv) >= every row's count (the function is monotone in len), and the
// blocks past a row's count exit at once. A CUDA graph captured for max_len = L is therefore valid
// for every actual length 1..L. A row with position < 0 (padding) has length 0 and one split,
// whose block writes zeros.
//
// prefill_attention: causal, tiled: one block per (64-query tile, q head); K/V tiles of 64 keys go
// through shared memory (fp32), online softmax in fp32, CUDA cores only.
//
// Softmax runs in base 2: q is pre-scaled by scale * log2(e) and exp2f is used, which is the same
// softmax up to fp32 rounding.
//
// PDL (common.cuh): every input here (q, the KV cache that rope_kv_write has just written, block
// tables, positions, the split partials) is written by earlier kernels of the step, so each kernel
// waits first and reads all of them with coherent loads (no __restrict__ const, no __ldg).
#include <cmath>

#include "common.cuh"

namespace ck {
namespace {

// ----------------------------------------------------------------------------- decode: sizing

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
// ~2 resident blocks per SM on the 132-SM H100 / H200 SXM. A constant, not a device query, so
// workspace sizes do not depend on which GPU asks.
constexpr int kTargetBlocks = 264;
constexpr int kMinChunk = 32;   // tokens: below this a split costs more than it saves
constexpr int kMaxSplits = 256;  // also the combine kernel's shared array size

int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split count of one row of length len (<= 0: padding, or empty): ceil(len / kMinChunk) splits,
// capped at kTargetBlocks / nkv (rounded up: ~2 blocks per SM for ONE row, which is where splitting
// pays) and at kMaxSplits. The same function on the host (grid size, workspace) and on the device
// (each row's own count), so the two can never disagree. Monotone non-decreasing in len.
__host__ __device__ __forceinline__ int decode_row_splits(int len, int nkv) {
  if (len <= kMinChunk || nkv <= 0) return 1;
  int s = (len + kMinChunk - 1) / kMinChunk;
  const int by_occupancy = (kTargetBlocks + nkv - 1) / nkv;
  if (s > by_occupancy) s = by_occupancy;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 1 ? 1 : s;
}

int log2_exact(int v) {  // log2 of a power of two, -1 otherwise
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((1 << s) < v) ++s;
  return s;
}

// ----------------------------------------------------------------------------- decode: kernels

// grid (grid_splits, nkv, B), block kDecodeThreads. Row b uses the first decode_row_splits(len_b)
// blocks along x; the others exit. Lane layout: a token's D elements are spread over
// TG = D / 8 lanes (16 bytes each, coalesced), so a warp covers TPS = 32 / TG tokens per step; U
// steps are issued together to keep 2U 16-byte loads in flight per lane. Each warp keeps its own
// online-softmax state over the tokens it visits; the warps are merged at the end of the block.
template <typename T, int D, int G>
__global__ void __launch_bounds__(kDecodeThreads)
decode_split_kernel(const T* q,                 // [B, nq, D]
                    const T* k_cache,           // [NB, BS, nkv, D]
                    const T* v_cache,           // [NB, BS, nkv, D]
                    const int32_t* block_tables,  // [B, MB]
                    const int32_t* positions,     // [B]
                    float qscale,  // scale * log2(e)
                    int nq, int nkv, int MB, int bs_shift, int grid_splits,
                    T* out,         // [B, nq, D]                 (rows of one split)
                    float* ws_acc,  // [B, nq, grid_splits, D]    (rows of several splits)
                    float* ws_m,    // [B, nq, grid_splits]
                    float* ws_l) {  // [B, nq, grid_splits]
  constexpr int TG = D / 8;
  constexpr int TPS = 32 / TG;
  constexpr int U = G <= 4 ? 4 : 2;  // fewer steps in flight for big groups: register budget
  constexpr int NT = TPS * U;        // tokens per warp iteration
  static_assert(D % 8 == 0 && TG >= 1 && TG <= 32 && 32 % TG == 0, "unsupported head_dim");

  __shared__ float s_m[kDecodeWarps][G];
  __shared__ float s_l[kDecodeWarps][G];
  __shared__ float s_acc[kDecodeWarps][G][D];

  pdl_begin();
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int sub = lane / TG;   // which token of a step
  const int part = lane % TG;  // which 8 elements of that token
  const int bs_mask = (1 << bs_shift) - 1;

  // q is loaded before the position-dependent exit below, so that its loads and the position's
  // are in flight together (one memory round trip, not two).
  const int pos = positions[b];
  float qf[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    load8c<T>(q + (static_cast<int64_t>(b) * nq + kvh * G + g) * D + part * 8, qf[g]);
  }

  // Clamped to what the block table can address: a bad position must not read out of bounds.
  // Padding rows (position < 0) get length 0: no key is read and the output is zeros.
  const int len = max(0, min(pos + 1, MB << bs_shift));
  // The row's own split count (see the file comment), clamped to the grid: a length past max_len
  // is a caller bug, which must still not index past the workspace.
  const int splits = min(decode_row_splits(len, nkv), grid_splits);
  if (split >= splits) return;  // block-uniform: before any barrier
  const int dchunk = (len + splits - 1) / splits;
  const int start = split * dchunk;
  const int end = (split == splits - 1) ? len : min(len, start + dchunk);
  const int32_t* bt = block_tables + static_cast<int64_t>(b) * MB;

#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int j = 0; j < 8; ++j) qf[g][j] *= qscale;
  }

  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[g][j] = 0.f;
  }

  // `base` is warp-uniform, so every shuffle below runs with the full warp.
  for (int base = start + warp * NT; base < end; base += kDecodeWarps * NT) {
    uint4 kr[U], vr[U];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = base + u * TPS + sub;
      valid[u] = t < end;
      kr[u] = make_uint4(0, 0, 0, 0);
      vr[u] = make_uint4(0, 0, 0, 0);
      if (valid[u]) {
        const int64_t blk = bt[t >> bs_shift];
        const int64_t off =
            (((blk << bs_shift) + (t & bs_mask)) * nkv + kvh) * static_cast<int64_t>(D) + part * 8;
        kr[u] = ld16(k_cache + off);
        vr[u] = ld16(v_cache + off);
      }
    }

    float s[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      unpack8<T>(kr[u], kf);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) d = fmaf(qf[g][j], kf[j], d);
        s[u][g] = d;
      }
    }
    // Sum the partial dots over the TG lanes of each token.
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int o = TG / 2; o > 0; o >>= 1) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o);
        if (!valid[u]) s[u][g] = -INFINITY;
      }
    }

    float vf[U][8];
#pragma unroll
    for (int u = 0; u < U; ++u) unpack8<T>(vr[u], vf[u]);

#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mt = s[0][g];
#pragma unroll
      for (int u = 1; u < U; ++u) mt = fmaxf(mt, s[u][g]);
#pragma unroll
      for (int o = 16; o >= TG; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
      // Token `base` is always valid, so mt (and the new max) is finite: no -inf - -inf NaN.
      const float mn = fmaxf(m[g], mt);
      const float alpha = exp2f(m[g] - mn);  // 0 on the first visit (m = -inf)
      m[g] = mn;
      l[g] *= alpha;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[g][j] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float p = exp2f(s[u][g] - mn);  // 0 for invalid tokens
        l[g] += p;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[g][j] = fmaf(p, vf[u][j], acc[g][j]);
      }
    }
  }

  // Merge the TPS token lanes of the warp (the max m is already warp-uniform).
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int o = 16; o >= TG; o >>= 1) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[g][j] += __shfl_xor_sync(0xffffffffu, acc[g][j], o);
    }
  }
  if (sub == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int j = 0; j < 8; ++j) s_acc[warp][g][part * 8 + j] = acc[g][j];
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      s_m[warp][g] = m[g];
      s_l[warp][g] = l[g];
    }
  }
  __syncthreads();

  // Merge the warps; write the final output (one split) or this split's partial.
  for (int idx = threadIdx.x; idx < G * D; idx += kDecodeThreads) {
    const int g = idx / D, d = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) M = fmaxf(M, s_m[w][g]);
    float L = 0.f, O = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float mw = s_m[w][g];
      if (mw != -INFINITY) {  // a warp that saw no token contributes nothing
        const float sc = exp2f(mw - M);
        L = fmaf(s_l[w][g], sc, L);
        O = fmaf(s_acc[w][g][d], sc, O);
      }
    }
    const int64_t head = static_cast<int64_t>(b) * nq + kvh * G + g;
    if (splits == 1) {
      out[head * D + d] = Elem<T>::from_float(L > 0.f ? O / L : 0.f);
    } else {
      const int64_t r = head * grid_splits + split;
      ws_acc[r * D + d] = O;  // unnormalized, relative to M
      if (d == 0) {
        ws_m[r] = M;
        ws_l[r] = L;
      }
    }
  }
}

// grid (nq, B), block D threads: out = sum_s w_s acc_s / sum_s w_s l_s, w_s = 2^(m_s - max m),
// over row b's own splits (recomputed from positions exactly as the split kernel did). Rows of one
// split were written by the split kernel itself and are skipped here.
template <typename T>
__global__ void decode_combine_kernel(const float* ws_acc,  // [B, nq, grid_splits, D]
                                      const float* ws_m,    // [B, nq, grid_splits]
                                      const float* ws_l,    // [B, nq, grid_splits]
                                      const int32_t* positions,  // [B]
                                      int grid_splits, int nq, int nkv, int D, int MB,
                                      int bs_shift,
                                      T* out) {  // [B, nq, D]
  // Split partials per thread: blockDim = D >= 64, so kMaxSplits / 64 slots cover every split.
  constexpr int kPer = kMaxSplits / 64;
  __shared__ float s_w[kMaxSplits];
  __shared__ float red[32];
  pdl_begin();
  const int b = blockIdx.y;
  const int64_t r0 = (static_cast<int64_t>(b) * nq + blockIdx.x) * grid_splits;
  // The partials of every grid split are loaded together with the position (one memory round
  // trip, not two); those past the row's own count are stale and never used.
  const int pos = positions[b];
  float ms_r[kPer], ls_r[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int s = threadIdx.x + i * blockDim.x;
    ms_r[i] = s < grid_splits ? ws_m[r0 + s] : -INFINITY;
    ls_r[i] = s < grid_splits ? ws_l[r0 + s] : 0.f;
  }
  const int len = max(0, min(pos + 1, MB << bs_shift));
  const int splits = min(decode_row_splits(len, nkv), grid_splits);
  if (splits <= 1) return;  // block-uniform: before any barrier

  float M = -INFINITY;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    if (threadIdx.x + i * blockDim.x < splits) M = fmaxf(M, ms_r[i]);
  }
  M = block_max(M, red);

  float L = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int s = threadIdx.x + i * blockDim.x;
    if (s < splits) {
      // Empty splits (m = -inf) weigh 0 and their acc is never read.
      const float w = (ms_r[i] == -INFINITY) ? 0.f : exp2f(ms_r[i] - M);
      s_w[s] = w;
      L += w * ls_r[i];
    }
  }
  L = block_sum(L, red);  // its barriers also publish s_w
  const float inv = L > 0.f ? 1.f / L : 0.f;

  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float w = s_w[s];
      if (w != 0.f) o = fmaf(w, ws_acc[(r0 + s) * D + d], o);
    }
    out[(static_cast<int64_t>(blockIdx.y) * nq + blockIdx.x) * D + d] = Elem<T>::from_float(o * inv);
  }
}

template <typename T, int D>
cudaError_t launch_decode_d(const void* q, const void* kc, const void* vc, const int32_t* bt,
                            const int32_t* positions, float qscale, void* out, float* ws, int B,
                            int nq, int nkv, int MB, int bs_shift, int grid_splits,
                            cudaStream_t stream) {
  const int G = nq / nkv;
  const dim3 grid(grid_splits, nkv, B);
  const int64_t rows = static_cast<int64_t>(B) * nq * grid_splits;
  float* ws_acc = ws;
  float* ws_m = ws ? ws + rows * D : nullptr;
  float* ws_l = ws ? ws_m + rows : nullptr;
#define CK_DECODE_CASE(GG)                                                                       \
  case GG:                                                                                       \
    CK_LAUNCH(decode_split_kernel<T, D, GG>, grid, dim3(kDecodeThreads), 0, stream,             \
              static_cast<const T*>(q), static_cast<const T*>(kc), static_cast<const T*>(vc), bt, \
              positions, qscale, nq, nkv, MB, bs_shift, grid_splits, static_cast<T*>(out),      \
              ws_acc, ws_m, ws_l);                                                               \
    break;
  switch (G) {
    CK_DECODE_CASE(1)
    CK_DECODE_CASE(2)
    CK_DECODE_CASE(3)
    CK_DECODE_CASE(4)
    CK_DECODE_CASE(5)
    CK_DECODE_CASE(6)
    CK_DECODE_CASE(7)
    CK_DECODE_CASE(8)
    default:
      return cudaErrorInvalidValue;
  }
#undef CK_DECODE_CASE
  if (grid_splits > 1) {
    // Needed whenever some row may have several splits; rows of one split skip it on the device.
    CK_LAUNCH(decode_combine_kernel<T>, dim3(nq, B), dim3(D), 0, stream,
              static_cast<const float*>(ws_acc), static_cast<const float*>(ws_m),
              static_cast<const float*>(ws_l), positions, grid_splits, nq, nkv, D, MB, bs_shift,
              static_cast<T*>(out));
  }
  CK_RETURN_LAUNCH_STATUS();
}

// ----------------------------------------------------------------------------- prefill

constexpr int kPrefillBQ = 64;  // queries per block
constexpr int kPrefillBK = 64;  // keys per tile
constexpr int kPrefillThreads = 256;

template <int D>
constexpr size_t prefill_smem_bytes() {
  // sQ [BQ][D+4], sK [BK][D+4], sV [BK][D+4], sP [BQ][BK+4], fp32. The +4 padding shifts rows by
  // 4 banks: 16-byte accesses of 8 consecutive rows hit distinct banks; rows stay 16-byte aligned.
  return sizeof(float) * (static_cast<size_t>(kPrefillBQ) * (D + 4) +
                          2 * static_cast<size_t>(kPrefillBK) * (D + 4) +
                          static_cast<size_t>(kPrefillBQ) * (kPrefillBK + 4));
}

// grid (ceil(T / BQ), nq), block 256 = 16 x 16 threads. Thread (ty, tx) owns query rows ty + 16 i
// (i < 4): scores for key columns tx + 16 j (j < 4), output columns tx*4 + 64 c (c < D / 64).
// The 16 threads of a row are one half-warp, so row max / sum are xor shuffles within it.
template <typename T, int D>
__global__ void __launch_bounds__(kPrefillThreads)
prefill_attention_kernel(const T* q,              // [T, nq, D]
                         const T* k_cache,        // [NB, BS, nkv, D]
                         const T* v_cache,        // [NB, BS, nkv, D]
                         const int32_t* block_table,  // [MB]
                         int start_pos, float qscale, int T_, int nq, int nkv, int bs_shift,
                         T* out) {                // [T, nq, D]
  constexpr int LD = D + 4;
  constexpr int LDP = kPrefillBK + 4;
  constexpr int VPR = D / 8;    // 16-byte vectors per row
  constexpr int OC = D / 64;    // float4 output column groups per thread
  extern __shared__ float4 smem4[];
  float* sQ = reinterpret_cast<float*>(smem4);
  float* sK = sQ + kPrefillBQ * LD;
  float* sV = sK + kPrefillBK * LD;
  float* sP = sV + kPrefillBK * LD;
  pdl_begin();

  const int qt = gridDim.x - 1 - blockIdx.x;  // longest (last) query tiles first
  const int h = blockIdx.y;
  const int kvh = h / (nq / nkv);
  const int q0 = qt * kPrefillBQ;
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int bs_mask = (1 << bs_shift) - 1;

  // Q tile, pre-scaled, fp32. Rows past T are zero (their outputs are never written).
  for (int v = tid; v < kPrefillBQ * VPR; v += kPrefillThreads) {
    const int r = v / VPR, c = (v % VPR) * 8;
    float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (q0 + r < T_) {
      load8c<T>(q + (static_cast<int64_t>(q0 + r) * nq + h) * D + c, f);
#pragma unroll
      for (int j = 0; j < 8; ++j) f[j] *= qscale;
    }
    float4* dst = reinterpret_cast<float4*>(sQ + r * LD + c);
    dst[0] = make_float4(f[0], f[1], f[2], f[3]);
    dst[1] = make_float4(f[4], f[5], f[6], f[7]);
  }

  float m[4], l[4], o[4][OC * 4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < OC * 4; ++c) o[i][c] = 0.f;
  }

  // Keys this tile can see: up to the position of its last (valid) query.
  const int kv_end = start_pos + min(q0 + kPrefillBQ, T_);
  const int q_first_pos = start_pos + q0;

  for (int k0 = 0; k0 < kv_end; k0 += kPrefillBK) {
    __syncthreads();  // previous tile's sK / sV / sP fully consumed
    for (int v = tid; v < kPrefillBK * VPR; v += kPrefillThreads) {
      const int r = v / VPR, c = (v % VPR) * 8;
      const int j = k0 + r;
      float kf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      float vf[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (j < kv_end) {
        const int64_t blk = block_table[j >> bs_shift];
        const int64_t off =
            (((blk << bs_shift) + (j & bs_mask)) * nkv + kvh) * static_cast<int64_t>(D) + c;
        load8c<T>(k_cache + off, kf);
        load8c<T>(v_cache + off, vf);
      }
      float4* dk = reinterpret_cast<float4*>(sK + r * LD + c);
      float4* dv = reinterpret_cast<float4*>(sV + r * LD + c);
      dk[0] = make_float4(kf[0], kf[1], kf[2], kf[3]);
      dk[1] = make_float4(kf[4], kf[5], kf[6], kf[7]);
      dv[0] = make_float4(vf[0], vf[1], vf[2], vf[3]);
      dv[1] = make_float4(vf[4], vf[5], vf[6], vf[7]);
    }
    __syncthreads();

    // S = Q K^T for this thread's 4 x 4 scores.
    float s[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = 0.f;
#pragma unroll 4
    for (int d = 0; d < D; d += 4) {
      float4 qv[4], kv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) qv[i] = *reinterpret_cast<const float4*>(sQ + (ty + 16 * i) * LD + d);
#pragma unroll
      for (int j = 0; j < 4; ++j) kv[j] = *reinterpret_cast<const float4*>(sK + (tx + 16 * j) * LD + d);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          s[i][j] = fmaf(qv[i].x, kv[j].x, s[i][j]);
          s[i][j] = fmaf(qv[i].y, kv[j].y, s[i][j]);
          s[i][j] = fmaf(qv[i].z, kv[j].z, s[i][j]);
          s[i][j] = fmaf(qv[i].w, kv[j].w, s[i][j]);
        }
    }

    // Causal mask (only tiles that reach past the first query's position need it; keys past
    // kv_end are also past every valid query), online softmax, P to shared memory.
    const bool need_mask = k0 + kPrefillBK - 1 > q_first_pos;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = ty + 16 * i;
      const int qpos = q_first_pos + row;
      if (need_mask) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (k0 + tx + 16 * j > qpos) s[i][j] = -INFINITY;
      }
      float mt = fmaxf(fmaxf(s[i][0], s[i][1]), fmaxf(s[i][2], s[i][3]));
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
      // Key 0 is visible to every query and lies in the first tile, so mn is finite from then on.
      const float mn = fmaxf(m[i], mt);
      const float alpha = exp2f(m[i] - mn);
      m[i] = mn;
      l[i] *= alpha;
#pragma unroll
      for (int c = 0; c < OC * 4; ++c) o[i][c] *= alpha;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float p = exp2f(s[i][j] - mn);
        l[i] += p;  // per-thread partial; summed over the row's 16 threads at the end
        sP[row * LDP + tx + 16 * j] = p;
      }
    }
    __syncthreads();

    // O += P V.
#pragma unroll 2
    for (int kk = 0; kk < kPrefillBK; kk += 4) {
      float4 pv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) pv[i] = *reinterpret_cast<const float4*>(sP + (ty + 16 * i) * LDP + kk);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float4 vv[OC];
#pragma unroll
        for (int c = 0; c < OC; ++c)
          vv[c] = *reinterpret_cast<const float4*>(sV + (kk + e) * LD + tx * 4 + 64 * c);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float p = e == 0 ? pv[i].x : e == 1 ? pv[i].y : e == 2 ? pv[i].z : pv[i].w;
#pragma unroll
          for (int c = 0; c < OC; ++c) {
            o[i][4 * c + 0] = fmaf(p, vv[c].x, o[i][4 * c + 0]);
            o[i][4 * c + 1] = fmaf(p, vv[c].y, o[i][4 * c + 1]);
            o[i][4 * c + 2] = fmaf(p, vv[c].z, o[i][4 * c + 2]);
            o[i][4 * c + 3] = fmaf(p, vv[c].w, o[i][4 * c + 3]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float li = l[i];
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) li += __shfl_xor_sync(0xffffffffu, li, off);
    const int row = q0 + ty + 16 * i;
    if (row < T_) {
      const float inv = 1.f / li;
      T* dst = out + (static_cast<int64_t>(row) * nq + h) * D;
#pragma unroll
      for (int c = 0; c < OC; ++c) {
        uint2 pk;
        pk.x = Elem<T>::pack2(o[i][4 * c + 0] * inv, o[i][4 * c + 1] * inv);
        pk.y = Elem<T>::pack2(o[i][4 * c + 2] * inv, o[i][4 * c + 3] * inv);
        *reinterpret_cast<uint2*>(dst + tx * 4 + 64 * c) = pk;
      }
    }
  }
}

template <typename T, int D>
cudaError_t launch_prefill_d(const void* q, const void* kc, const void* vc, const int32_t* bt,
                             int start_pos, float qscale, void* out, int T_, int nq, int nkv,
                             int bs_shift, cudaStream_t stream) {
  constexpr size_t smem = prefill_smem_bytes<D>();
  auto kernel = prefill_attention_kernel<T, D>;
  // Above the 48 KB default: opt in (a per-function attribute, not a stream operation, so it is
  // also legal while a stream is being captured).
  CK_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(smem)));
  const dim3 grid(ceil_div(T_, kPrefillBQ), nq);
  CK_LAUNCH(kernel, grid, dim3(kPrefillThreads), smem, stream, static_cast<const T*>(q),
            static_cast<const T*>(kc), static_cast<const T*>(vc), bt, start_pos, qscale, T_, nq,
            nkv, bs_shift, static_cast<T*>(out));
  CK_RETURN_LAUNCH_STATUS();
}

}  // namespace

// ----------------------------------------------------------------------------- public

int decode_attention_num_splits(int B, int nkv, int max_len) {
  // B is deliberately unused (batch invariance: see the file comment); kept for API stability.
  (void)B;
  if (nkv <= 0 || max_len <= 0) return 1;
  return decode_row_splits(max_len, nkv);
}

int64_t decode_attention_workspace_needed(int B, int nq, int nkv, int D, int max_len) {
  const int s = decode_attention_num_splits(B, nkv, max_len);
  return s > 1 ? static_cast<int64_t>(B) * nq * s * (D + 2) : 0;
}

int64_t decode_attention_workspace_numel(int B, int nq, int D, int max_len) {
  if (B <= 0 || nq <= 0 || D <= 0 || max_len <= 0) return 0;
  // The kernel serves group sizes nq / nkv <= 8, so nkv >= ceil(nq / 8), and
  // decode_row_splits(L, nkv) <= min(ceil(L / kMinChunk), ceil(kTargetBlocks / nkv), kMaxSplits).
  // The bound grows with B and L: the size for the largest (B, max_len) serves all smaller
  // launches.
  const int64_t nkv_min = ceil_div64(nq, 8);
  int64_t per_row = ceil_div64(max_len, kMinChunk);
  if (per_row > kMaxSplits) per_row = kMaxSplits;
  const int64_t occ = ceil_div64(kTargetBlocks, nkv_min);
  if (per_row > occ) per_row = occ;
  if (per_row <= 1) return 0;
  return static_cast<int64_t>(B) * nq * per_row * (D + 2);
}

cudaError_t launch_decode_attention(const void* q, const void* k_cache, const void* v_cache,
                                    const int32_t* block_tables, const int32_t* positions,
                                    float scale, void* out, float* workspace,
                                    int64_t workspace_numel, int B, int nq, int nkv, int D, int BS,
                                    int MB, int max_len, DType dt, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const int bs_shift = log2_exact(BS);
  if (B < 0 || nq <= 0 || nkv <= 0 || nq % nkv != 0 || nq / nkv > 8 || bs_shift < 0 || MB <= 0 ||
      max_len <= 0 || B > 65535 || nkv > 65535) {
    return cudaErrorInvalidValue;
  }
  const int splits = decode_attention_num_splits(B, nkv, max_len);
  if (splits > 1 &&
      (workspace == nullptr ||
       workspace_numel < decode_attention_workspace_needed(B, nq, nkv, D, max_len))) {
    return cudaErrorInvalidValue;
  }
  const float qscale = scale * kLog2e;
  CK_DISPATCH_HALF(dt, E, {
    switch (D) {
      case 64:
        return launch_decode_d<E, 64>(q, k_cache, v_cache, block_tables, positions, qscale, out,
                                      workspace, B, nq, nkv, MB, bs_shift, splits, stream);
      case 128:
        return launch_decode_d<E, 128>(q, k_cache, v_cache, block_tables, positions, qscale, out,
                                       workspace, B, nq, nkv, MB, bs_shift, splits, stream);
      case 256:
        return launch_decode_d<E, 256>(q, k_cache, v_cache, block_tables, positions, qscale, out,
                                       workspace, B, nq, nkv, MB, bs_shift, splits, stream);
      default:
        return cudaErrorInvalidValue;
    }
  });
  return cudaErrorInvalidValue;
}

cudaError_t launch_prefill_attention(const void* q, const void* k_cache, const void* v_cache,
                                     const int32_t* block_table, int start_pos, float scale,
                                     void* out, int T, int nq, int nkv, int D, int BS, int MB,
                                     DType dt, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  const int bs_shift = log2_exact(BS);
  if (T < 0 || start_pos < 0 || nq <= 0 || nkv <= 0 || nq % nkv != 0 || bs_shift < 0 ||
      static_cast<int64_t>(start_pos) + T > static_cast<int64_t>(MB) * BS || nq > 65535) {
    return cudaErrorInvalidValue;
  }
  const float qscale = scale * kLog2e;
  CK_DISPATCH_HALF(dt, E, {
    switch (D) {
      case 64:
        return launch_prefill_d<E, 64>(q, k_cache, v_cache, block_table, start_pos, qscale, out, T,
                                       nq, nkv, bs_shift, stream);
      case 128:
        return launch_prefill_d<E, 128>(q, k_cache, v_cache, block_table, start_pos, qscale, out,
                                        T, nq, nkv, bs_shift, stream);
      default:
        return cudaErrorInvalidValue;
    }
  });
  return cudaErrorInvalidValue;
}

}  // namespace ck
