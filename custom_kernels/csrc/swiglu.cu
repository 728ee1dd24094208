// SwiGLU: out = silu(gate) * up, rounded like reference.swiglu (silu in fp32, rounded to the dtype,
// then the product rounded to the dtype, as HF does).
#include "common.cuh"

namespace ck {
namespace {

// silu_f32 / swiglu_rounded live in common.cuh (shared with the fused swiglu_linear in gemv.cu).
// gate_up is written by the previous kernel: plain loads after the PDL wait.

// Vector path: I % 8 == 0 and 16-byte aligned rows. One thread per 8 outputs, grid-stride.
template <typename T>
__global__ void swiglu_vec_kernel(const T* gate_up,  // [T, 2I]
                                  T* out,            // [T, I]
                                  int64_t rows, int I) {
  pdl_begin();
  const int vpr = I / 8;  // vectors per output row
  const int64_t total = rows * vpr;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / vpr;
    const int c = static_cast<int>(idx - t * vpr) * 8;
    const T* row = gate_up + t * 2 * I;
    float g[8], u[8], o[8];
    load8c<T>(row + c, g);
    load8c<T>(row + I + c, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) o[i] = swiglu_rounded<T>(g[i], u[i]);
    store8<T>(out + t * I + c, o);
  }
}

template <typename T>
__global__ void swiglu_scalar_kernel(const T* gate_up,  // [T, 2I]
                                     T* out,            // [T, I]
                                     int64_t rows, int I) {
  pdl_begin();
  const int64_t total = rows * I;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / I;
    const int c = static_cast<int>(idx - t * I);
    const T* row = gate_up + t * 2 * I;
    const float o = swiglu_rounded<T>(Elem<T>::to_float(row[c]), Elem<T>::to_float(row[I + c]));
    out[idx] = Elem<T>::from_float(o);
  }
}

}  // namespace

cudaError_t launch_swiglu(const void* gate_up, void* out, int T, int I, DType dt,
                          cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (T < 0 || I <= 0) return cudaErrorInvalidValue;
  const bool vec = I % 8 == 0 && aligned16(gate_up) && aligned16(out);
  const int threads = 256;
  const int64_t work = static_cast<int64_t>(T) * (vec ? I / 8 : I);
  // Enough blocks to fill the GPU a few times over; the grid-stride loop covers the rest.
  const int blocks = static_cast<int>(work / threads + 1 < 4096 ? work / threads + 1 : 4096);
  CK_DISPATCH_HALF(dt, E, {
    const E* gp = static_cast<const E*>(gate_up);
    E* op = static_cast<E*>(out);
    if (vec) CK_LAUNCH(swiglu_vec_kernel<E>, dim3(blocks), dim3(threads), 0, stream, gp, op, T, I);
    else CK_LAUNCH(swiglu_scalar_kernel<E>, dim3(blocks), dim3(threads), 0, stream, gp, op, T, I);
  });
  CK_RETURN_LAUNCH_STATUS();
}

}  // namespace ck
