// The one place that registers the ops (torch.ops.custom_kernels.*) and the only file that
// includes torch headers. Each op checks every input (device, dtype, contiguity, shapes) with a
// message naming the argument, takes the current CUDA stream of the output's device, calls the
// launcher from launchers.h and turns a failing cudaError_t into an exception.
//
// Also the cuBLAS half of `linear` (x with more rows than the GEMV serves): one cublasHandle_t per
// (device, stream), created only by bind_gemm_stream() (creating a handle allocates, which is
// illegal during CUDA-graph capture), each with the caller's preallocated workspace.
#include <Python.h>  // first, as Python asks: the module init below

#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "launchers.h"

namespace {

using at::Tensor;

// ----------------------------------------------------------------------------- checks

void check_cuda(const Tensor& t, const char* op, const char* name, const c10::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the op runs on ",
              device);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (sizes ", t.sizes(),
              ", strides ", t.strides(), ")");
}

void check_dtype(const Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

void check_dim(const Tensor& t, const char* op, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", shape, ", got sizes ", t.sizes());
}

ck::DType half_dtype(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kBFloat16:
      return ck::DType::BF16;
    case at::kHalf:
      return ck::DType::FP16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be bfloat16 or float16, got ", t.scalar_type());
  }
  return ck::DType::BF16;  // unreachable
}

int to_int(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v >= 0 && v <= INT_MAX, op, ": ", what, " = ", v, " is out of the supported range");
  return static_cast<int>(v);
}

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// The sizes of t without its last dimension (the "rows" of a row-major [..., H] tensor).
std::vector<int64_t> leading(const Tensor& t) {
  return std::vector<int64_t>(t.sizes().begin(), t.sizes().end() - 1);
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorName(err), " (",
              cudaGetErrorString(err), ")");
}

cudaStream_t current_stream(const c10::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

// ----------------------------------------------------------------------------- cuBLAS handles

struct GemmBinding {
  cublasHandle_t handle = nullptr;
  Tensor workspace;
};

std::mutex& gemm_mutex() {
  static std::mutex mu;
  return mu;
}

// Leaked on purpose: handles and workspaces must outlive static destruction at interpreter exit.
std::map<std::pair<int, cudaStream_t>, GemmBinding>& gemm_bindings() {
  static auto* bindings = new std::map<std::pair<int, cudaStream_t>, GemmBinding>();
  return *bindings;
}

// Workspaces replaced by a later bind stay alive: graphs captured before still point at them.
std::vector<Tensor>& retired_workspaces() {
  static auto* retired = new std::vector<Tensor>();
  return *retired;
}

void check_cublas(cublasStatus_t st, const char* what) {
  TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, what, " failed: ", cublasGetStatusString(st));
}

void bind_gemm_stream(const Tensor& workspace) {
  const char* op = "bind_gemm_stream";
  TORCH_CHECK(workspace.defined() && workspace.is_cuda(), op,
              ": workspace must be a CUDA tensor (a preallocated uint8 buffer)");
  check_cuda(workspace, op, "workspace", workspace.device());
  check_dtype(workspace, op, "workspace", at::kByte);
  TORCH_CHECK(workspace.numel() > 0, op, ": workspace must not be empty");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(workspace.data_ptr()) % 256 == 0, op,
              ": workspace must be 256-byte aligned (cuBLAS requires it); pass a fresh "
              "allocation, not an offset view");
  const c10::Device device = workspace.device();
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);

  std::lock_guard<std::mutex> lock(gemm_mutex());
  auto& bindings = gemm_bindings();
  const auto key = std::make_pair(static_cast<int>(device.index()), stream);
  auto it = bindings.find(key);
  if (it == bindings.end()) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    TORCH_CHECK(cudaStreamIsCapturing(stream, &capture) == cudaSuccess, op,
                ": cudaStreamIsCapturing failed");
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone, op,
                ": the current stream is being captured; creating a cuBLAS handle allocates, which "
                "capture forbids. Call bind_gemm_stream on this stream before capturing.");
    GemmBinding binding;
    check_cublas(cublasCreate(&binding.handle), "cublasCreate");
    it = bindings.emplace(key, std::move(binding)).first;
  } else if (it->second.workspace.data_ptr() != workspace.data_ptr()) {
    retired_workspaces().push_back(it->second.workspace);
  }
  GemmBinding& b = it->second;
  b.workspace = workspace;
  // SetStream first: it resets the handle's workspace to cuBLAS's own pool.
  check_cublas(cublasSetStream(b.handle, stream), "cublasSetStream");
  check_cublas(cublasSetWorkspace(b.handle, workspace.data_ptr(),
                                  static_cast<size_t>(workspace.numel())),
               "cublasSetWorkspace");
  // Split-K reductions in fp32 too (fp32 accumulation throughout, as the kernels do).
  check_cublas(cublasSetMathMode(b.handle, static_cast<cublasMath_t>(
                                               CUBLAS_DEFAULT_MATH |
                                               CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)),
               "cublasSetMathMode");
}

// out [T, N] = x [T, K] @ w [N, K]^T through the bound handle. Row-major out is column-major
// out^T [N, T] = (w as column-major [K, N])^T @ (x as column-major [K, T]).
void cublas_linear(const Tensor& x, const Tensor& w, Tensor& out, int T, int N, int K,
                   ck::DType dt, const c10::Device& device, cudaStream_t stream) {
  cublasHandle_t handle = nullptr;
  {
    std::lock_guard<std::mutex> lock(gemm_mutex());
    auto& bindings = gemm_bindings();
    auto it = bindings.find(std::make_pair(static_cast<int>(device.index()), stream));
    TORCH_CHECK(it != bindings.end(),
                "linear: no cuBLAS handle is bound to the current CUDA stream of ", device,
                ". Call custom_kernels.ops.bind_gemm_stream(workspace) on this stream first (with "
                "a preallocated uint8 CUDA tensor, before any graph capture: creating a handle "
                "during capture is illegal).");
    handle = it->second.handle;
  }
  const cudaDataType_t type = dt == ck::DType::BF16 ? CUDA_R_16BF : CUDA_R_16F;
  const float alpha = 1.f, beta = 0.f;
  check_cublas(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &alpha, w.data_ptr(), type,
                            K, x.data_ptr(), type, K, &beta, out.data_ptr(), type, N,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "linear: cublasGemmEx");
}

// ----------------------------------------------------------------------------- ops

void embedding(const Tensor& ids, const Tensor& table, Tensor& out) {
  const char* op = "embedding";
  const c10::Device device = out.device();
  check_cuda(out, op, "out", device);
  check_cuda(ids, op, "ids", device);
  check_cuda(table, op, "table", device);
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong, op,
              ": ids must be int32 or int64, got ", ids.scalar_type());
  check_dim(table, op, "table", 2, "[V, H]");
  const ck::DType dt = half_dtype(table, op, "table");
  check_dtype(out, op, "out", table.scalar_type());
  std::vector<int64_t> want(ids.sizes().begin(), ids.sizes().end());
  want.push_back(table.size(1));
  TORCH_CHECK(out.sizes() == at::IntArrayRef(want), op, ": out must be ids.shape + [H] = ",
              at::IntArrayRef(want), ", got ", out.sizes());
  c10::cuda::CUDAGuard guard(device);
  check_launch(ck::launch_embedding(ids.data_ptr(), ids.scalar_type() == at::kLong,
                                    table.data_ptr(), out.data_ptr(),
                                    to_int(ids.numel(), op, "number of ids"),
                                    to_int(table.size(1), op, "H"), table.size(0), dt,
                                    current_stream(device)),
               op);
}

// The checks rmsnorm and add_rmsnorm share: x, out [..., H] and weight [H], one half dtype, one
// device. Returns the dtype and (rows, H).
struct NormSizes {
  ck::DType dt;
  int rows, H;
};

NormSizes check_norm(const Tensor& x, const Tensor& weight, const Tensor& out, const char* op) {
  const c10::Device device = out.device();
  check_cuda(out, op, "out", device);
  check_cuda(x, op, "x", device);
  check_cuda(weight, op, "weight", device);
  TORCH_CHECK(x.dim() >= 1, op, ": x must be [..., H]");
  const ck::DType dt = half_dtype(x, op, "x");
  check_dtype(weight, op, "weight", x.scalar_type());
  check_dtype(out, op, "out", x.scalar_type());
  const int64_t H = x.size(-1);
  TORCH_CHECK(H > 0, op, ": hidden size must be > 0");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H, op, ": weight must be [H] = [", H,
              "], got ", weight.sizes());
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": out must have x's sizes ", x.sizes(), ", got ",
              out.sizes());
  return {dt, to_int(x.numel() / H, op, "rows"), to_int(H, op, "H")};
}

void rmsnorm(const Tensor& x, const Tensor& weight, double eps, Tensor& out) {
  const char* op = "rmsnorm";
  const auto [dt, rows, H] = check_norm(x, weight, out, op);
  const c10::Device device = out.device();
  c10::cuda::CUDAGuard guard(device);
  check_launch(ck::launch_rmsnorm(x.data_ptr(), weight.data_ptr(), static_cast<float>(eps),
                                  out.data_ptr(), rows, H, dt, current_stream(device)),
               op);
}

void add_rmsnorm(const Tensor& x, Tensor& residual, const Tensor& weight, double eps,
                 Tensor& out) {
  const char* op = "add_rmsnorm";
  const auto [dt, rows, H] = check_norm(x, weight, out, op);
  const c10::Device device = out.device();
  check_cuda(residual, op, "residual", device);
  check_dtype(residual, op, "residual", x.scalar_type());
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual must have x's sizes ", x.sizes(),
              ", got ", residual.sizes());
  TORCH_CHECK(out.data_ptr() != residual.data_ptr() || out.numel() == 0, op,
              ": out must not alias residual");
  c10::cuda::CUDAGuard guard(device);
  check_launch(ck::launch_add_rmsnorm(x.data_ptr(), residual.data_ptr(), weight.data_ptr(),
                                      static_cast<float>(eps), out.data_ptr(), rows, H, dt,
                                      current_stream(device)),
               op);
}

// Whether the bytes of two tensors overlap (a blocked kernel may not write what others still read).
bool overlaps(const Tensor& a, const Tensor& b) {
  const auto* a0 = static_cast<const char*>(a.data_ptr());
  const auto* a1 = a0 + a.numel() * a.element_size();
  const auto* b0 = static_cast<const char*>(b.data_ptr());
  const auto* b1 = b0 + b.numel() * b.element_size();
  return a.numel() > 0 && b.numel() > 0 && a0 < b1 && b0 < a1;
}

// The checks linear and swiglu_linear share: out[..., N] = f(x[..., k_mult * K]) @ weight[N, K]^T,
// all one half dtype on one device. Returns the sizes as launcher ints (T = rows of x).
struct RowsTimesWeight {
  ck::DType dt;
  int T, N, K;
};

RowsTimesWeight check_rows_times_weight(const Tensor& x, const Tensor& weight, const Tensor& out,
                                        const char* op, const char* x_name, const char* x_shape,
                                        int64_t k_mult) {
  const c10::Device device = out.device();
  check_cuda(out, op, "out", device);
  check_cuda(x, op, x_name, device);
  check_cuda(weight, op, "weight", device);
  TORCH_CHECK(x.dim() >= 1, op, ": ", x_name, " must be ", x_shape);
  check_dim(weight, op, "weight", 2, "[N, K]");
  const ck::DType dt = half_dtype(x, op, x_name);
  check_dtype(weight, op, "weight", x.scalar_type());
  check_dtype(out, op, "out", x.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(K > 0, op, ": weight.shape[1] must be > 0, got weight ", weight.sizes());
  TORCH_CHECK(x.size(-1) == k_mult * K, op, ": ", x_name, " must be ", x_shape, " with ",
              x_name, ".shape[-1] = ", k_mult, " * weight.shape[1] = ", k_mult * K, ", got ",
              x_name, " ", x.sizes(), " and weight ", weight.sizes());
  std::vector<int64_t> want = leading(x);
  want.push_back(N);
  TORCH_CHECK(out.sizes() == at::IntArrayRef(want), op, ": out must be ", x_name,
              ".shape[:-1] + [N] = ", at::IntArrayRef(want), ", got ", out.sizes());
  return {dt, to_int(x.numel() / x.size(-1), op, "rows"), to_int(N, op, "N"),
          to_int(K, op, "K")};
}

void linear(const Tensor& x, const Tensor& weight, Tensor& out) {
  const char* op = "linear";
  const auto [dt, T, Ni, Ki] = check_rows_times_weight(x, weight, out, op, "x", "[T, K]", 1);
  if (T == 0 || Ni == 0) return;
  const c10::Device device = out.device();
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  if (ck::gemv_supported(x.data_ptr(), weight.data_ptr(), T, Ki)) {
    check_launch(ck::launch_gemv(x.data_ptr(), weight.data_ptr(), out.data_ptr(), T, Ni, Ki, dt,
                                 stream),
                 op);
  } else {
    cublas_linear(x, weight, out, T, Ni, Ki, dt, device, stream);
  }
}

void swiglu(const Tensor& gate_up, Tensor& out) {
  const char* op = "swiglu";
  const c10::Device device = out.device();
  check_cuda(out, op, "out", device);
  check_cuda(gate_up, op, "gate_up", device);
  TORCH_CHECK(gate_up.dim() >= 1, op, ": gate_up must be [T, 2I]");
  const ck::DType dt = half_dtype(gate_up, op, "gate_up");
  check_dtype(out, op, "out", gate_up.scalar_type());
  const int64_t I = out.size(-1);
  std::vector<int64_t> want = leading(gate_up);
  want.push_back(gate_up.size(-1) / 2);
  TORCH_CHECK(gate_up.size(-1) % 2 == 0 && out.sizes() == at::IntArrayRef(want), op,
              ": gate_up must be [T, 2I] and out [T, I]; got gate_up ", gate_up.sizes(), ", out ",
              out.sizes());
  if (I == 0) return;
  c10::cuda::CUDAGuard guard(device);
  check_launch(ck::launch_swiglu(gate_up.data_ptr(), out.data_ptr(),
                                 to_int(out.numel() / I, op, "rows"), to_int(I, op, "I"), dt,
                                 current_stream(device)),
               op);
}

// Fused SwiGLU + down projection for decode sizes (the GEMV's T <= 8): out = swiglu(gate_up) @ w^T,
// bitwise equal to swiglu() then linear() on the GEMV path. ops.swiglu_linear routes every other
// case (more rows, I % 8 != 0, unaligned views) to swiglu + linear itself, so this op refuses them.
void swiglu_linear(const Tensor& gate_up, const Tensor& weight, Tensor& out) {
  const char* op = "swiglu_linear";
  const auto [dt, T, Ni, Ii] =
      check_rows_times_weight(gate_up, weight, out, op, "gate_up", "[T, 2I]", 2);
  if (T == 0 || Ni == 0) return;
  const c10::Device device = out.device();
  // Blocks write out while others still read gate_up: the two must not overlap.
  TORCH_CHECK(!overlaps(out, gate_up), op, ": out must not overlap gate_up");
  TORCH_CHECK(ck::swiglu_linear_supported(gate_up.data_ptr(), weight.data_ptr(), T, Ii), op,
              ": the fused kernel serves T <= ", ck::kGemvMaxRows,
              " rows, I % 8 == 0 and 16-byte aligned gate_up and weight; got T = ", T, ", I = ", Ii,
              ". Use custom_kernels.ops.swiglu_linear, which falls back to swiglu + linear.");
  c10::cuda::CUDAGuard guard(device);
  check_launch(ck::launch_swiglu_linear(gate_up.data_ptr(), weight.data_ptr(), out.data_ptr(), T,
                                        Ni, Ii, dt, current_stream(device)),
               op);
}

// Batch-invariant linear (the batched decode engine): one GEMV launch for any T, token t's result
// bitwise independent of T. No cuBLAS fallback (its kernel choice depends on T), so it refuses
// what the GEMV cannot serve.
void linear_invariant(const Tensor& x, const Tensor& weight, Tensor& out) {
  const char* op = "linear_invariant";
  const auto [dt, T, Ni, Ki] = check_rows_times_weight(x, weight, out, op, "x", "[T, K]", 1);
  if (T == 0 || Ni == 0) return;
  TORCH_CHECK(ck::gemv_invariant_supported(x.data_ptr(), weight.data_ptr(), T, Ki), op,
              ": needs K % 8 == 0 and 16-byte aligned x and weight; got K = ", Ki,
              (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 ? ", x misaligned" : ""),
              (reinterpret_cast<uintptr_t>(weight.data_ptr()) % 16 ? ", weight misaligned" : ""));
  const c10::Device device = out.device();
  c10::cuda::CUDAGuard guard(device);
  check_launch(ck::launch_gemv_invariant(x.data_ptr(), weight.data_ptr(), out.data_ptr(), T, Ni,
                                         Ki, dt, current_stream(device)),
               op);
}

// Batch-invariant fused SwiGLU + down projection for any T (bitwise swiglu + linear_invariant).
void swiglu_linear_invariant(const Tensor& gate_up, const Tensor& weight, Tensor& out) {
  const char* op = "swiglu_linear_invariant";
  const auto [dt, T, Ni, Ii] =
      check_rows_times_weight(gate_up, weight, out, op, "gate_up", "[T, 2I]", 2);
  if (T == 0 || Ni == 0) return;
  TORCH_CHECK(!overlaps(out, gate_up), op, ": out must not overlap gate_up");
  TORCH_CHECK(ck::swiglu_linear_invariant_supported(gate_up.data_ptr(), weight.data_ptr(), T, Ii),
              op, ": the fused kernel serves I % 8 == 0 and 16-byte aligned gate_up and weight; "
              "got I = ", Ii,
              ". Use custom_kernels.ops.swiglu_linear_invariant, which falls back to swiglu + "
              "linear_invariant.");
  const c10::Device device = out.device();
  c10::cuda::CUDAGuard guard(device);
  check_launch(ck::launch_swiglu_linear_invariant(gate_up.data_ptr(), weight.data_ptr(),
                                                  out.data_ptr(), T, Ni, Ii, dt,
                                                  current_stream(device)),
               op);
}

// Whether the kernels launch with programmatic dependent launch (CUSTOM_KERNELS_PDL, read once
// when the library loaded).
bool pdl_enabled() { return ck::pdl_enabled(); }

// Common checks of a paged cache pair; returns (NB, BS, nkv, D).
std::vector<int64_t> check_caches(const Tensor& k_cache, const Tensor& v_cache, const Tensor& ref,
                                  const char* op, const c10::Device& device) {
  check_cuda(k_cache, op, "k_cache", device);
  check_cuda(v_cache, op, "v_cache", device);
  check_dim(k_cache, op, "k_cache", 4, "[NB, BS, nkv, D]");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have k_cache's sizes ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  check_dtype(k_cache, op, "k_cache", ref.scalar_type());
  check_dtype(v_cache, op, "v_cache", ref.scalar_type());
  TORCH_CHECK(is_pow2(k_cache.size(1)), op, ": the block size (k_cache.shape[1] = ",
              k_cache.size(1), ") must be a power of two");
  return {k_cache.size(0), k_cache.size(1), k_cache.size(2), k_cache.size(3)};
}

// The checks decode and prefill attention share: q and out [rows, nq, D] of one half dtype on the
// cache's device, D the cache's head_dim.
struct PagedQuery {
  ck::DType dt;
  int64_t rows, nq, nkv, D, BS;
};

PagedQuery check_paged_query(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                             const Tensor& out, const char* op, const char* q_shape) {
  const c10::Device device = out.device();
  check_cuda(out, op, "out", device);
  check_cuda(q, op, "q", device);
  const ck::DType dt = half_dtype(q, op, "q");
  check_dtype(out, op, "out", q.scalar_type());
  const auto c = check_caches(k_cache, v_cache, q, op, device);
  check_dim(q, op, "q", 3, q_shape);
  const int64_t D = c[3];
  TORCH_CHECK(q.size(2) == D, op, ": q head_dim ", q.size(2), " differs from the cache's ", D);
  TORCH_CHECK(out.sizes() == q.sizes(), op, ": out must have q's sizes ", q.sizes(), ", got ",
              out.sizes());
  return {dt, q.size(0), q.size(1), c[2], D, c[1]};
}

void rope_kv_write(const Tensor& qkv, const Tensor& positions, const Tensor& cos,
                   const Tensor& sin, Tensor& k_cache, Tensor& v_cache, const Tensor& block_table,
                   Tensor& q_out) {
  const char* op = "rope_kv_write";
  const c10::Device device = q_out.device();
  check_cuda(q_out, op, "q_out", device);
  check_cuda(qkv, op, "qkv", device);
  check_cuda(positions, op, "positions", device);
  check_cuda(cos, op, "cos", device);
  check_cuda(sin, op, "sin", device);
  check_cuda(block_table, op, "block_table", device);
  const ck::DType dt = half_dtype(qkv, op, "qkv");
  check_dtype(q_out, op, "q_out", qkv.scalar_type());
  const auto c = check_caches(k_cache, v_cache, qkv, op, device);
  const int64_t NB = c[0], BS = c[1], nkv = c[2], D = c[3];
  check_dim(q_out, op, "q_out", 3, "[T, nq, D]");
  const int64_t T = q_out.size(0), nq = q_out.size(1);
  TORCH_CHECK(q_out.size(2) == D, op, ": q_out head_dim ", q_out.size(2),
              " differs from the cache's ", D);
  TORCH_CHECK(D % 2 == 0 && D <= 256, op, ": head_dim must be even and <= 256, got ", D);
  check_dim(qkv, op, "qkv", 2, "[T, (nq + 2 nkv) D]");
  TORCH_CHECK(qkv.size(0) == T && qkv.size(1) == (nq + 2 * nkv) * D, op,
              ": qkv must be [T, (nq + 2 nkv) D] = [", T, ", ", (nq + 2 * nkv) * D, "], got ",
              qkv.sizes());
  check_dtype(positions, op, "positions", at::kInt);
  check_dim(positions, op, "positions", 1, "[T]");
  TORCH_CHECK(positions.size(0) == T, op, ": positions must be [T] = [", T, "], got ",
              positions.sizes());
  check_dtype(cos, op, "cos", at::kFloat);
  check_dtype(sin, op, "sin", at::kFloat);
  check_dim(cos, op, "cos", 2, "[P, D/2]");
  TORCH_CHECK(cos.size(1) == D / 2 && sin.sizes() == cos.sizes(), op,
              ": cos and sin must both be [P, D/2] with D/2 = ", D / 2, "; got cos ", cos.sizes(),
              ", sin ", sin.sizes());
  check_dtype(block_table, op, "block_table", at::kInt);
  // [MB]: one sequence's table for every token; [T, MB]: token t's table in row t.
  TORCH_CHECK(block_table.dim() == 1 || (block_table.dim() == 2 && block_table.size(0) == T), op,
              ": block_table must be [MB] (one sequence) or [T, MB] with T = ", T,
              " (one table row per token), got sizes ", block_table.sizes());
  const int64_t MB = block_table.size(-1);
  TORCH_CHECK(MB > 0, op, ": block_table must have MB > 0 entries per row, got sizes ",
              block_table.sizes());
  if (T == 0) return;
  c10::cuda::CUDAGuard guard(device);
  check_launch(ck::launch_rope_kv_write(
                   qkv.data_ptr(), positions.data_ptr<int32_t>(), cos.data_ptr<float>(),
                   sin.data_ptr<float>(), k_cache.data_ptr(), v_cache.data_ptr(),
                   block_table.data_ptr<int32_t>(), block_table.dim() == 2, q_out.data_ptr(),
                   to_int(T, op, "T"), to_int(nq, op, "nq"), to_int(nkv, op, "nkv"),
                   to_int(D, op, "D"), NB, to_int(BS, op, "BS"), to_int(MB, op, "MB"),
                   to_int(cos.size(0), op, "P"), dt, current_stream(device)),
               op);
}

void decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                      const Tensor& block_tables, const Tensor& positions, double scale,
                      Tensor& out, const std::optional<Tensor>& workspace, int64_t max_len) {
  const char* op = "decode_attention";
  const c10::Device device = out.device();
  const auto [dt, B, nq, nkv, D, BS] =
      check_paged_query(q, k_cache, v_cache, out, op, "[B, nq, D]");
  check_cuda(block_tables, op, "block_tables", device);
  check_cuda(positions, op, "positions", device);
  TORCH_CHECK(D == 64 || D == 128 || D == 256, op, ": head_dim must be 64, 128 or 256, got ", D);
  TORCH_CHECK(nkv > 0 && nq % nkv == 0 && nq / nkv >= 1 && nq / nkv <= 8, op,
              ": nq / nkv must be an integer group size in 1..8; got nq = ", nq, ", nkv = ", nkv);
  check_dtype(block_tables, op, "block_tables", at::kInt);
  check_dim(block_tables, op, "block_tables", 2, "[B, MB]");
  TORCH_CHECK(block_tables.size(0) == B && block_tables.size(1) > 0, op,
              ": block_tables must be [B, MB] with B = ", B, ", got ", block_tables.sizes());
  check_dtype(positions, op, "positions", at::kInt);
  check_dim(positions, op, "positions", 1, "[B]");
  TORCH_CHECK(positions.size(0) == B, op, ": positions must be [B] = [", B, "], got ",
              positions.sizes());
  TORCH_CHECK(max_len > 0, op,
              ": max_len must be > 0: the longest length (positions[b] + 1) this launch must "
              "serve; it fixes the split count, and the workspace must hold "
              "attention_workspace_numel(B, nq, D, max_len) fp32 elements");
  const int Bi = to_int(B, op, "B"), nqi = to_int(nq, op, "nq"), nkvi = to_int(nkv, op, "nkv");
  const int Di = to_int(D, op, "D"), Li = to_int(max_len, op, "max_len");
  const int64_t needed = ck::decode_attention_workspace_needed(Bi, nqi, nkvi, Di, Li);
  float* ws = nullptr;
  int64_t ws_numel = 0;
  if (workspace.has_value() && workspace->defined()) {
    check_cuda(*workspace, op, "workspace", device);
    check_dtype(*workspace, op, "workspace", at::kFloat);
    ws = workspace->data_ptr<float>();
    ws_numel = workspace->numel();
  }
  TORCH_CHECK(ws_numel >= needed, op, ": this launch (B = ", B, ", nq = ", nq, ", nkv = ", nkv,
              ", D = ", D, ", max_len = ", max_len, ") needs a float32 workspace of at least ",
              needed, " elements, got ", (ws ? ws_numel : 0),
              (ws ? "" : " (none)"), "; allocate attention_workspace_numel(B, nq, D, max_len) = ",
              ck::decode_attention_workspace_numel(Bi, nqi, Di, Li), " elements once");
  if (B == 0) return;
  c10::cuda::CUDAGuard guard(device);
  check_launch(ck::launch_decode_attention(
                   q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                   block_tables.data_ptr<int32_t>(), positions.data_ptr<int32_t>(),
                   static_cast<float>(scale), out.data_ptr(), ws, ws_numel, Bi, nqi, nkvi, Di,
                   to_int(BS, op, "BS"), to_int(block_tables.size(1), op, "MB"), Li, dt,
                   current_stream(device)),
               op);
}

// num_kv_heads = 0: a bound over every kv head count the kernel serves (nq / nkv <= 8); > 0: the
// exact need of that head count (smaller for models with many kv heads).
int64_t attention_workspace_numel(int64_t batch, int64_t num_q_heads, int64_t head_dim,
                                  int64_t max_len, int64_t num_kv_heads) {
  const char* op = "attention_workspace_numel";
  TORCH_CHECK(batch > 0 && num_q_heads > 0 && head_dim > 0 && max_len > 0, op,
              ": every argument must be > 0; got batch = ", batch, ", num_q_heads = ", num_q_heads,
              ", head_dim = ", head_dim, ", max_len = ", max_len);
  TORCH_CHECK(num_kv_heads >= 0 && (num_kv_heads == 0 || num_q_heads % num_kv_heads == 0), op,
              ": num_kv_heads must be 0 (any) or divide num_q_heads = ", num_q_heads, ", got ",
              num_kv_heads);
  const int Bi = to_int(batch, op, "batch"), nqi = to_int(num_q_heads, op, "num_q_heads");
  const int Di = to_int(head_dim, op, "head_dim"), Li = to_int(max_len, op, "max_len");
  if (num_kv_heads > 0) {
    return ck::decode_attention_workspace_needed(Bi, nqi, to_int(num_kv_heads, op, "num_kv_heads"),
                                                 Di, Li);
  }
  return ck::decode_attention_workspace_numel(Bi, nqi, Di, Li);
}

// The grid's split count. `batch` is unused by the kernels' sizing (a row's split count depends
// on its own length only: batch invariance); it stays in the signature for API stability.
int64_t decode_attention_splits(int64_t batch, int64_t num_kv_heads, int64_t max_len) {
  const char* op = "decode_attention_splits";
  TORCH_CHECK(batch > 0 && num_kv_heads > 0 && max_len > 0, op,
              ": every argument must be > 0; got batch = ", batch, ", num_kv_heads = ",
              num_kv_heads, ", max_len = ", max_len);
  return ck::decode_attention_num_splits(to_int(batch, op, "batch"),
                                         to_int(num_kv_heads, op, "num_kv_heads"),
                                         to_int(max_len, op, "max_len"));
}

void prefill_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       const Tensor& block_table, int64_t start_pos, double scale, Tensor& out) {
  const char* op = "prefill_attention";
  const c10::Device device = out.device();
  const auto [dt, T, nq, nkv, D, BS] =
      check_paged_query(q, k_cache, v_cache, out, op, "[T, nq, D]");
  check_cuda(block_table, op, "block_table", device);
  TORCH_CHECK(D == 64 || D == 128, op, ": head_dim must be 64 or 128, got ", D);
  TORCH_CHECK(nkv > 0 && nq % nkv == 0, op, ": nq (", nq, ") must be a multiple of nkv (", nkv,
              ")");
  check_dtype(block_table, op, "block_table", at::kInt);
  check_dim(block_table, op, "block_table", 1, "[MB]");
  TORCH_CHECK(start_pos >= 0, op, ": start_pos must be >= 0, got ", start_pos);
  TORCH_CHECK(start_pos + T <= block_table.size(0) * BS, op, ": start_pos + T = ", start_pos + T,
              " exceeds what the block table covers (MB * BS = ", block_table.size(0) * BS, ")");
  if (T == 0) return;
  c10::cuda::CUDAGuard guard(device);
  check_launch(ck::launch_prefill_attention(
                   q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                   block_table.data_ptr<int32_t>(), to_int(start_pos, op, "start_pos"),
                   static_cast<float>(scale), out.data_ptr(), to_int(T, op, "T"),
                   to_int(nq, op, "nq"), to_int(nkv, op, "nkv"), to_int(D, op, "D"),
                   to_int(BS, op, "BS"), to_int(block_table.size(0), op, "MB"), dt,
                   current_stream(device)),
               op);
}

void sample(const Tensor& logits, const Tensor& temperature, const Tensor& top_k,
            const Tensor& top_p, const Tensor& seed, Tensor& positions, Tensor& token_in,
            Tensor& token_hist) {
  const char* op = "sample";
  const c10::Device device = logits.device();
  check_cuda(logits, op, "logits", device);
  check_dim(logits, op, "logits", 2, "[B, V]");
  ck::DType dt;
  switch (logits.scalar_type()) {
    case at::kBFloat16: dt = ck::DType::BF16; break;
    case at::kHalf: dt = ck::DType::FP16; break;
    case at::kFloat: dt = ck::DType::FP32; break;
    default:
      TORCH_CHECK(false, op, ": logits must be bfloat16, float16 or float32, got ",
                  logits.scalar_type());
  }
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0, op, ": logits must have V > 0 columns");
  struct Vec1 {
    const Tensor& t;
    const char* name;
    at::ScalarType dtype;
  };
  for (const Vec1& a : {Vec1{temperature, "temperature", at::kFloat}, Vec1{top_k, "top_k", at::kInt},
                        Vec1{top_p, "top_p", at::kFloat}, Vec1{seed, "seed", at::kLong},
                        Vec1{positions, "positions", at::kInt},
                        Vec1{token_in, "token_in", at::kInt}}) {
    check_cuda(a.t, op, a.name, device);
    check_dtype(a.t, op, a.name, a.dtype);
    TORCH_CHECK(a.t.dim() == 1 && a.t.size(0) == B, op, ": ", a.name, " must be [B] = [", B,
                "], got ", a.t.sizes());
  }
  check_cuda(token_hist, op, "token_hist", device);
  check_dtype(token_hist, op, "token_hist", at::kInt);
  TORCH_CHECK(token_hist.dim() == 2 && token_hist.size(0) == B && token_hist.size(1) > 0, op,
              ": token_hist must be [B, MAXLEN] with B = ", B, ", got ", token_hist.sizes());
  if (B == 0) return;
  c10::cuda::CUDAGuard guard(device);
  check_launch(ck::launch_sample(logits.data_ptr(), temperature.data_ptr<float>(),
                                 top_k.data_ptr<int32_t>(), top_p.data_ptr<float>(),
                                 seed.data_ptr<int64_t>(), positions.data_ptr<int32_t>(),
                                 token_in.data_ptr<int32_t>(), token_hist.data_ptr<int32_t>(),
                                 to_int(B, op, "B"), to_int(V, op, "V"),
                                 to_int(token_hist.size(1), op, "MAXLEN"), dt,
                                 current_stream(device)),
               op);
}

}  // namespace

TORCH_LIBRARY(custom_kernels, m) {
  m.def("embedding(Tensor ids, Tensor table, Tensor(a!) out) -> ()");
  m.def("rmsnorm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("add_rmsnorm(Tensor x, Tensor(a!) residual, Tensor weight, float eps, Tensor(b!) out) "
        "-> ()");
  m.def("linear(Tensor x, Tensor weight, Tensor(a!) out) -> ()");
  m.def("swiglu(Tensor gate_up, Tensor(a!) out) -> ()");
  m.def("swiglu_linear(Tensor gate_up, Tensor weight, Tensor(a!) out) -> ()");
  m.def("linear_invariant(Tensor x, Tensor weight, Tensor(a!) out) -> ()");
  m.def("swiglu_linear_invariant(Tensor gate_up, Tensor weight, Tensor(a!) out) -> ()");
  m.def("rope_kv_write(Tensor qkv, Tensor positions, Tensor cos, Tensor sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor block_table, Tensor(c!) q_out) -> ()");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor positions, float scale, Tensor(a!) out, Tensor(b!)? workspace, int max_len) -> ()");
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "int start_pos, float scale, Tensor(a!) out) -> ()");
  m.def("sample(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, "
        "Tensor(a!) positions, Tensor(b!) token_in, Tensor(c!) token_hist) -> ()");
  m.def("bind_gemm_stream(Tensor workspace) -> ()");
  // No tensor argument to dispatch on: registered once, for every backend.
  m.def("attention_workspace_numel(int batch, int num_q_heads, int head_dim, int max_len, "
        "int num_kv_heads=0) -> int",
        &attention_workspace_numel);
  m.def("decode_attention_splits(int batch, int num_kv_heads, int max_len) -> int",
        &decode_attention_splits);
  m.def("pdl_enabled() -> bool", &pdl_enabled);
}

TORCH_LIBRARY_IMPL(custom_kernels, CUDA, m) {
  m.impl("embedding", &embedding);
  m.impl("rmsnorm", &rmsnorm);
  m.impl("add_rmsnorm", &add_rmsnorm);
  m.impl("linear", &linear);
  m.impl("swiglu", &swiglu);
  m.impl("swiglu_linear", &swiglu_linear);
  m.impl("linear_invariant", &linear_invariant);
  m.impl("swiglu_linear_invariant", &swiglu_linear_invariant);
  m.impl("rope_kv_write", &rope_kv_write);
  m.impl("decode_attention", &decode_attention);
  m.impl("prefill_attention", &prefill_attention);
  m.impl("sample", &sample);
  m.impl("bind_gemm_stream", &bind_gemm_stream);
}

// `import custom_kernels._C` needs a module init; the ops are registered by the static
// initializers above when the library loads, so the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "custom_kernels CUDA ops, registered under torch.ops.custom_kernels",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
