"""The one Python face of every op.

CPU tensors go to the pure-torch reference (custom_kernels/reference.py); CUDA tensors go to the
compiled kernels in custom_kernels._C, registered under torch.ops.custom_kernels. Signatures and
semantics are documented once, in reference.py; the kernels match them.
"""
from __future__ import annotations

import functools

import torch

from . import reference


@functools.lru_cache(maxsize=None)
def _extension_error() -> str | None:
    """None when custom_kernels._C imports, else why it does not (cached: import once)."""
    try:
        from . import _C  # noqa: F401  (registers torch.ops.custom_kernels.*)
    except ImportError as exc:
        return str(exc)
    return None


def cuda_kernels_available() -> bool:
    """True when the compiled extension is importable (a CUDA build of torch and nvcc at install)."""
    return _extension_error() is None


def _kernels():
    err = _extension_error()
    if err is not None:
        raise RuntimeError(
            "CUDA tensors need the compiled kernels (custom_kernels._C), which did not import: "
            f"{err}. Build them with `python setup.py build_ext --inplace` on a machine with nvcc "
            "and a CUDA build of torch.")
    return torch.ops.custom_kernels


def embedding(ids, table, out):
    if out.is_cuda:
        return _kernels().embedding(ids, table, out)
    return reference.embedding(ids, table, out)


def rmsnorm(x, weight, eps: float, out):
    if out.is_cuda:
        return _kernels().rmsnorm(x, weight, float(eps), out)
    return reference.rmsnorm(x, weight, eps, out)


def add_rmsnorm(x, residual, weight, eps: float, out):
    if out.is_cuda:
        return _kernels().add_rmsnorm(x, residual, weight, float(eps), out)
    return reference.add_rmsnorm(x, residual, weight, eps, out)


def linear(x, weight, out):
    if out.is_cuda:
        return _kernels().linear(x, weight, out)
    return reference.linear(x, weight, out)


def swiglu(gate_up, out):
    if out.is_cuda:
        return _kernels().swiglu(gate_up, out)
    return reference.swiglu(gate_up, out)


def swiglu_linear(gate_up, weight, out, act):
    """out = swiglu(gate_up) @ weight.T (see reference.swiglu_linear).

    gate_up [T, 2I], weight [N, I], out [T, N]; act [T, I] is caller-owned scratch of gate_up's
    dtype and device: the CPU path and the CUDA fallback write the SwiGLU intermediate there (its
    contents afterwards are unspecified: the fused kernel does not touch it). On CUDA the fused
    kernel serves T <= 8 rows with I % 8 == 0 and 16-byte aligned gate_up / weight (decode); other
    shapes (prefill chunks) run swiglu + linear through act. Results are identical either way.
    """
    if out.is_cuda:
        inter = weight.shape[-1]
        rows = gate_up.numel() // gate_up.shape[-1] if gate_up.shape[-1] else 0
        if (_FUSED_MAX_ROWS >= rows >= 1 and inter % 8 == 0 and gate_up.is_contiguous()
                and weight.is_contiguous() and gate_up.data_ptr() % 16 == 0
                and weight.data_ptr() % 16 == 0):
            return _kernels().swiglu_linear(gate_up, weight, out)
        _kernels().swiglu(gate_up, act)
        return _kernels().linear(act, weight, out)
    reference.swiglu(gate_up, act)
    reference.linear(act, weight, out)


# Rows the fused swiglu_linear kernel serves (the GEMV's limit, launchers.h kGemvMaxRows).
_FUSED_MAX_ROWS = 8


def linear_invariant(x, weight, out):
    """out = x @ weight.T, batch-invariant: row t is bitwise what the op gives for x[t] alone.

    x [T, K], weight [N, K], out [T, N] (see reference.linear_invariant). On CUDA one GEMV launch
    serves any T (row groups of <= 8 along the grid), with a summation order that depends on K
    only; it needs K % 8 == 0 and 16-byte aligned, contiguous x and weight (it refuses otherwise:
    no fallback could keep the invariance). Values equal linear()'s up to fp32 summation order, and
    bitwise for T <= 8 (the same kernel)."""
    if out.is_cuda:
        return _kernels().linear_invariant(x, weight, out)
    return reference.linear_invariant(x, weight, out)


def swiglu_linear_invariant(gate_up, weight, out, act):
    """out = swiglu(gate_up) @ weight.T, batch-invariant (see reference.swiglu_linear_invariant).

    gate_up [T, 2I], weight [N, I], out [T, N]; act [T, I] is caller-owned scratch as in
    swiglu_linear. On CUDA the fused kernel serves any T when I % 8 == 0 and gate_up / weight are
    16-byte aligned and contiguous (act untouched); otherwise swiglu into act, then
    linear_invariant (which has the same requirements on act). Either way the result is bitwise
    that of swiglu + linear_invariant, row by row independent of T."""
    if out.is_cuda:
        inter = weight.shape[-1]
        if (inter % 8 == 0 and gate_up.is_contiguous() and weight.is_contiguous()
                and gate_up.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0):
            return _kernels().swiglu_linear_invariant(gate_up, weight, out)
        _kernels().swiglu(gate_up, act)
        return _kernels().linear_invariant(act, weight, out)
    reference.swiglu(gate_up, act)
    reference.linear_invariant(act, weight, out)


def rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache, block_table, q_out):
    """See reference.rope_kv_write: block_table [MB] (one sequence) or [T, MB] (one table row per
    token); tokens with position < 0 are padding (no K/V write, zero q_out row)."""
    if q_out.is_cuda:
        return _kernels().rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache, block_table,
                                        q_out)
    return reference.rope_kv_write(qkv, positions, cos, sin, k_cache, v_cache, block_table, q_out)


def decode_attention(q, k_cache, v_cache, block_tables, positions, scale: float, out,
                     workspace=None, max_len: int = 0):
    """See reference.decode_attention.

    CUDA only: `workspace` is the preallocated split-K scratch (see attention_workspace_numel) and
    `max_len` the longest length this launch must serve; it sizes the split count, so a graph
    captured for a length bucket stays valid for every length up to max_len.
    """
    if out.is_cuda:
        return _kernels().decode_attention(q, k_cache, v_cache, block_tables, positions,
                                           float(scale), out, workspace, int(max_len))
    return reference.decode_attention(q, k_cache, v_cache, block_tables, positions, scale, out)


def attention_workspace_numel(batch: int, num_q_heads: int, head_dim: int, max_len: int,
                              num_kv_heads: int = 0) -> int:
    """fp32 elements of split-K scratch the decode attention kernel needs for up to `batch` rows
    and lengths up to `max_len`. num_kv_heads = 0 bounds it over every kv head count the kernel
    serves; pass the model's count for the exact (often much smaller) size."""
    if not cuda_kernels_available():
        return 0
    return int(_kernels().attention_workspace_numel(batch, num_q_heads, head_dim, max_len,
                                                    num_kv_heads))


def decode_attention_splits(batch: int, num_kv_heads: int, max_len: int) -> int:
    """The grid's split count decode_attention launches with for this max_len: the only part of a
    decode step's launch configuration that depends on the sequence length.

    Independent of `batch` (kept for API stability): each row splits by its own length only, so a
    row's result is bitwise the same alone or in any batch."""
    if not cuda_kernels_available():
        return 1
    return int(_kernels().decode_attention_splits(batch, num_kv_heads, max_len))


def pdl_enabled() -> bool:
    """Whether the CUDA kernels launch with programmatic dependent launch (overlapping each kernel's
    start with the previous one's tail). Decided once, when the extension loads, by the environment
    variable CUSTOM_KERNELS_PDL (0 / false / off / no disables it); False without the extension."""
    if not cuda_kernels_available():
        return False
    return bool(_kernels().pdl_enabled())


def prefill_attention(q, k_cache, v_cache, block_table, start_pos: int, scale: float, out):
    if out.is_cuda:
        return _kernels().prefill_attention(q, k_cache, v_cache, block_table, int(start_pos),
                                            float(scale), out)
    return reference.prefill_attention(q, k_cache, v_cache, block_table, start_pos, scale, out)


def sample(logits, temperature, top_k, top_p, seed, positions, token_in, token_hist):
    if logits.is_cuda:
        return _kernels().sample(logits, temperature, top_k, top_p, seed, positions, token_in,
                                 token_hist)
    return reference.sample(logits, temperature, top_k, top_p, seed, positions, token_in,
                            token_hist)


def bind_gemm_stream(workspace: torch.Tensor) -> None:
    """Create (once) the cuBLAS handle of the current CUDA stream and give it `workspace`.

    Call this on every stream that will run or capture `linear`, before any capture: creating a
    handle allocates, which is illegal inside stream capture. No-op for CPU tensors.
    """
    if workspace.is_cuda:
        _kernels().bind_gemm_stream(workspace)
