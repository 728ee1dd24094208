// Host-side launchers of every kernel in csrc/*.cu.
//
// This header is torch-free and device-code-free so that bindings.cpp (host C++, torch) and the .cu
// files (nvcc, no torch) share it. Contract of every launcher:
//   * pointers are device pointers to contiguous row-major buffers of the documented shapes;
//   * it only enqueues work on `stream`: no allocation, no synchronization, no host read of device
//     memory, so every launch is legal inside CUDA-graph capture;
//   * lengths that change from step to step (positions) are read by the kernels from device memory;
//   * it returns cudaGetLastError() after the launch (cudaErrorInvalidValue / cudaErrorNotSupported
//     for arguments it cannot serve; bindings.cpp checks shapes before calling, with messages).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace ck {

// Whether kernels are launched with programmatic dependent launch (PDL, see common.cuh). Read once,
// when the library loads, from the environment: CUSTOM_KERNELS_PDL=0 (or false / off / no)
// disables it, anything else or unset enables it. Kernels are correct either way; the switch is
// for A/B measurements.
//
// Consequence of PDL for callers: a kernel may read its launch-constant inputs (weights, norm
// weights, RoPE tables; each launcher below says which) before the previous kernel on the stream
// has finished. Those buffers must not be written by the kernel launched immediately before.
bool pdl_enabled();

// Element type of the activations / weights / caches. FP32 is accepted only where a launcher says
// so (sampling logits); everything else is BF16 or FP16 with fp32 accumulation inside.
enum class DType : int { BF16 = 0, FP16 = 1, FP32 = 2 };

// ----------------------------------------------------------------------------- norm.cu

// out[t, :] = table[ids[t], :]. ids [T] int32 (ids_are_int64 = false) or int64; table [V, H];
// out [T, H]. Ids outside [0, V) produce a zero row (the reference raises; a kernel cannot).
cudaError_t launch_embedding(const void* ids, bool ids_are_int64, const void* table, void* out,
                             int T, int H, int64_t V, DType dt, cudaStream_t stream);

// out = rmsnorm(x) * w, rounded like reference.rmsnorm. x [T, H], w [H], out [T, H].
cudaError_t launch_rmsnorm(const void* x, const void* w, float eps, void* out, int T, int H,
                           DType dt, cudaStream_t stream);

// residual = round(residual + x); out = rmsnorm(residual) * w. x [T, H], residual [T, H] (in/out),
// w [H], out [T, H].
cudaError_t launch_add_rmsnorm(const void* x, void* residual, const void* w, float eps, void* out,
                               int T, int H, DType dt, cudaStream_t stream);

// ----------------------------------------------------------------------------- swiglu.cu

// out = round(round(silu(gate)) * up). gate_up [T, 2I] (gate columns first), out [T, I].
cudaError_t launch_swiglu(const void* gate_up, void* out, int T, int I, DType dt,
                          cudaStream_t stream);

// ----------------------------------------------------------------------------- rope.cu

// Rotates q and k (rotate_half layout), writes rotated q to q_out and k, v into the paged cache.
// qkv [T, (nq + 2 nkv) D]; positions [T] int32 (device); cos, sin [P, D/2] fp32;
// k_cache, v_cache [NB, BS, nkv, D]; q_out [T, nq, D]; block_table int32, [MB] shared by every
// token (per_token_tables = false) or [T, MB], row t being token t's table (true).
// A position < 0 is a padding token: zeros into its q_out row, no cache write.
// D even, D <= 256. A position >= P writes NaN into q_out and skips the cache; one past what the
// block table covers (or mapping to a block outside [0, NB)) skips the cache. The reference raises
// in both cases.
cudaError_t launch_rope_kv_write(const void* qkv, const int32_t* positions, const float* cos,
                                 const float* sin, void* k_cache, void* v_cache,
                                 const int32_t* block_table, bool per_token_tables, void* q_out,
                                 int T, int nq, int nkv, int D, int64_t NB, int BS, int MB, int P,
                                 DType dt, cudaStream_t stream);

// ----------------------------------------------------------------------------- attention.cu

// The grid's split count of decode attention: the split count of a row of length max_len. Row b
// itself uses the count of its own length positions[b] + 1 (<= this), so a row's result does not
// depend on B, on max_len or on the other rows (batch invariance). A pure function of
// (nkv, max_len), never of device values, so a graph captured with max_len = L serves every actual
// length 1..L. B is unused (kept for API stability).
int decode_attention_num_splits(int B, int nkv, int max_len);

// fp32 elements of workspace one launch with these sizes needs (0 when it runs unsplit).
int64_t decode_attention_workspace_needed(int B, int nq, int nkv, int D, int max_len);

// An upper bound of decode_attention_workspace_needed over every nkv dividing nq and every
// B' <= B, max_len' <= max_len: size the workspace once with the largest batch and length.
int64_t decode_attention_workspace_numel(int B, int nq, int D, int max_len);

// Flash-decoding. q [B, nq, D]; k_cache, v_cache [NB, BS, nkv, D]; block_tables [B, MB] int32;
// positions [B] int32 (row b attends to 0..positions[b]; < 0: a padding row, whose out is zeros;
// every positions[b] + 1 must be <= max_len); out [B, nq, D]; workspace fp32 of
// workspace_numel elements (may be null when decode_attention_workspace_needed(...) == 0).
// D in {64, 128, 256}; nq / nkv in 1..8; BS a power of two.
cudaError_t launch_decode_attention(const void* q, const void* k_cache, const void* v_cache,
                                    const int32_t* block_tables, const int32_t* positions,
                                    float scale, void* out, float* workspace,
                                    int64_t workspace_numel, int B, int nq, int nkv, int D, int BS,
                                    int MB, int max_len, DType dt, cudaStream_t stream);

// Causal prefill over the paged cache. q [T, nq, D]; k_cache, v_cache [NB, BS, nkv, D];
// block_table [MB] int32; out [T, nq, D]. Query t sits at position start_pos + t.
// D in {64, 128}; nq % nkv == 0; BS a power of two.
cudaError_t launch_prefill_attention(const void* q, const void* k_cache, const void* v_cache,
                                     const int32_t* block_table, int start_pos, float scale,
                                     void* out, int T, int nq, int nkv, int D, int BS, int MB,
                                     DType dt, cudaStream_t stream);

// ----------------------------------------------------------------------------- sampling.cu

// One block per row. logits [B, V] (BF16, FP16 or FP32); temperature, top_p [B] fp32;
// top_k [B] int32; seed [B] int64; positions [B] int32 (read, then incremented);
// token_in [B] int32 (out); token_hist [B, hist_len] int32 (out, at positions[b] + 1).
// A row with positions[b] < 0 is padding: nothing is written, its position stays. A temperature
// below 1e-5 (or NaN) is greedy, as in reference.sample_row. Rows are independent.
cudaError_t launch_sample(const void* logits, const float* temperature, const int32_t* top_k,
                          const float* top_p, const int64_t* seed, int32_t* positions,
                          int32_t* token_in, int32_t* token_hist, int B, int V, int hist_len,
                          DType logits_dt, cudaStream_t stream);

// ----------------------------------------------------------------------------- gemv.cu

// Largest row count of x the GEMV serves; above it linear goes to cuBLAS.
constexpr int kGemvMaxRows = 8;

// True when the GEMV can serve these sizes and pointers (T <= kGemvMaxRows, K % 8 == 0,
// 16-byte aligned x and w).
bool gemv_supported(const void* x, const void* w, int T, int K);

// out = x @ w^T. x [T, K], w [N, K], out [T, N]. Requires gemv_supported(...).
// w is launch-constant (read before the PDL wait, see pdl_enabled).
cudaError_t launch_gemv(const void* x, const void* w, void* out, int T, int N, int K, DType dt,
                        cudaStream_t stream);

// True when the fused SwiGLU + down projection can serve these sizes and pointers
// (T <= kGemvMaxRows, I % 8 == 0, 16-byte aligned gate_up and w).
bool swiglu_linear_supported(const void* gate_up, const void* w, int T, int I);

// out = swiglu(gate_up) @ w^T with swiglu rounded like reference.swiglu, i.e. exactly
// launch_swiglu then launch_gemv (bitwise: same accumulation order), without the intermediate.
// gate_up [T, 2I] (gate columns first), w [N, I], out [T, N] (must not overlap gate_up).
// Requires swiglu_linear_supported(...). w is launch-constant (read before the PDL wait).
cudaError_t launch_swiglu_linear(const void* gate_up, const void* w, void* out, int T, int N, int I,
                                 DType dt, cudaStream_t stream);

// Batch-invariant linear: out = x @ w^T for any T >= 1, token t's result bitwise independent of T
// (the GEMV's summation order depends on K only; T > kGemvMaxRows runs token groups of
// kGemvMaxRows in one launch, gemv.cu). x [T, K], w [N, K], out [T, N]. Requires
// gemv_invariant_supported(...): K % 8 == 0, 16-byte aligned x and w. Bitwise equal to launch_gemv
// for T <= kGemvMaxRows. w is launch-constant (read before the PDL wait).
bool gemv_invariant_supported(const void* x, const void* w, int T, int K);
cudaError_t launch_gemv_invariant(const void* x, const void* w, void* out, int T, int N, int K,
                                  DType dt, cudaStream_t stream);

// Batch-invariant fused SwiGLU + down projection for any T >= 1: bitwise launch_swiglu then
// launch_gemv_invariant. gate_up [T, 2I], w [N, I], out [T, N] (must not overlap gate_up).
// Requires swiglu_linear_invariant_supported(...): I % 8 == 0, 16-byte aligned gate_up and w.
bool swiglu_linear_invariant_supported(const void* gate_up, const void* w, int T, int I);
cudaError_t launch_swiglu_linear_invariant(const void* gate_up, const void* w, void* out, int T,
                                           int N, int I, DType dt, cudaStream_t stream);

}  // namespace ck
