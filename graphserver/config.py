"""Model configuration: what the decode step needs to know about a LLaMA-family checkpoint.

`ModelConfig.from_hf` reads an HF `config.json` dict (transformers 4.x layout with `rope_theta` /
`rope_scaling`, or the 5.x layout with `rope_parameters`) and refuses, with `UnsupportedConfig`,
anything the kernels do not implement, instead of silently computing something else.

`inv_freq` reproduces transformers' RoPE inverse frequencies bit for bit (same fp32 expression), so
the cos/sin tables of reference.rope_tables match HF's for parity tests.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from . import defaults as _d

if TYPE_CHECKING:   # torch-free at import: the HTTP front end and the scheduler read this module
    import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# HF defaults for fields a config.json may omit (LlamaConfig / MistralConfig class defaults).
_HF_DEFAULT_ROPE_THETA = 10000.0
_HF_DEFAULT_RMS_EPS = 1e-6
_HF_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32}
_HF_DEFAULT_MISTRAL_SLIDING_WINDOW = 4096


class UnsupportedConfig(ValueError):
    """The config describes a model this server does not implement (the message names the field)."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain RoPE; else a normalized dict with "rope_type" ("linear" | "llama3") and that
    # type's parameters (see _parse_rope_scaling).
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    model_type: str = "llama"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_size(self) -> int:
        return self.q_size + 2 * self.kv_size

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else self.rope_scaling["rope_type"]

    @property
    def attn_scale(self) -> float:
        """Softmax scale of the attention scores, head_dim ** -0.5 as HF's LlamaAttention uses."""
        return self.head_dim ** -0.5

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Parse an HF config.json dict. Raises UnsupportedConfig naming the offending field."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfig(
                f"model_type={model_type!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)})")
        _check_unsupported_features(d, model_type)
        hidden = _required_int(d, "hidden_size")
        heads = _required_int(d, "num_attention_heads")
        kv_heads = _optional_int(d, "num_key_value_heads", heads)
        head_dim = _head_dim(d, hidden, heads)
        _check_heads(heads, kv_heads, head_dim)
        max_pos = _optional_int(d, "max_position_embeddings", _HF_DEFAULT_MAX_POSITIONS[model_type])
        theta, scaling = _parse_rope(d, max_pos)
        return cls(
            vocab_size=_required_int(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_required_int(d, "intermediate_size"),
            num_layers=_required_int(d, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_positive_float(d, "rms_norm_eps", _HF_DEFAULT_RMS_EPS),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=_token_id(d, "bos_token_id"),
            eos_token_ids=_eos_ids(d),
            model_type=model_type,
        )


# ----------------------------------------------------------------------------- field parsing

def _required_int(d: Mapping[str, Any], key: str) -> int:
    if d.get(key) is None:
        raise UnsupportedConfig(f"{key} is missing from the config (required)")
    return _as_positive_int(key, d[key])


def _optional_int(d: Mapping[str, Any], key: str, default: int) -> int:
    value = d.get(key)
    return default if value is None else _as_positive_int(key, value)


def _as_positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UnsupportedConfig(f"{key}={value!r} must be a positive integer")
    return value


def _positive_float(d: Mapping[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UnsupportedConfig(f"{key}={value!r} must be a positive number")
    return float(value)


def _head_dim(d: Mapping[str, Any], hidden: int, heads: int) -> int:
    if d.get("head_dim") is not None:
        return _as_positive_int("head_dim", d["head_dim"])
    if hidden % heads:
        raise UnsupportedConfig(
            f"hidden_size={hidden} is not divisible by num_attention_heads={heads} "
            "and head_dim is not given")
    return hidden // heads


def _check_heads(heads: int, kv_heads: int, head_dim: int) -> None:
    if heads % kv_heads:
        raise UnsupportedConfig(
            f"num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}")
    if head_dim % 2:
        # RoPE rotates pairs (i, i + D/2), so D must be even.
        raise UnsupportedConfig(f"head_dim={head_dim} must be even for RoPE")


def _token_id(d: Mapping[str, Any], key: str) -> int | None:
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UnsupportedConfig(f"{key}={value!r} must be a non-negative integer or null")
    return value


def _eos_ids(d: Mapping[str, Any]) -> tuple[int, ...]:
    """eos_token_id may be an int, a list of ints, or absent (no stop token: none is guessed)."""
    value = d.get("eos_token_id")
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UnsupportedConfig(f"eos_token_id={value!r} must be an int or a list of ints")
    return tuple(values)


def _check_unsupported_features(d: Mapping[str, Any], model_type: str) -> None:
    """Features of HF's Llama/Mistral that change the math and that the kernels do not implement."""
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfig(f"hidden_act={act!r} is not supported (only 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise UnsupportedConfig(f"{key}={d[key]!r} is not supported (bias-free linears only)")
    if d.get("quantization_config") is not None:
        method = d["quantization_config"].get("quant_method", "?")
        raise UnsupportedConfig(
            f"quantization_config (quant_method={method!r}) is not supported: "
            "the loader reads plain floating-point safetensors")
    if model_type == "mistral":
        # HF's MistralConfig defaults sliding_window to 4096 when the key is absent.
        window = d.get("sliding_window", _HF_DEFAULT_MISTRAL_SLIDING_WINDOW)
        if window is not None:
            raise UnsupportedConfig(
                f"sliding_window={window!r} is not supported (only full attention, "
                "sliding_window: null)")
    partial = d.get("partial_rotary_factor")
    if partial is not None and partial != 1.0:
        raise UnsupportedConfig(f"partial_rotary_factor={partial!r} is not supported (only 1.0)")


# ----------------------------------------------------------------------------- RoPE

def _parse_rope(d: Mapping[str, Any], max_pos: int) -> tuple[float, dict | None]:
    """(rope_theta, normalized rope_scaling or None) from either config layout.

    transformers 5 keeps everything in `rope_parameters`; 4.x has `rope_theta` next to a
    `rope_scaling` dict. As in transformers 5, `rope_scaling` wins over `rope_parameters`, and a
    theta inside the dict wins over the top-level one.
    """
    params = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(params, Mapping):
        raise UnsupportedConfig(f"rope_scaling={params!r} must be a dict or null")
    theta = params.get("rope_theta", d.get("rope_theta", _HF_DEFAULT_ROPE_THETA))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise UnsupportedConfig(f"rope_theta={theta!r} must be a positive number")
    partial = params.get("partial_rotary_factor")
    if partial is not None and partial != 1.0:
        raise UnsupportedConfig(f"partial_rotary_factor={partial!r} is not supported (only 1.0)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    return float(theta), _parse_rope_scaling(rope_type, params, max_pos)


def _parse_rope_scaling(rope_type: Any, params: Mapping[str, Any], max_pos: int) -> dict | None:
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return {"rope_type": "linear", "factor": _rope_number(params, "factor", minimum=1.0)}
    if rope_type == "llama3":
        low = _rope_number(params, "low_freq_factor")
        high = _rope_number(params, "high_freq_factor")
        if not high > low:
            raise UnsupportedConfig(
                f"rope_scaling.high_freq_factor={high} must exceed low_freq_factor={low}")
        # HF fills original_max_position_embeddings from max_position_embeddings when absent.
        orig = params.get("original_max_position_embeddings", max_pos)
        return {"rope_type": "llama3",
                "factor": _rope_number(params, "factor", minimum=1.0),
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": _as_positive_int(
                    "rope_scaling.original_max_position_embeddings", orig)}
    raise UnsupportedConfig(
        f"rope_scaling.rope_type={rope_type!r} is not supported (supported: "
        f"{', '.join(SUPPORTED_ROPE_TYPES)})")


def _rope_number(params: Mapping[str, Any], key: str, minimum: float = 0.0) -> float:
    value = params.get(key)
    if value is None:
        raise UnsupportedConfig(f"rope_scaling.{key} is missing (required for this rope_type)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
            or value < minimum:
        raise UnsupportedConfig(
            f"rope_scaling.{key}={value!r} must be a positive number >= {minimum}")
    return float(value)


def inv_freq(cfg: ModelConfig) -> "torch.Tensor":
    """RoPE inverse frequencies [head_dim / 2] fp32, computed with transformers' exact expressions
    (default, linear and llama3 rope types), so that cos/sin tables match HF's bit for bit."""
    import torch

    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float32) / dim  # [D/2]
    base_freq = 1.0 / (cfg.rope_theta ** exponents)                                         # [D/2]
    if cfg.rope_scaling is None:
        return base_freq
    if cfg.rope_scaling["rope_type"] == "linear":
        return base_freq / cfg.rope_scaling["factor"]
    return _llama3_inv_freq(base_freq, cfg.rope_scaling)


def _llama3_inv_freq(freq: "torch.Tensor", s: Mapping[str, Any]) -> "torch.Tensor":
    """Llama 3.1 frequency-dependent scaling: long wavelengths are divided by `factor`, short ones
    are kept, and the band between is interpolated smoothly. freq [D/2] fp32 -> [D/2] fp32."""
    import torch

    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / freq                                                    # [D/2]
    scaled = torch.where(wavelen > low_freq_wavelen, freq / factor, freq)           # [D/2]
    smooth = (old_len / wavelen - low) / (high - low)                               # [D/2]
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled                     # [D/2]
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)      # [D/2] bool
    return torch.where(is_medium, smoothed, scaled)


def rope_attention_scaling(cfg: ModelConfig) -> float:
    """HF's post-multiplier on cos/sin (`attention_scaling`): 1.0 for every supported rope type
    (only yarn/longrope, which are refused, use another value)."""
    del cfg
    return 1.0


# ----------------------------------------------------------------------------- random shapes

def _llama_dict(**fields: Any) -> dict:
    """An HF config.json-style dict for a Llama model (only keys LlamaConfig accepts)."""
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "rms_norm_eps": 1e-5,
            "bos_token_id": 1, "eos_token_id": 2}
    base.update(fields)
    return base


# Shapes for `random:<shape>` (seeded random weights, nothing downloaded). The real models' shapes;
# `tiny` and `tiny-hd128` are small GQA models for tests (tiny-hd128 also covers tied embeddings
# and Llama-3 rope scaling at head_dim 128). Treat as read-only: use random_shape_config().
RANDOM_SHAPES: dict[str, dict] = {
    "smollm2-135m": _llama_dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-3.2-1b": _llama_dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001),
    "llama-2-7b": _llama_dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, rope_theta=10000.0,
        max_position_embeddings=4096, tie_word_embeddings=False),
    "tiny": _llama_dict(
        vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
        max_position_embeddings=4096, tie_word_embeddings=False),
    "tiny-hd128": _llama_dict(
        vocab_size=1000, hidden_size=512, intermediate_size=704, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=128, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
        max_position_embeddings=4096, tie_word_embeddings=True),
}


def random_shape_config(shape: str) -> dict:
    """A private copy of RANDOM_SHAPES[shape]; KeyError lists the valid shapes."""
    if shape not in RANDOM_SHAPES:
        raise KeyError(f"unknown random shape {shape!r} (valid: {', '.join(RANDOM_SHAPES)})")
    return copy.deepcopy(RANDOM_SHAPES[shape])


# ----------------------------------------------------------------------------- the engine's knobs

@dataclass(frozen=True)
class EngineConfig:
    """Every serving knob and its default, once. Torch-free: the scheduler and tests read it.

    None means "derived": see resolved(), which fills those from the model and the other knobs.
    """
    max_len: int | None = None            # longest sequence (prompt + output); default 8192, capped by the model
    block_size: int = _d.DEFAULT_BLOCK_SIZE   # tokens per KV block
    kv_blocks: int | None = None          # KV arena size; default room for 4 sequences of max_len
    max_num_seqs: int = _d.DEFAULT_MAX_NUM_SEQS    # rows of the batched step (requests running at once)
    prefill_chunk: int = _d.DEFAULT_PREFILL_CHUNK  # prompt tokens per prefill forward; chunks start at multiples of it
    max_num_batched_tokens: int | None = None  # token budget per step; default prefill_chunk + max_num_seqs
    max_waiting: int = _d.DEFAULT_MAX_WAITING      # waiting-queue bound; past it generate answers Overloaded
    kv_watermark_blocks: int = 1          # admission keeps this many blocks free for running requests
    graph_bucket: int = _d.DEFAULT_GRAPH_BUCKET    # batch-1 session graphs: 1 = exact-length graphs
    batch_graphs: bool = True             # capture batched decode graphs in the background (CUDA)
    max_batch_graphs: int = 48            # resident batched graphs (LRU beyond)
    # Batch-invariant GEMMs above 8 rows too (GEMV over row groups; 4-15x slower than cuBLAS
    # there, measured). Off: rows <= 8 are invariant anyway (one GEMV kernel), cuBLAS above.
    batch_invariant: bool = False
    session_ttl_s: float = _d.DEFAULT_SESSION_TTL_S  # idle sessions are reclaimable after this long (0: never)
    wait_s: float = 10.0                  # a session replay waits this long for a missing graph
    max_inflight: int = 32                # session replay: steps queued ahead of the GPU
    model_version: str = _d.DEFAULT_MODEL_VERSION  # reported in every generate reply until a reload
    tp: int = _d.DEFAULT_TP               # tensor-parallel ranks (processes; GPUs on CUDA)

    def resolved(self, model_max_positions: int) -> "EngineConfig":
        """A copy with every None filled in and every value checked (ValueError names the knob)."""
        from dataclasses import replace

        from .errors import ConfigError

        for name in ("block_size", "max_num_seqs", "prefill_chunk", "max_waiting",
                     "max_batch_graphs", "graph_bucket", "max_inflight", "tp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive int, got {v!r}")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 2):
            raise ConfigError(f"max_len must be an int >= 2, got {self.max_len!r}")
        if not self.session_ttl_s >= 0:
            raise ConfigError(f"session_ttl_s must be >= 0, got {self.session_ttl_s}")
        if self.kv_watermark_blocks < 0:
            raise ConfigError(f"kv_watermark_blocks must be >= 0, got {self.kv_watermark_blocks}")
        max_len = min(self.max_len or _d.DEFAULT_MAX_LEN, model_max_positions)
        kv_blocks = self.kv_blocks
        if kv_blocks is None:
            kv_blocks = _d.default_kv_blocks(max_len, self.block_size)
        if not isinstance(kv_blocks, int) or kv_blocks < 1:
            raise ConfigError(f"kv_blocks must be a positive int, got {kv_blocks!r}")
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = self.prefill_chunk + self.max_num_seqs
        if budget < self.prefill_chunk:
            raise ConfigError(f"max_num_batched_tokens ({budget}) must be >= prefill_chunk "
                             f"({self.prefill_chunk}): a prefill chunk is never split")
        return replace(self, max_len=max_len, kv_blocks=kv_blocks, max_num_batched_tokens=budget)

