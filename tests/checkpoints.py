"""Checkpoint directories made from the default model for the reload tests."""
from __future__ import annotations

import shutil
from pathlib import Path


def perturbed_copy(src, dst: Path, seed: int = 1234) -> Path:
    """A copy of the model directory whose matrices are changed enough to change greedy text."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(dst.glob("*.safetensors")):
        tensors = load_file(str(f))
        for name, t in tensors.items():
            if t.ndim == 2 and t.is_floating_point():
                tensors[name] = t + 0.5 * t.float().std() * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def misshaped_copy(src, dst: Path) -> Path:
    """A copy whose only tensor file holds one tensor of the wrong shape: a bad checkpoint."""
    import torch
    from safetensors.torch import save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({"model.embed_tokens.weight": torch.randn(3, 3)}, str(dst / "model.safetensors"))
    return dst
