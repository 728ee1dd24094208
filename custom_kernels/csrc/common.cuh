// Device helpers shared by the kernels: element types <-> fp32, 16-byte vector loads and stores,
// warp and block reductions, dtype dispatch. No torch here: the .cu files compile with bare nvcc.
#pragma once

#include <cstddef>
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

// Read-only (non-coherent) path. Only for data that is read-only for the whole lifetime of the
// kernel, which under programmatic dependent launch (below) includes the tail of the previous
// kernel: weights, norm weights, RoPE tables. Never for activations, caches or anything another
// kernel of the step writes.
__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}
// Coherent (plain) load: for everything a previous kernel may have written (activations, KV cache,
// positions) and for buffers this kernel writes too (the residual stream). Pointers read this way
// are deliberately not `const T* __restrict__` in the kernel signatures, so that nvcc cannot turn
// the loads into non-coherent ones.
__device__ __forceinline__ uint4 ld16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void st16(void* p, const uint4& v) { *reinterpret_cast<uint4*>(p) = v; }

// 8 elements through the read-only path (weights and other launch-constant data).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
  unpack8<T>(ldg16(p), f);
}
// 8 elements through the coherent path (activations written by a previous kernel).
template <typename T>
__device__ __forceinline__ void load8c(const T* p, float (&f)[8]) {
  unpack8<T>(ld16(p), f);
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&f)[8]) {
  st16(p, pack8<T>(f));
}

__host__ __device__ inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// silu in fp32 written the way torch's CPU kernel forms it: x / (1 + exp(-x)). IEEE division (no
// fast-math) keeps the rounding of the fp32 value close enough that dtype rounding agrees. Shared
// by swiglu.cu and the fused swiglu + down projection in gemv.cu, so both round identically.
__device__ __forceinline__ float silu_f32(float g) { return __fdiv_rn(g, 1.f + expf(-g)); }

// One SwiGLU element as reference.swiglu rounds it: round(round(silu(g)) * u), returned as fp32
// (exactly representable in T). The product of two T values is exact in fp32, so the only
// roundings are the two to T.
template <typename T>
__device__ __forceinline__ float swiglu_rounded(float g, float u) {
  return round_to<T>(round_to<T>(silu_f32(g)) * u);
}

// ----------------------------------------------------------------------------- PDL

// Programmatic dependent launch (Hopper+). Every kernel is launched with launch_kernel() below,
// which (unless CUSTOM_KERNELS_PDL=0) lets it start while the previous kernel of the stream is
// still running. Rules every kernel in this library follows:
//   * pdl_wait() (griddepcontrol.wait) runs in EVERY thread before that thread's first read of
//     memory another kernel may write (activations, caches, positions, workspaces) and before its
//     first global write (the previous kernel may still read what we are about to overwrite).
//     It returns once the previous kernel has completed and its writes are visible. Because every
//     kernel waits before it completes, completion is transitive down the stream.
//   * Only launch-constant data (weights, norm weights, RoPE tables) may be read before pdl_wait().
//     Contract for callers: such data must not be written by the kernel launched immediately
//     before on the same stream (it may still be running, or not yet flushed). Weights are written
//     once at load time, so in the model this always holds.
//   * pdl_trigger() (griddepcontrol.launch_dependents) runs right after pdl_wait(). It only lets
//     the NEXT kernel be scheduled early (so its blocks can get resident and prefetch weights while
//     this one streams); it carries no memory visibility, which is why the next kernel waits.
//     Triggering after our own wait bounds the overlap to two kernels in flight.
// Both instructions are no-ops when the kernel was launched without the PDL attribute (or its
// predecessor was not a kernel, or was a non-PDL kernel such as cuBLAS), so the kernels stay
// correct in every launch mode, eager or captured.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The usual prologue: wait for the previous kernel, then let the next one be scheduled.
__device__ __forceinline__ void pdl_begin() {
  pdl_wait();
  pdl_trigger();
}

// The one launch path of every kernel: cudaLaunchKernelEx with the programmatic-stream-
// serialization attribute when pdl_enabled() (launchers.h; CUSTOM_KERNELS_PDL, read once at library
// load). Legal inside CUDA-graph capture (captured as a programmatic edge, CUDA >= 12.3). Returns
// the launch error; a failed launch's error is also consumed from the runtime's last-error slot, so
// it is reported exactly once (by the launcher's return value).
template <typename... KArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                          cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = pdl_enabled() ? attr : nullptr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, static_cast<Args&&>(args)...);
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err;
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

// Launches through launch_kernel(kernel, grid, block, smem, stream, args...) and returns its error
// from the enclosing launcher if it failed.
#define CK_LAUNCH(...)                                              \
  do {                                                              \
    const cudaError_t ck_lerr_ = ::ck::launch_kernel(__VA_ARGS__);  \
    if (ck_lerr_ != cudaSuccess) return ck_lerr_;                   \
  } while (0)

// Propagates a failing CUDA runtime call out of a launcher.
#define CK_CUDA_TRY(expr)                  \
  do {                                     \
    const cudaError_t ck_err_ = (expr);    \
    if (ck_err_ != cudaSuccess) return ck_err_; \
  } while (0)
