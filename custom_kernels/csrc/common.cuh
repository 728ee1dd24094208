// Device helpers shared by the kernels: element types <-> fp32, 16-byte vector loads and stores,
// warp and block reductions, dtype dispatch. No torch here: the .cu files compile with bare nvcc.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launchers.h"

namespace ck {

using bf16 = __nv_bfloat16;
using fp16 = __half;

constexpr float kLog2e = 1.4426950408889634f;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ----------------------------------------------------------------------------- element types

// Conversions of one element type. Rounding to the dtype is round-to-nearest-even, which is what
// torch's .to(bfloat16 / float16) does, so "rounded to dtype" steps of the reference match bitwise.
template <typename T>
struct Elem;

template <>
struct Elem<bf16> {
  static __device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ bf16 from_float(float f) { return __float2bfloat16_rn(f); }
  // A 32-bit word holding elements i (low half) and i + 1 (high half). bf16 -> fp32 is exact: the
  // bf16 bits are the top half of the fp32 bits.
  static __device__ __forceinline__ float2 unpack2(uint32_t w) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct Elem<fp16> {
  static __device__ __forceinline__ float to_float(fp16 v) { return __half2float(v); }
  static __device__ __forceinline__ fp16 from_float(float f) { return __float2half_rn(f); }
  static __device__ __forceinline__ float2 unpack2(uint32_t w) {
    return __half22float2(*reinterpret_cast<__half2*>(&w));
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// fp32 value rounded to T and back: the "rounded to dtype" step of the reference.
template <typename T>
__device__ __forceinline__ float round_to(float f) {
  return Elem<T>::to_float(Elem<T>::from_float(f));
}

// ----------------------------------------------------------------------------- 16-byte vectors

// 8 elements of a 2-byte type in one 16-byte access. Callers guarantee 16-byte alignment.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const float2 a = Elem<T>::unpack2(v.x), b = Elem<T>::unpack2(v.y);
  const float2 c = Elem<T>::unpack2(v.z), d = Elem<T>::unpack2(v.w);
  f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
  f[4] = c.x; f[5] = c.y; f[6] = d.x; f[7] = d.y;
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 v;
  v.x = Elem<T>::pack2(f[0], f[1]);
  v.y = Elem<T>::pack2(f[2], f[3]);
  v.z = Elem<T>::pack2(f[4], f[5]);
  v.w = Elem<T>::pack2(f[6], f[7]);
  return v;
}

// Read-only (non-coherent) path: for inputs no kernel of the same launch writes.
__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}
// Coherent load: for buffers that are also written by this kernel (the residual stream).
__device__ __forceinline__ uint4 ld16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void st16(void* p, const uint4& v) { *reinterpret_cast<uint4*>(p) = v; }

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
  unpack8<T>(ldg16(p), f);
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&f)[8]) {
  st16(p, pack8<T>(f));
}

__host__ __device__ inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ----------------------------------------------------------------------------- reductions

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Butterfly all-reduce: every lane ends with the same, bitwise-identical value (each step combines
// the same two operands on both partner lanes), so results are deterministic.
template <typename Op>
__device__ __forceinline__ float warp_allreduce(float v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) { return warp_allreduce(v, SumOp()); }
__device__ __forceinline__ float warp_max(float v) { return warp_allreduce(v, MaxOp()); }

// Block all-reduce for blockDim.x a multiple of 32 (<= 1024). `buf` is a __shared__ float[32].
// Every thread returns the same value; the warp partials are combined in a fixed order. The
// leading barrier makes back-to-back calls with the same buffer safe.
template <typename Op>
__device__ __forceinline__ float block_allreduce(float v, Op op, float* buf) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_allreduce(v, op);
  __syncthreads();
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  float r = buf[0];
  for (int i = 1; i < nwarps; ++i) r = op(r, buf[i]);
  return r;
}
__device__ __forceinline__ float block_sum(float v, float* buf) {
  return block_allreduce(v, SumOp(), buf);
}
__device__ __forceinline__ float block_max(float v, float* buf) {
  return block_allreduce(v, MaxOp(), buf);
}

}  // namespace ck

// Instantiates __VA_ARGS__ with `T` bound to the element type of a BF16/FP16 DType; returns
// cudaErrorInvalidValue from the enclosing launcher for any other dtype.
#define CK_DISPATCH_HALF(dt, T, ...)                 \
  switch (dt) {                                      \
    case ::ck::DType::BF16: {                        \
      using T = ::ck::bf16;                          \
      __VA_ARGS__;                                   \
    } break;                                         \
    case ::ck::DType::FP16: {                        \
      using T = ::ck::fp16;                          \
      __VA_ARGS__;                                   \
    } break;                                         \
    default:                                         \
      return cudaErrorInvalidValue;                  \
  }

// Returns the launch error (if any) of the kernel just enqueued.
#define CK_RETURN_LAUNCH_STATUS() return cudaGetLastError()

// Propagates a failing CUDA runtime call out of a launcher.
#define CK_CUDA_TRY(expr)                  \
  do {                                     \
    const cudaError_t ck_err_ = (expr);    \
    if (ck_err_ != cudaSuccess) return ck_err_; \
  } while (0)
