"""Weights hot reload (DESIGN §9.4): validate a checkpoint against the running model, stage it in
host memory, then copy it into the SAME device arena, so every captured graph stays valid."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from custom_kernels.weights import ModelWeights, Shard, WeightLoadError, load_weights

from ..config import ModelConfig, UnsupportedConfig
from ..errors import BadRequest

# The config fields that shape the arena or the step: a checkpoint must agree on all of them.
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim", "tie_word_embeddings", "rope_theta", "rope_scaling",
                 "rms_norm_eps")


def stage_checkpoint(path: str, cfg: ModelConfig, dtype: torch.dtype, shard: Shard = Shard()) -> ModelWeights:
    """The checkpoint at path loaded into a host arena laid out like the running one (shard:
    a tensor-parallel rank's part only; the whole checkpoint is still validated from its headers).

    BadRequest (one line per problem) when it is not a directory, its config disagrees with the
    running model, or its tensors are missing or misshaped; nothing on the device is touched.
    """
    root = Path(path)
    if not root.is_dir():
        raise BadRequest(f"reload: {path!r} is not a directory")
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise BadRequest(f"reload: {path!r} has no config.json")
    try:
        new = ModelConfig.from_hf(json.loads(cfg_file.read_text()))
    except (ValueError, UnsupportedConfig, KeyError) as e:
        raise BadRequest(f"reload: {cfg_file}: {e}") from None
    diff = [f"{f} {getattr(new, f)!r} (running {getattr(cfg, f)!r})" for f in _SHAPE_FIELDS
            if getattr(new, f) != getattr(cfg, f)]
    if diff:
        raise BadRequest("reload: the checkpoint's config differs from the running model: "
                         + "; ".join(diff))
    try:
        return load_weights(root, cfg, "cpu", dtype, shard=shard)
    except (WeightLoadError, OSError, RuntimeError) as e:
        raise BadRequest(f"reload: {path}: " + str(e).replace("\n", " ")) from None


def copy_into(weights: ModelWeights, staged: ModelWeights) -> None:
    """Overwrite the device arena in place (on the current stream)."""
    weights.arena.copy_(staged.arena, non_blocking=False)
