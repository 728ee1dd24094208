// Batched GEMV for linear at decode sizes: out [T, N] = x [T, K] @ w [N, K]^T with T <= 8, and the
// fused SwiGLU + down projection: out [T, N] = swiglu(gate_up) [T, I] @ w [N, I]^T.
//
// Decode is memory-bound on w: every weight byte is read once per step, so the floor is
// N * K * 2 bytes / bandwidth. At T = 1 (bf16/fp16; + K * 2 for x and N * 2 for out):
//
//   shape (N x K)                     bytes          floor @ 4186 GB/s (H200 copy bandwidth)
//   SmolLM2 qkv       960 x   576       1,108,992      0.26 us
//   SmolLM2 o         576 x   576         665,856      0.16 us
//   SmolLM2 gate_up  3072 x   576       3,546,240      0.85 us
//   SmolLM2 down      576 x  1536       1,773,696      0.42 us   (swiglu_linear: 1,776,768)
//   SmolLM2 lm_head 49152 x   576      56,722,560     13.55 us
//   Llama-2 qkv     12288 x  4096     100,696,064     24.06 us
//   Llama-2 o        4096 x  4096      33,570,816      8.02 us
//   Llama-2 gate_up 22016 x  4096     180,407,296     43.10 us
//   Llama-2 down     4096 x 11008      90,207,744     21.55 us   (swiglu_linear: 90,229,760)
//   Llama-2 lm_head 32000 x  4096     262,216,192     62.64 us
//
// The SmolLM2 shapes are launch/latency-bound (a few hundred ns of bytes); what matters there is
// one memory round trip per kernel and overlap with the neighbours (PDL, common.cuh). The Llama
// shapes with few rows (o, down) need many bytes in flight from only N = 4096 rows: with one warp
// per row (the previous design) the whole matrix was 2048 warps doing 4-11 dependent round trips
// each. Here K is split across the threads of a row group instead:
//
//   * A "group" of GS threads (32, 64, 128 or 256: one to eight warps) owns RB consecutive output
//     rows. Thread gl of the group reads the 16-byte vectors gl, gl + GS, gl + 2 GS, ... of each of
//     its RB rows, U vectors per row in flight at once (U * RB 16-byte loads per thread). GS is the
//     smallest that covers a row with <= 4 vectors per thread (GS * 4 >= K / 8, capped at 256), so
//     at every shape above except Llama down a group reads its rows in ONE batch of loads (one
//     memory round trip per block); Llama down (K / 8 = 1376 = 5.4 vectors per thread) uses U = 8,
//     again one batch. Blocks are short-lived and many (2048 for Llama o / down), so the scheduler
//     keeps ~100+ KB of loads in flight per SM and backfills as blocks retire.
//   * Accumulation is fp32, each thread in increasing k; then a butterfly within the warp and, for
//     groups of several warps, a fixed-order sum of the warp partials through shared memory. The
//     order depends only on GS (a function of K), so the fused SwiGLU kernel below accumulates
//     exactly like swiglu + linear would: the two paths are bitwise equal.
//   * PDL: the first batch of weight loads is issued BEFORE pdl_wait() (weights are launch
//     constants), so it overlaps the previous kernel's tail; x is read only after the wait.
//   * RB = 2 when that still leaves >= 1056 warps (8 per SM of a 132-SM GPU), else 1 (x reuse vs
//     parallelism). The fused kernel uses RB = 8 (4 for T > 4) on big shapes: it recomputes
//     silu(gate) * up for its K slice once per group, and 8 rows per group keep that recomputation
//     at ~1/8 of a SwiGLU per weight row.
//
// x (or gate_up) is re-read from L1/L2 per row group; it is a few KB, so that costs no HBM bytes.
//
// Batch invariance (linear_invariant / swiglu_linear_invariant): the summation order of an output
// element is fixed by K alone: each thread sums its vectors gl, gl + GS, ... in increasing k with
// one fmaf chain per (row, token), then the fixed butterfly and the fixed-order sum of the warp
// partials, where GS = gemv_group_threads(K / 8). Neither the token count TB, nor RB, nor U (which
// only batches the loads), nor N changes it, so token t's result is bitwise the same in a launch of
// any number of tokens. More than kGemvMaxRows tokens are served by ONE launch over token groups of
// TB = 8 (the last one partial: its missing tokens are neither loaded nor stored): the 1-D grid is
// (weight tile, token group) with the token group fastest, so the blocks that share a weight tile
// are scheduled together and all but the first read it from L2.
#include "common.cuh"

namespace ck {
namespace {

constexpr int kGemvMaxThreads = 256;
constexpr int kGemvMaxWarps = kGemvMaxThreads / 32;
// Warps that fill a 132-SM GPU to 8 resident warps per SM: below it, fewer rows per group.
constexpr int kGemvFillWarps = 132 * 8;

// Threads per row group for rows of KV 16-byte vectors: smallest power of two >= 32 with
// GS * 4 >= KV, capped at kGemvMaxThreads. A function of K only (bitwise agreement of the plain
// and the fused kernels depends on that).
int gemv_group_threads(int KV) {
  int gs = 32;
  while (gs < kGemvMaxThreads && gs * 4 < KV) gs *= 2;
  return gs;
}

int log2_pow2(int v) {
  int s = 0;
  while ((1 << s) < v) ++s;
  return s;
}

// The x operand, 8 elements at vector kv of token t, as fp32: a plain load of x [T, K] or, for the
// fused down projection, SwiGLU of gate_up [T, 2K] rounded exactly like reference.swiglu.
template <typename T, bool kSwiGLU>
__device__ __forceinline__ void load_x8(const T* x, int K, int t, int kv, float (&xf)[8]) {
  if (kSwiGLU) {
    const T* row = x + static_cast<int64_t>(t) * 2 * K + kv * 8;
    float g[8], u[8];
    load8c<T>(row, g);
    load8c<T>(row + K, u);
#pragma unroll
    for (int j = 0; j < 8; ++j) xf[j] = swiglu_rounded<T>(g[j], u[j]);
  } else {
    load8c<T>(x + static_cast<int64_t>(t) * K + kv * 8, xf);
  }
}

// grid: ceil(N / (RB * groups per block)) * token_groups, 1-D, the token group fastest;
// block: groups of (32 << group_shift) threads. See the file comment. x is not __restrict__: it
// is written by the previous kernel (coherent loads only, after pdl_wait).
template <typename T, int TB, int RB, int U, bool kSwiGLU>
__global__ void __launch_bounds__(kGemvMaxThreads)
gemv_kernel(const T* x,                 // [T, K] (kSwiGLU: gate_up [T, 2K])
            const T* __restrict__ w,    // [N, K]   launch constant: read before pdl_wait
            T* out,                     // [T, N]
            int N, int K, int group_shift, int tokens, int token_groups) {
  static_assert(RB * TB <= 64, "the reduction below stores at most 64 sums per group");
  __shared__ float red[kGemvMaxWarps][RB * TB];

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int gs = 32 << group_shift;                // threads per group
  const int gl = tid & (gs - 1);                   // index within the group
  const int g = tid >> (5 + group_shift);          // group within the block
  const int groups = blockDim.x >> (5 + group_shift);
  const int tile = blockIdx.x / token_groups;      // weight tile
  const int tg = blockIdx.x - tile * token_groups; // token group
  const int t0 = tg * TB;                          // first token of the group
  const int nt = min(TB, tokens - t0);             // tokens of this group (the last may be partial)
  x += static_cast<int64_t>(t0) * (kSwiGLU ? 2 : 1) * K;
  out += static_cast<int64_t>(t0) * N;
  const int n0 = (tile * groups + g) * RB;         // first row of the group
  const int KV = K >> 3;                           // 16-byte vectors per row
  const int kv_end = n0 < N ? KV : 0;              // a group past N loads nothing

  // Rows past N (last group only) re-read row N - 1 and are never stored.
  const T* wr[RB];
#pragma unroll
  for (int r = 0; r < RB; ++r) wr[r] = w + static_cast<int64_t>(min(n0 + r, N - 1)) * K;

  float acc[RB][TB];
#pragma unroll
  for (int r = 0; r < RB; ++r)
#pragma unroll
    for (int t = 0; t < TB; ++t) acc[r][t] = 0.f;

  uint4 wv[U][RB];
  auto load_batch = [&](int kv0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kv = kv0 + u * gs;
#pragma unroll
      for (int r = 0; r < RB; ++r)
        wv[u][r] = kv < kv_end ? ldg16(wr[r] + static_cast<int64_t>(kv) * 8) : make_uint4(0, 0, 0, 0);
    }
  };

  int kv0 = gl;
  load_batch(kv0);  // weights only: may overlap the previous kernel
  pdl_begin();      // from here on x may be read and out written

  while (kv0 < kv_end) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kv = kv0 + u * gs;
      if (kv < kv_end) {
        // x first (for the fused kernel the SwiGLU math overlaps the weight loads in flight).
        float xf[TB][8];
#pragma unroll
        for (int t = 0; t < TB; ++t) {
          if (t < nt) {
            load_x8<T, kSwiGLU>(x, K, t, kv, xf[t]);
          } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) xf[t][j] = 0.f;  // a missing token: computed, never stored
          }
        }
#pragma unroll
        for (int r = 0; r < RB; ++r) {
          float wf[8];
          unpack8<T>(wv[u][r], wf);
#pragma unroll
          for (int t = 0; t < TB; ++t)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[r][t] = fmaf(wf[j], xf[t][j], acc[r][t]);
        }
      }
    }
    kv0 += U * gs;
    if (kv0 < kv_end) load_batch(kv0);
  }

#pragma unroll
  for (int r = 0; r < RB; ++r)
#pragma unroll
    for (int t = 0; t < TB; ++t) acc[r][t] = warp_sum(acc[r][t]);

  if (group_shift == 0) {
    // One warp per group: every lane holds every sum; lane (r * TB + t) % 32 stores it.
#pragma unroll
    for (int r = 0; r < RB; ++r)
#pragma unroll
      for (int t = 0; t < TB; ++t)
        if (lane == ((r * TB + t) & 31) && n0 + r < N && t < nt)
          out[static_cast<int64_t>(t) * N + n0 + r] = Elem<T>::from_float(acc[r][t]);
  } else {
    // Several warps per group (uniform over the block, so every thread reaches the barrier).
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < RB; ++r)
#pragma unroll
        for (int t = 0; t < TB; ++t) red[warp][r * TB + t] = acc[r][t];
    }
    __syncthreads();
    const int kw = gs >> 5;  // warps per group
    const int w0 = g * kw;   // the group's first warp
    for (int i = gl; i < RB * TB; i += gs) {
      float s = red[w0][i];
      for (int k = 1; k < kw; ++k) s += red[w0 + k][i];  // fixed order: deterministic
      const int r = i / TB, t = i - (i / TB) * TB;
      if (n0 + r < N && t < nt) out[static_cast<int64_t>(t) * N + n0 + r] = Elem<T>::from_float(s);
    }
  }
}

// `tokens` rows of x in ceil(tokens / TB) token groups (tokens == TB: the plain decode launch).
template <typename T, int TB, int RB, int U, bool kSwiGLU>
cudaError_t launch_cfg(const T* x, const T* w, T* out, int N, int K, int gs, int tokens,
                       cudaStream_t stream) {
  const int threads = gs > 128 ? gs : 128;
  const int rows_per_block = (threads / gs) * RB;
  const int tiles = ceil_div(N, rows_per_block);
  const int token_groups = ceil_div(tokens, TB);
  const int64_t blocks = static_cast<int64_t>(tiles) * token_groups;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const int group_shift = log2_pow2(gs / 32);  // gs = 32 << group_shift
  CK_LAUNCH(gemv_kernel<T, TB, RB, U, kSwiGLU>, dim3(static_cast<unsigned>(blocks)), dim3(threads),
            0, stream, x, w, out, N, K, group_shift, tokens, token_groups);
  return cudaSuccess;
}

// Plain linear: RB in {1, 2}; U = 4, or 8 when a row needs 5..8 vectors per thread (T <= 2 only,
// registers); rows longer than that loop over batches.
template <typename T, int TB>
cudaError_t launch_linear_tb(const T* x, const T* w, T* out, int N, int K, int tokens,
                             cudaStream_t stream) {
  const int KV = K / 8;
  const int gs = gemv_group_threads(KV);
  const bool two_rows = static_cast<int64_t>(N / 2) * (gs / 32) >= kGemvFillWarps;
  const bool deep = TB <= 2 && KV > 4 * gs;
  if (two_rows) {
    return deep ? launch_cfg<T, TB, 2, (TB <= 2 ? 8 : 4), false>(x, w, out, N, K, gs, tokens, stream)
                : launch_cfg<T, TB, 2, 4, false>(x, w, out, N, K, gs, tokens, stream);
  }
  return deep ? launch_cfg<T, TB, 1, (TB <= 2 ? 8 : 4), false>(x, w, out, N, K, gs, tokens, stream)
              : launch_cfg<T, TB, 1, 4, false>(x, w, out, N, K, gs, tokens, stream);
}

// Fused SwiGLU + down: U = 2; RB = 8 (4 for T > 4) on big shapes, 2 on small ones.
template <typename T, int TB>
cudaError_t launch_swiglu_linear_tb(const T* gate_up, const T* w, T* out, int N, int I, int tokens,
                                    cudaStream_t stream) {
  constexpr int kBigRB = TB <= 4 ? 8 : 4;
  const int gs = gemv_group_threads(I / 8);
  if (static_cast<int64_t>(N / kBigRB) * (gs / 32) >= kGemvFillWarps) {
    return launch_cfg<T, TB, kBigRB, 2, true>(gate_up, w, out, N, I, gs, tokens, stream);
  }
  return launch_cfg<T, TB, 2, 2, true>(gate_up, w, out, N, I, gs, tokens, stream);
}

#define CK_GEMV_SWITCH_T(T_, FN, ...)                       \
  switch (T_) {                                             \
    case 1: return FN<E, 1>(__VA_ARGS__);                   \
    case 2: return FN<E, 2>(__VA_ARGS__);                   \
    case 3: return FN<E, 3>(__VA_ARGS__);                   \
    case 4: return FN<E, 4>(__VA_ARGS__);                   \
    case 5: return FN<E, 5>(__VA_ARGS__);                   \
    case 6: return FN<E, 6>(__VA_ARGS__);                   \
    case 7: return FN<E, 7>(__VA_ARGS__);                   \
    case 8: return FN<E, 8>(__VA_ARGS__);                   \
    default: return cudaErrorInvalidValue;                  \
  }

}  // namespace

bool gemv_supported(const void* x, const void* w, int T, int K) {
  return T >= 1 && T <= kGemvMaxRows && K > 0 && K % 8 == 0 && aligned16(x) && aligned16(w);
}

bool swiglu_linear_supported(const void* gate_up, const void* w, int T, int I) {
  return T >= 1 && T <= kGemvMaxRows && I > 0 && I % 8 == 0 && aligned16(gate_up) &&
         aligned16(w);
}

cudaError_t launch_gemv(const void* x, const void* w, void* out, int T, int N, int K, DType dt,
                        cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (!gemv_supported(x, w, T, K) || N < 0) return cudaErrorInvalidValue;
  CK_DISPATCH_HALF(dt, E, {
    const E* xp = static_cast<const E*>(x);
    const E* wp = static_cast<const E*>(w);
    E* op = static_cast<E*>(out);
    CK_GEMV_SWITCH_T(T, launch_linear_tb, xp, wp, op, N, K, T, stream);
  });
  return cudaErrorInvalidValue;
}

cudaError_t launch_swiglu_linear(const void* gate_up, const void* w, void* out, int T, int N, int I,
                                 DType dt, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (!swiglu_linear_supported(gate_up, w, T, I) || N < 0) return cudaErrorInvalidValue;
  CK_DISPATCH_HALF(dt, E, {
    const E* gp = static_cast<const E*>(gate_up);
    const E* wp = static_cast<const E*>(w);
    E* op = static_cast<E*>(out);
    CK_GEMV_SWITCH_T(T, launch_swiglu_linear_tb, gp, wp, op, N, I, T, stream);
  });
  return cudaErrorInvalidValue;
}

bool gemv_invariant_supported(const void* x, const void* w, int T, int K) {
  return T >= 1 && K > 0 && K % 8 == 0 && aligned16(x) && aligned16(w);
}

cudaError_t launch_gemv_invariant(const void* x, const void* w, void* out, int T, int N, int K,
                                  DType dt, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (!gemv_invariant_supported(x, w, T, K) || N < 0) return cudaErrorInvalidValue;
  // Up to kGemvMaxRows tokens: exactly the decode GEMV. More: token groups of kGemvMaxRows, one
  // launch (same summation order either way, see the file comment).
  if (T <= kGemvMaxRows) return launch_gemv(x, w, out, T, N, K, dt, stream);
  CK_DISPATCH_HALF(dt, E, {
    return launch_linear_tb<E, kGemvMaxRows>(static_cast<const E*>(x), static_cast<const E*>(w),
                                             static_cast<E*>(out), N, K, T, stream);
  });
  return cudaErrorInvalidValue;
}

bool swiglu_linear_invariant_supported(const void* gate_up, const void* w, int T, int I) {
  return T >= 1 && I > 0 && I % 8 == 0 && aligned16(gate_up) && aligned16(w);
}

cudaError_t launch_swiglu_linear_invariant(const void* gate_up, const void* w, void* out, int T,
                                           int N, int I, DType dt, cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (!swiglu_linear_invariant_supported(gate_up, w, T, I) || N < 0) return cudaErrorInvalidValue;
  if (T <= kGemvMaxRows) return launch_swiglu_linear(gate_up, w, out, T, N, I, dt, stream);
  CK_DISPATCH_HALF(dt, E, {
    return launch_swiglu_linear_tb<E, kGemvMaxRows>(static_cast<const E*>(gate_up),
                                                    static_cast<const E*>(w), static_cast<E*>(out),
                                                    N, I, T, stream);
  });
  return cudaErrorInvalidValue;
}

}  // namespace ck
