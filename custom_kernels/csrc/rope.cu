// RoPE + paged KV write: rotates q and k of each token (rotate_half layout, pairs (i, i + D/2)),
// writes rotated q to q_out and rotated k / plain v into the token's slot of the paged cache.
//
// Positions come from device memory (the decode step increments them itself), so one launch
// configuration serves every step.
#include <cmath>

#include "common.cuh"

namespace ck {
namespace {

// grid (T, nq + 2 nkv): one block per (token, head); blockDim = D / 2, thread i owns the pair
// (i, i + D/2). Heads [0, nq) are q, [nq, nq + nkv) are k, the rest are v.
// Token t's block table starts at block_table + t * bt_stride (bt_stride = 0: one table shared by
// every token; MB: one row of a [T, MB] table per token).
// qkv, positions and block_table may be written by earlier work of the step (coherent loads, after
// the PDL wait); cos / sin are launch constants.
template <typename T>
__global__ void rope_kv_write_kernel(const T* qkv,                       // [T, (nq+2nkv) D]
                                     const int32_t* positions,           // [T]
                                     const float* __restrict__ cos_t,    // [P, D/2]
                                     const float* __restrict__ sin_t,    // [P, D/2]
                                     T* k_cache,                         // [NB, BS, nkv, D]
                                     T* v_cache,                         // [NB, BS, nkv, D]
                                     const int32_t* block_table,         // [MB] or [T, MB]
                                     int64_t bt_stride,                  // 0 or MB
                                     T* q_out,                           // [T, nq, D]
                                     int nq, int nkv, int D, int64_t NB, int BS, int MB, int P) {
  pdl_begin();
  const int t = blockIdx.x;
  const int head = blockIdx.y;
  const int half = D / 2;
  const int i = threadIdx.x;
  const int pos = positions[t];
  const T* src = qkv + static_cast<int64_t>(t) * (nq + 2 * nkv) * D + static_cast<int64_t>(head) * D;

  if (pos < 0) {
    // Padding token: a zero q row, no K/V write anywhere.
    if (head < nq) {
      T* dst = q_out + (static_cast<int64_t>(t) * nq + head) * D;
      dst[i] = Elem<T>::from_float(0.f);
      dst[i + half] = Elem<T>::from_float(0.f);
    }
    return;
  }

  // Cache slot of this token; -1 when the position does not map to a valid block.
  int64_t slot_base = -1;
  if (head >= nq && pos / BS < MB) {
    const int64_t blk = block_table[t * bt_stride + pos / BS];
    if (blk >= 0 && blk < NB) {
      slot_base = ((blk * BS + pos % BS) * nkv + (head - nq) % nkv) * static_cast<int64_t>(D);
    }
  }

  if (head < nq + nkv) {
    const float x1 = Elem<T>::to_float(src[i]);
    const float x2 = Elem<T>::to_float(src[i + half]);
    float o1, o2;
    if (pos < P) {
      const float c = cos_t[static_cast<int64_t>(pos) * half + i];
      const float s = sin_t[static_cast<int64_t>(pos) * half + i];
      // Explicit _rn ops: no FMA contraction, so the fp32 results equal the reference's
      // (x1*c - x2*s, x2*c + x1*s) bitwise before the dtype rounding.
      o1 = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
      o2 = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    } else {
      o1 = o2 = NAN;  // out-of-table position: make the bug loud downstream
    }
    if (head < nq) {
      T* dst = q_out + (static_cast<int64_t>(t) * nq + head) * D;
      dst[i] = Elem<T>::from_float(o1);
      dst[i + half] = Elem<T>::from_float(o2);
    } else if (slot_base >= 0 && pos < P) {
      k_cache[slot_base + i] = Elem<T>::from_float(o1);
      k_cache[slot_base + i + half] = Elem<T>::from_float(o2);
    }
  } else if (slot_base >= 0) {
    v_cache[slot_base + i] = src[i];
    v_cache[slot_base + i + half] = src[i + half];
  }
}

}  // namespace

cudaError_t launch_rope_kv_write(const void* qkv, const int32_t* positions, const float* cos,
                                 const float* sin, void* k_cache, void* v_cache,
                                 const int32_t* block_table, bool per_token_tables, void* q_out,
                                 int T, int nq, int nkv, int D, int64_t NB, int BS, int MB, int P,
                                 DType dt, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (T < 0 || nq <= 0 || nkv <= 0 || D <= 0 || D % 2 != 0 || D > 256 || BS <= 0 || MB <= 0 ||
      P <= 0 || NB <= 0) {
    return cudaErrorInvalidValue;
  }
  const dim3 grid(T, nq + 2 * nkv);
  const int64_t bt_stride = per_token_tables ? MB : 0;
  CK_DISPATCH_HALF(dt, E, {
    CK_LAUNCH(rope_kv_write_kernel<E>, grid, dim3(D / 2), 0, stream, static_cast<const E*>(qkv),
              positions, cos, sin, static_cast<E*>(k_cache), static_cast<E*>(v_cache), block_table,
              bt_stride, static_cast<E*>(q_out), nq, nkv, D, NB, BS, MB, P);
  });
  CK_RETURN_LAUNCH_STATUS();
}

}  // namespace ck
