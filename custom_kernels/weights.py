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
    """Where one HF tensor lands: rows [row, row + shape[0]) of a view (the whole view if 1-D).

    shape is the full (unsharded) HF shape. split is the tensor-parallel shard rule: the dim
    cut into `world` equal parts, rank r keeping part r (0: rows, i.e. output features; 1: columns,
    i.e. input features), or None when every rank holds the whole tensor. Under a shard, row is
    the offset inside the rank's (smaller) view.
    """
    view: str
    row: int
    shape: tuple[int, ...]
    split: int | None = None

    def shard_shape(self, world: int) -> tuple[int, ...]:
        if self.split is None:
            return self.shape
        shape = list(self.shape)
        shape[self.split] //= world
        return tuple(shape)


def _hf_targets(cfg: Any, world: int = 1) -> dict[str, _Target]:
    """Every HF tensor name the checkpoint must hold -> its place in the arena of one rank of
    `world` tensor-parallel ranks (world 1: the whole model).

    Shard rules (Megatron-style): q/k/v by heads and gate/up by output rows (column-parallel, no
    communication), o_proj and down_proj by input columns (row-parallel: the runner all-reduces
    their outputs). Rank r's q heads [r nq/N, (r+1) nq/N) read exactly kv heads
    [r nkv/N, (r+1) nkv/N), so every kv head stays with its query heads. Embedding, norms and
    lm_head are replicated: the step needs no gather, and a vocab-parallel lm_head is a later
    optimization.
    """
    h, inter, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    qs, kvs, ints = q // world, kv // world, inter // world     # this rank's rows
    targets = {"model.embed_tokens.weight": _Target("embed", 0, (cfg.vocab_size, h)),
               "model.norm.weight": _Target("norm", 0, (h,))}
    for i in range(cfg.num_layers):
        p, v = f"model.layers.{i}.", f"layers.{i}."
        targets.update({
            p + "input_layernorm.weight": _Target(v + "ln1", 0, (h,)),
            p + "self_attn.q_proj.weight": _Target(v + "wqkv", 0, (q, h), 0),
            p + "self_attn.k_proj.weight": _Target(v + "wqkv", qs, (kv, h), 0),
            p + "self_attn.v_proj.weight": _Target(v + "wqkv", qs + kvs, (kv, h), 0),
            p + "self_attn.o_proj.weight": _Target(v + "wo", 0, (h, q), 1),
            p + "post_attention_layernorm.weight": _Target(v + "ln2", 0, (h,)),
            p + "mlp.gate_proj.weight": _Target(v + "w13", 0, (inter, h), 0),
            p + "mlp.up_proj.weight": _Target(v + "w13", ints, (inter, h), 0),
            p + "mlp.down_proj.weight": _Target(v + "w2", 0, (h, inter), 1),
        })
    if not cfg.tie_word_embeddings:
        targets["lm_head.weight"] = _Target("lm_head", 0, (cfg.vocab_size, h))
    return targets


@dataclass(frozen=True)
class Shard:
    """Tensor-parallel rank `rank` of `world` (world 1: the whole model, no slicing)."""
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if not (isinstance(self.world, int) and self.world >= 1 and 0 <= self.rank < self.world):
            raise ValueError(f"bad shard: rank {self.rank} of world {self.world}")


def shard_divisibility_problem(cfg: Any, world: int) -> str | None:
    """None when cfg splits into `world` ranks, else what does not divide (one clause)."""
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    if heads % world or kv % world:
        return (f"num_attention_heads {heads} and num_key_value_heads {kv} must both divide "
                f"by {world}")
    if cfg.intermediate_size % world:
        return f"intermediate_size {cfg.intermediate_size} must divide by {world}"
    return None


def shard_config(cfg: Any, world: int) -> Any:
    """The config one rank's arena and runner are built from: nq/N, nkv/N heads, I/N (ValueError
    when cfg does not divide). The config must be a dataclass (ModelConfig is)."""
    import dataclasses

    if world == 1:
        return cfg
    problem = shard_divisibility_problem(cfg, world)
    if problem:
        raise ValueError(problem)
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // world,
                               num_kv_heads=cfg.num_kv_heads // world,
                               intermediate_size=cfg.intermediate_size // world)


def _shard_of(tensor: torch.Tensor, target: _Target, shard: Shard) -> torch.Tensor:
    """Rank shard.rank's part of a full HF tensor under target's split rule."""
    if target.split is None or shard.world == 1:
        return tensor
    size = tensor.shape[target.split] // shard.world
    return tensor.narrow(target.split, shard.rank * size, size)


def expected_hf_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape a checkpoint for `cfg` must contain (lm_head only when untied)."""
    return {name: t.shape for name, t in _hf_targets(cfg).items()}


def _view_by_name(weights: ModelWeights, name: str) -> torch.Tensor:
    if name.startswith("layers."):
        _, index, field = name.split(".")
        return getattr(weights.layers[int(index)], field)
    return getattr(weights, name)


def _target_slice(weights: ModelWeights, target: _Target, world: int = 1) -> torch.Tensor:
    view = _view_by_name(weights, target.view)
    rows = target.shard_shape(world)[0]
    return view if view.dim() == 1 else view[target.row: target.row + rows]


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

def _fill_from_safetensors(weights: ModelWeights, cfg: Any, where: dict[str, Path],
                           shard: Shard = Shard()) -> None:
    """Tensor by tensor, file by file, straight into the arena views (copy_ converts the dtype).
    cfg is the full config; under a shard each rank copies its part of each tensor."""
    from safetensors import safe_open

    targets = _hf_targets(cfg, shard.world)
    by_file: dict[Path, list[str]] = {}
    for name in targets:
        by_file.setdefault(where[name], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                t = targets[name]
                _target_slice(weights, t, shard.world).copy_(
                    _shard_of(f.get_tensor(name), t, shard))


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
        _random_like(view, gen)


def _random_like(view: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fill one full-model view with its random values (the rule in _fill_random's docstring)."""
    if view.dim() == 1:  # [H] norm weight
        return view.normal_(1.0, 0.02, generator=gen)
    return view.normal_(0.0, view.shape[1] ** -0.5, generator=gen)     # [rows, fan_in]


def _fill_random_shard(weights: ModelWeights, cfg: Any, seed: int, shard: Shard) -> None:
    """One rank's part of exactly the weights _fill_random makes for the whole model: each full
    view is generated (same generator, same order, same shapes), then the rank's part of every HF
    tensor in it is copied out, so TP=N runs the same model as TP=1. cfg is the full config."""
    dev, dtype = weights.arena.device, weights.arena.dtype
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed))
    whole = _hf_targets(cfg, 1)                      # where each tensor sits in the full view
    placed = _hf_targets(cfg, shard.world)           # same names: where this rank keeps its part
    by_view: dict[str, list[str]] = {}
    for name, t in whole.items():
        by_view.setdefault(t.view, []).append(name)
    for view_name, shape in _view_shapes(cfg):
        full = _random_like(torch.empty(shape, dtype=dtype, device=dev), gen)
        for name in by_view.get(view_name, ()):
            t = whole[name]
            piece = full if full.dim() == 1 else full[t.row: t.row + t.shape[0]]
            mine = placed[name]
            _target_slice(weights, mine, shard.world).copy_(_shard_of(piece, mine, shard))


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
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 shard: Shard = Shard()) -> ModelWeights:
    """Load (or generate) every weight into one device arena.

    source_or_dir: a ModelSource-like object (`kind` "hf" with `path`, or "random"), a directory
    path, or None for random weights. config: ModelConfig-like (duck-typed), the full model's.
    The checkpoint is validated against the config from the headers alone before any byte is
    copied. shard: load only tensor-parallel rank shard.rank's part (see _hf_targets); the arena
    is then laid out for shard_config(config, shard.world).
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    local = shard_config(config, shard.world)
    model_dir = _source_dir(source_or_dir)
    if model_dir is None:
        weights = _allocate(local, device, dtype)
        if shard.world == 1:
            _fill_random(weights, config, seed)
        else:
            _fill_random_shard(weights, config, seed, shard)
        return weights
    where, shapes, _ = read_checkpoint_index(safetensors_files(model_dir))
    check_checkpoint(config, shapes)
    if config.tie_word_embeddings and "lm_head.weight" in where:
        _check_tied_lm_head(where)
    weights = _allocate(local, device, dtype)
    _fill_from_safetensors(weights, config, where, shard)
    return weights
