"""The weight loader: one arena allocation, per-tensor views packed the way the kernels read them.

Layout (DESIGN.md section 3): `embed [V, H]`, then per layer `ln1 [H]`, `wqkv [(nq + 2 nkv) D, H]`
(q rows, then k rows, then v rows), `wo [H, nq D]`, `ln2 [H]`, `w13 [2I, H]` (gate rows, then up
rows), `w2 [H, I]`, then `norm [H]` and, when untied, `lm_head [V, H]`. A tied lm_head is the embed
view itself. Every view starts on a 256-byte boundary relative to the arena base (CUDA allocations
are themselves at least 256-byte aligned), so vectorized kernel loads never straddle tensors.

Sources: an HF safetensors directory (single file, sharded with model.safetensors.index.json, or
any set of *.safetensors files), or seeded random weights generated on the device.

Tied checkpoints that still carry `lm_head.weight`: accepted only when it equals the embedding
exactly (some exporters write the shared tensor twice); a different lm_head while the config says
tied means the config is wrong, so it raises instead of silently dropping trained weights.

The config is duck-typed (graphserver.config.ModelConfig's fields): this package must not import
graphserver, which depends on it.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

ALIGN_BYTES = 256
# Checkpoint buffers that are not weights (older HF exports saved the RoPE table).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_INDEX_FILE = "model.safetensors.index.json"
_MAX_LISTED_PROBLEMS = 20


class WeightLoadError(ValueError):
    """The checkpoint does not match the config (the message names each tensor and its shapes)."""


@dataclass
class LayerWeights:
    ln1: torch.Tensor    # [H]             input_layernorm
    wqkv: torch.Tensor   # [(nq+2nkv)*D, H] q_proj; k_proj; v_proj rows
    wo: torch.Tensor     # [H, nq*D]        o_proj
    ln2: torch.Tensor    # [H]             post_attention_layernorm
    w13: torch.Tensor    # [2I, H]          gate_proj; up_proj rows
    w2: torch.Tensor     # [H, I]           down_proj


@dataclass
class ModelWeights:
    arena: torch.Tensor          # [total] the one allocation every view below lives in
    embed: torch.Tensor          # [V, H]
    norm: torch.Tensor           # [H]
    lm_head: torch.Tensor        # [V, H]  the embed view itself when tied
    layers: list[LayerWeights]
    tied: bool

    @property
    def nbytes(self) -> int:
        """Bytes of the arena (padding included): the device memory the weights hold."""
        return self.arena.numel() * self.arena.element_size()

    def views(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, view) for every distinct view, in arena order; a tied lm_head is not repeated."""
        yield "embed", self.embed
        for i, layer in enumerate(self.layers):
            for field in ("ln1", "wqkv", "wo", "ln2", "w13", "w2"):
                yield f"layers.{i}.{field}", getattr(layer, field)
        yield "norm", self.norm
        if not self.tied:
            yield "lm_head", self.lm_head


# ----------------------------------------------------------------------------- layout

def _view_shapes(cfg: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(view name, shape) in arena order, matching ModelWeights.views()."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed", (cfg.vocab_size, h))]
    for i in range(cfg.num_layers):
        shapes += [(f"layers.{i}.ln1", (h,)), (f"layers.{i}.wqkv", (qkv, h)),
                   (f"layers.{i}.wo", (h, cfg.num_heads * cfg.head_dim)),
                   (f"layers.{i}.ln2", (h,)), (f"layers.{i}.w13", (2 * inter, h)),
                   (f"layers.{i}.w2", (h, inter))]
    shapes.append(("norm", (h,)))
    if not cfg.tie_word_embeddings:
        shapes.append(("lm_head", (cfg.vocab_size, h)))
    return shapes


def _align_elems(dtype: torch.dtype) -> int:
    return max(1, ALIGN_BYTES // dtype.itemsize)


def _offsets(shapes: list[tuple[str, tuple[int, ...]]], align: int) -> tuple[dict[str, int], int]:
    """Aligned start offset (elements) of each view, and the arena's total element count."""
    offsets, cursor = {}, 0
    for name, shape in shapes:
        cursor = -(-cursor // align) * align
        offsets[name] = cursor
        cursor += math.prod(shape)
    return offsets, cursor


def _allocate(cfg: Any, device: torch.device | str, dtype: torch.dtype) -> ModelWeights:
    """One torch.empty for everything, carved into views (contents uninitialized)."""
    shapes = _view_shapes(cfg)
    offsets, total = _offsets(shapes, _align_elems(dtype))
    arena = torch.empty(total, dtype=dtype, device=device)  # [total]
    views = {name: arena[offsets[name]: offsets[name] + math.prod(shape)].view(shape)
             for name, shape in shapes}
    layers = [LayerWeights(**{f: views[f"layers.{i}.{f}"]
                              for f in ("ln1", "wqkv", "wo", "ln2", "w13", "w2")})
              for i in range(cfg.num_layers)]
    tied = bool(cfg.tie_word_embeddings)
    return ModelWeights(arena=arena, embed=views["embed"], norm=views["norm"],
                        lm_head=views["embed"] if tied else views["lm_head"],
                        layers=layers, tied=tied)


# ----------------------------------------------------------------------------- HF names

@dataclass(frozen=True)
class _Target:
    """Where one HF tensor lands: rows [row, row + shape[0]) of a view (the whole view if 1-D)."""
    view: str
    row: int
    shape: tuple[int, ...]


def _hf_targets(cfg: Any) -> dict[str, _Target]:
    """Every HF tensor name the checkpoint must hold -> its place in the arena."""
    h, inter, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    targets = {"model.embed_tokens.weight": _Target("embed", 0, (cfg.vocab_size, h)),
               "model.norm.weight": _Target("norm", 0, (h,))}
    for i in range(cfg.num_layers):
        p, v = f"model.layers.{i}.", f"layers.{i}."
        targets.update({
            p + "input_layernorm.weight": _Target(v + "ln1", 0, (h,)),
            p + "self_attn.q_proj.weight": _Target(v + "wqkv", 0, (q, h)),
            p + "self_attn.k_proj.weight": _Target(v + "wqkv", q, (kv, h)),
            p + "self_attn.v_proj.weight": _Target(v + "wqkv", q + kv, (kv, h)),
            p + "self_attn.o_proj.weight": _Target(v + "wo", 0, (h, q)),
            p + "post_attention_layernorm.weight": _Target(v + "ln2", 0, (h,)),
            p + "mlp.gate_proj.weight": _Target(v + "w13", 0, (inter, h)),
            p + "mlp.up_proj.weight": _Target(v + "w13", inter, (inter, h)),
            p + "mlp.down_proj.weight": _Target(v + "w2", 0, (h, inter)),
        })
    if not cfg.tie_word_embeddings:
        targets["lm_head.weight"] = _Target("lm_head", 0, (cfg.vocab_size, h))
    return targets


def expected_hf_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape a checkpoint for `cfg` must contain (lm_head only when untied)."""
    return {name: t.shape for name, t in _hf_targets(cfg).items()}


def _view_by_name(weights: ModelWeights, name: str) -> torch.Tensor:
    if name.startswith("layers."):
        _, index, field = name.split(".")
        return getattr(weights.layers[int(index)], field)
    return getattr(weights, name)


def _target_slice(weights: ModelWeights, target: _Target) -> torch.Tensor:
    view = _view_by_name(weights, target.view)
    return view if view.dim() == 1 else view[target.row: target.row + target.shape[0]]


# ----------------------------------------------------------------------------- safetensors index

def safetensors_files(model_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint's files: those the index (model.safetensors.index.json) names, else every
    *.safetensors in the directory."""
    root = Path(model_dir)
    index = root / _INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [root / f for f in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise WeightLoadError(f"{index} names shard files that do not exist: {missing}")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"no *.safetensors files in {root}")
    return files


def read_checkpoint_index(files: list[Path]) -> tuple[dict[str, Path], dict[str, tuple[int, ...]],
                                                      dict[str, str]]:
    """Headers only: name -> file, name -> shape, name -> safetensors dtype string ("BF16", ...)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in where:
                    raise WeightLoadError(f"tensor {name} is in both {where[name]} and {path}")
                sl = f.get_slice(name)
                where[name] = path
                shapes[name], dtypes[name] = tuple(sl.get_shape()), sl.get_dtype()
    return where, shapes, dtypes


def _is_ignored(name: str) -> bool:
    return name.endswith(_IGNORED_SUFFIXES)


def check_checkpoint(cfg: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise WeightLoadError listing every missing, unexpected or misshaped tensor."""
    expected = expected_hf_shapes(cfg)
    problems = [f"missing tensor {name} (expected shape {list(shape)})"
                for name, shape in expected.items() if name not in shapes]
    for name, shape in shapes.items():
        if _is_ignored(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        if name not in expected:
            problems.append(f"unexpected tensor {name} (shape {list(shape)})")
        elif tuple(shape) != expected[name]:
            problems.append(f"tensor {name} has shape {list(shape)}, "
                            f"expected {list(expected[name])}")
    if cfg.tie_word_embeddings and "lm_head.weight" in shapes \
            and tuple(shapes["lm_head.weight"]) != (cfg.vocab_size, cfg.hidden_size):
        problems.append(f"tensor lm_head.weight has shape {list(shapes['lm_head.weight'])}, "
                        f"expected {[cfg.vocab_size, cfg.hidden_size]} (tied to the embedding)")
    if problems:
        shown = problems[:_MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        raise WeightLoadError("checkpoint does not match the config:\n  " + "\n  ".join(shown)
                              + (f"\n  ... and {more} more" if more else ""))


def _check_tied_lm_head(where: dict[str, Path]) -> None:
    """A tied config with an lm_head.weight in the file: accept it only if it equals the embed."""
    from safetensors import safe_open

    def read(name: str) -> torch.Tensor:
        with safe_open(str(where[name]), framework="pt") as f:
            return f.get_tensor(name)

    if not torch.equal(read("lm_head.weight"), read("model.embed_tokens.weight")):
        raise WeightLoadError(
            "config has tie_word_embeddings=true but the checkpoint's lm_head.weight differs from "
            "model.embed_tokens.weight; fix tie_word_embeddings in config.json")


# ----------------------------------------------------------------------------- filling

def _fill_from_safetensors(weights: ModelWeights, cfg: Any, where: dict[str, Path]) -> None:
    """Tensor by tensor, file by file, straight into the arena views (copy_ converts the dtype)."""
    from safetensors import safe_open

    targets = _hf_targets(cfg)
    by_file: dict[Path, list[str]] = {}
    for name in targets:
        by_file.setdefault(where[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                _target_slice(weights, targets[name]).copy_(f.get_tensor(name))


def _fill_random(weights: ModelWeights, cfg: Any, seed: int) -> None:
    """Seeded weights generated on the device, in arena order.

    Every matrix [rows, H or fan_in] ~ N(0, 1/shape[1]), so each projection keeps unit-scale
    activations whatever the width; with an RMSNorm in front of each block, activations stay sane
    over 32 layers, and the logits (normed hidden . a row of norm ~1) have std ~1, tied or not:
    non-degenerate, so greedy decoding depends on the context. Norm weights are 1 + N(0, 0.02^2),
    so that no norm is exactly the identity scale.
    """
    gen = torch.Generator(device=weights.arena.device)
    gen.manual_seed(int(seed))
    for _, view in weights.views():
        if view.dim() == 1:  # [H] norm weight
            view.normal_(1.0, 0.02, generator=gen)
        else:                # [rows, fan_in]
            view.normal_(0.0, view.shape[1] ** -0.5, generator=gen)


# ----------------------------------------------------------------------------- entry point

def _source_dir(source: Any) -> Path | None:
    """None for random weights, else the HF directory to read."""
    if source is None:
        return None
    if hasattr(source, "kind"):
        if source.kind == "random":
            return None
        if source.kind != "hf" or source.path is None:
            raise WeightLoadError(f"cannot load weights from source kind {source.kind!r}")
        return Path(source.path)
    return Path(source)


def load_weights(source_or_dir: Any, config: Any, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> ModelWeights:
    """Load (or generate) every weight into one device arena.

    source_or_dir: a ModelSource-like object (`kind` "hf" with `path`, or "random"), a directory
    path, or None for random weights. config: ModelConfig-like (duck-typed). The checkpoint is
    validated against the config from the headers alone before any byte is copied.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    model_dir = _source_dir(source_or_dir)
    if model_dir is None:
        weights = _allocate(config, device, dtype)
        _fill_random(weights, config, seed)
        return weights
    where, shapes, _ = read_checkpoint_index(safetensors_files(model_dir))
    check_checkpoint(config, shapes)
    if config.tie_word_embeddings and "lm_head.weight" in where:
        _check_tied_lm_head(where)
    weights = _allocate(config, device, dtype)
    _fill_from_safetensors(weights, config, where)
    return weights
