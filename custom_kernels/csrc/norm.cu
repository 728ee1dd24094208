// Embedding gather, RMSNorm and fused residual-add + RMSNorm.
//
// Numerics follow reference.py (HF LlamaRMSNorm): statistics in fp32, the normalized value rounded
// to the dtype, then the weight product rounded to the dtype; add_rmsnorm first rounds
// residual + x to the dtype (HF's residual add happens in the model dtype).
#include "common.cuh"

namespace ck {
namespace {

// ----------------------------------------------------------------------------- embedding

// One block per token: copy one table row. ids [T], table [V, H], out [T, H].
// ids are written by the previous step's sampler: read after the PDL wait, coherently.
template <typename T, typename Id, bool kVec>
__global__ void embedding_kernel(const Id* ids,                 // [T]
                                 const T* __restrict__ table,   // [V, H]
                                 T* out,                        // [T, H]
                                 int H, int64_t V) {
  pdl_begin();
  const int t = blockIdx.x;
  const int64_t id = static_cast<int64_t>(ids[t]);
  const bool valid = id >= 0 && id < V;  // out-of-range ids give a zero row, never a wild read
  T* dst = out + static_cast<int64_t>(t) * H;
  const T* src = table + (valid ? id : 0) * H;
  if (kVec) {
    for (int v = threadIdx.x; v < H / 8; v += blockDim.x) {
      const uint4 val = valid ? ldg16(src + v * 8) : make_uint4(0, 0, 0, 0);
      st16(dst + v * 8, val);
    }
  } else {
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
      dst[i] = valid ? src[i] : Elem<T>::from_float(0.f);
    }
  }
}

// ----------------------------------------------------------------------------- rmsnorm

// Vector path: H % 8 == 0, H / 8 <= 1024, 16-byte aligned rows. One block per row, one 8-element
// vector per thread, the row held in registers between the statistics and the output pass.
// The norm weight (launch constant) is fetched before the PDL wait: its round trip overlaps the
// previous kernel instead of sitting after the block reduction.
template <typename T, bool kAdd>
__global__ void rmsnorm_vec_kernel(const T* x,         // [T, H]
                                   T* residual,        // [T, H] (kAdd: in/out)
                                   const T* w,         // [H]
                                   float eps, T* out,  // [T, H]
                                   int H) {
  __shared__ float red[32];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * H;
  const int v = threadIdx.x;
  const bool active = v < H / 8;
  uint4 wraw = make_uint4(0, 0, 0, 0);
  if (active) wraw = ldg16(w + v * 8);
  pdl_begin();
  float vals[8];
  float ss = 0.f;
  if (active) {
    // Plain (coherent) loads: out or residual may alias x for in-place use.
    unpack8<T>(ld16(x + base + v * 8), vals);
    if (kAdd) {
      float r[8];
      unpack8<T>(ld16(residual + base + v * 8), r);
#pragma unroll
      for (int i = 0; i < 8; ++i) vals[i] = round_to<T>(r[i] + vals[i]);
      store8<T>(residual + base + v * 8, vals);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) ss += vals[i] * vals[i];
  }
  ss = block_sum(ss, red);
  // 1 / sqrt (two IEEE roundings) as torch.rsqrt on the CPU reference computes it.
  const float inv = 1.f / sqrtf(ss / static_cast<float>(H) + eps);
  if (active) {
    float wv[8], o[8];
    unpack8<T>(wraw, wv);
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = wv[i] * round_to<T>(vals[i] * inv);
    store8<T>(out + base + v * 8, o);
  }
}

// Scalar path for any H (odd sizes, unaligned views): two strided passes over the row. The second
// pass re-reads the same indices the same thread handled in the first, so the residual it wrote is
// visible to it.
template <typename T, bool kAdd>
__global__ void rmsnorm_scalar_kernel(const T* x,         // [T, H]
                                      T* residual,        // [T, H] (kAdd: in/out)
                                      const T* w,         // [H]
                                      float eps, T* out,  // [T, H]
                                      int H) {
  __shared__ float red[32];
  pdl_begin();
  const int64_t base = static_cast<int64_t>(blockIdx.x) * H;
  float ss = 0.f;
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    float v = Elem<T>::to_float(x[base + i]);
    if (kAdd) {
      v = round_to<T>(Elem<T>::to_float(residual[base + i]) + v);
      residual[base + i] = Elem<T>::from_float(v);
    }
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const float inv = 1.f / sqrtf(ss / static_cast<float>(H) + eps);
  for (int i = threadIdx.x; i < H; i += blockDim.x) {
    const float v = Elem<T>::to_float(kAdd ? residual[base + i] : x[base + i]);
    out[base + i] = Elem<T>::from_float(Elem<T>::to_float(w[i]) * round_to<T>(v * inv));
  }
}

template <bool kAdd>
cudaError_t launch_norm(const void* x, void* residual, const void* w, float eps, void* out, int T,
                        int H, DType dt, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (T < 0 || H <= 0) return cudaErrorInvalidValue;
  const bool vec = H % 8 == 0 && H / 8 <= 1024 && aligned16(x) && aligned16(w) && aligned16(out) &&
                   (!kAdd || aligned16(residual));
  CK_DISPATCH_HALF(dt, E, {
    const E* xp = static_cast<const E*>(x);
    E* rp = static_cast<E*>(residual);
    const E* wp = static_cast<const E*>(w);
    E* op = static_cast<E*>(out);
    if (vec) {
      const int threads = ceil_div(H / 8, 32) * 32;
      CK_LAUNCH(rmsnorm_vec_kernel<E, kAdd>, dim3(T), dim3(threads), 0, stream, xp, rp, wp, eps,
                op, H);
    } else {
      const int threads = H >= 4096 ? 1024 : 256;
      CK_LAUNCH(rmsnorm_scalar_kernel<E, kAdd>, dim3(T), dim3(threads), 0, stream, xp, rp, wp,
                eps, op, H);
    }
  });
  CK_RETURN_LAUNCH_STATUS();
}

}  // namespace

cudaError_t launch_embedding(const void* ids, bool ids_are_int64, const void* table, void* out,
                             int T, int H, int64_t V, DType dt, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (T < 0 || H <= 0 || V <= 0) return cudaErrorInvalidValue;
  const bool vec = H % 8 == 0 && aligned16(table) && aligned16(out);
  const int threads = vec ? (H / 8 >= 256 ? 256 : ceil_div(H / 8, 32) * 32) : 256;
  CK_DISPATCH_HALF(dt, E, {
    const E* tp = static_cast<const E*>(table);
    E* op = static_cast<E*>(out);
    if (ids_are_int64) {
      const int64_t* ip = static_cast<const int64_t*>(ids);
      if (vec) CK_LAUNCH(embedding_kernel<E, int64_t, true>, dim3(T), dim3(threads), 0, stream, ip, tp, op, H, V);
      else CK_LAUNCH(embedding_kernel<E, int64_t, false>, dim3(T), dim3(threads), 0, stream, ip, tp, op, H, V);
    } else {
      const int32_t* ip = static_cast<const int32_t*>(ids);
      if (vec) CK_LAUNCH(embedding_kernel<E, int32_t, true>, dim3(T), dim3(threads), 0, stream, ip, tp, op, H, V);
      else CK_LAUNCH(embedding_kernel<E, int32_t, false>, dim3(T), dim3(threads), 0, stream, ip, tp, op, H, V);
    }
  });
  CK_RETURN_LAUNCH_STATUS();
}

cudaError_t launch_rmsnorm(const void* x, const void* w, float eps, void* out, int T, int H,
                           DType dt, cudaStream_t stream) {
  return launch_norm<false>(x, nullptr, w, eps, out, T, H, dt, stream);
}

cudaError_t launch_add_rmsnorm(const void* x, void* residual, const void* w, float eps, void* out,
                               int T, int H, DType dt, cudaStream_t stream) {
  return launch_norm<true>(x, residual, w, eps, out, T, H, dt, stream);
}

}  // namespace ck
