"""Device and dtype choice, with one-line errors for impossible asks."""
from __future__ import annotations

import torch

from custom_kernels import ops

from ..errors import ConfigError

# Every spelling a user may type, to the one torch dtype.
DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
               "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        use_cuda = torch.cuda.is_available() and ops.cuda_kernels_available()
        if use_cuda:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; choose auto, cpu or cuda")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        # an explicit index: streams and the capture thread's set_device need one
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but torch sees no CUDA device")
        if not ops.cuda_kernels_available():
            raise ConfigError("--device cuda needs the compiled kernels: "
                             "run `python setup.py build_ext --inplace`")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp32 on the CPU: the reference path is the parity oracle, and bf16 matmuls crawl there.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    key = dtype.lower() if isinstance(dtype, str) else dtype
    if key not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose auto, bf16, fp16 or fp32")
    if device.type == "cuda" and DTYPE_NAMES[key] == torch.float32:
        raise ConfigError("the CUDA kernels run bf16 and fp16 only")
    return DTYPE_NAMES[key]
