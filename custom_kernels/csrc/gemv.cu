// Batched GEMV for linear at decode sizes: out [T, N] = x [T, K] @ w [N, K]^T with T <= 8.
//
// Decode is memory-bound on w: every weight byte is read once per step. Each warp owns R output
// rows and streams them with 16-byte loads, U steps of loads in flight per lane; x (a few KB) is
// re-read from L1 for every step and shared by the R rows; fp32 accumulation; a butterfly reduce
// at the end. No shared memory, no block barrier: a warp past N just returns.
#include "common.cuh"

namespace ck {
namespace {

constexpr int kGemvWarps = 4;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvUnroll = 4;
// Row count per warp: 2 (x reuse) when that still gives ~2 blocks per SM of a 132-SM GPU.
constexpr int kGemvTwoRowsMinN = 2 * 132 * kGemvWarps * 2;

template <typename T, int TB, int R>
__global__ void __launch_bounds__(kGemvThreads)
gemv_kernel(const T* __restrict__ x,  // [TB, K]
            const T* __restrict__ w,  // [N, K]
            T* __restrict__ out,      // [TB, N]
            int N, int K) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = (blockIdx.x * kGemvWarps + warp) * R;
  if (n0 >= N) return;
  const int KV = K / 8;  // 16-byte vectors per row

  const T* wr[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wr[r] = w + static_cast<int64_t>(min(n0 + r, N - 1)) * K;

  float acc[R][TB];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < TB; ++t) acc[r][t] = 0.f;

  for (int kv0 = lane; kv0 < KV; kv0 += 32 * kGemvUnroll) {
    uint4 wv[kGemvUnroll][R];
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const int kv = kv0 + 32 * u;
#pragma unroll
      for (int r = 0; r < R; ++r)
        wv[u][r] = kv < KV ? ldg16(wr[r] + static_cast<int64_t>(kv) * 8) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const int kv = kv0 + 32 * u;
      if (kv < KV) {
        float wf[R][8];
#pragma unroll
        for (int r = 0; r < R; ++r) unpack8<T>(wv[u][r], wf[r]);
#pragma unroll
        for (int t = 0; t < TB; ++t) {
          float xf[8];
          load8<T>(x + static_cast<int64_t>(t) * K + kv * 8, xf);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[r][t] = fmaf(wf[r][j], xf[j], acc[r][t]);
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < TB; ++t) acc[r][t] = warp_sum(acc[r][t]);

  // Every lane holds every sum; lane r * TB + t stores one.
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < TB; ++t)
      if (lane == r * TB + t && n0 + r < N)
        out[static_cast<int64_t>(t) * N + n0 + r] = Elem<T>::from_float(acc[r][t]);
}

template <typename T, int TB>
void launch_gemv_tb(const T* x, const T* w, T* out, int N, int K, cudaStream_t stream) {
  if (N >= kGemvTwoRowsMinN) {
    gemv_kernel<T, TB, 2><<<ceil_div(N, kGemvWarps * 2), kGemvThreads, 0, stream>>>(x, w, out, N, K);
  } else {
    gemv_kernel<T, TB, 1><<<ceil_div(N, kGemvWarps), kGemvThreads, 0, stream>>>(x, w, out, N, K);
  }
}

}  // namespace

bool gemv_supported(const void* x, const void* w, int T, int K) {
  return T >= 1 && T <= kGemvMaxRows && K > 0 && K % 8 == 0 && aligned16(x) && aligned16(w);
}

cudaError_t launch_gemv(const void* x, const void* w, void* out, int T, int N, int K, DType dt,
                        cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (!gemv_supported(x, w, T, K) || N < 0) return cudaErrorInvalidValue;
  CK_DISPATCH_HALF(dt, E, {
    const E* xp = static_cast<const E*>(x);
    const E* wp = static_cast<const E*>(w);
    E* op = static_cast<E*>(out);
    switch (T) {
      case 1: launch_gemv_tb<E, 1>(xp, wp, op, N, K, stream); break;
      case 2: launch_gemv_tb<E, 2>(xp, wp, op, N, K, stream); break;
      case 3: launch_gemv_tb<E, 3>(xp, wp, op, N, K, stream); break;
      case 4: launch_gemv_tb<E, 4>(xp, wp, op, N, K, stream); break;
      case 5: launch_gemv_tb<E, 5>(xp, wp, op, N, K, stream); break;
      case 6: launch_gemv_tb<E, 6>(xp, wp, op, N, K, stream); break;
      case 7: launch_gemv_tb<E, 7>(xp, wp, op, N, K, stream); break;
      case 8: launch_gemv_tb<E, 8>(xp, wp, op, N, K, stream); break;
      default: return cudaErrorInvalidValue;
    }
  });
  CK_RETURN_LAUNCH_STATUS();
}

}  // namespace ck
