"""ModelConfig parsing, its refusals, and RoPE inverse frequencies against transformers' own."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from graphserver.config import (RANDOM_SHAPES, ModelConfig, UnsupportedConfig, inv_freq,
                                random_shape_config, rope_attention_scaling)


def tiny(**changes):
    d = random_shape_config("tiny")
    d.update(changes)
    return d


def without(key, d=None):
    d = dict(tiny() if d is None else d)
    del d[key]
    return d


def mistral(**changes):
    d = tiny(model_type="mistral", architectures=["MistralForCausalLM"])
    d.update(changes)
    return d


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 1024}


# ----------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("shape", list(RANDOM_SHAPES))
def test_random_shapes_parse(shape):
    d = RANDOM_SHAPES[shape]
    cfg = ModelConfig.from_hf(d)
    assert cfg.hidden_size == d["hidden_size"]
    assert cfg.num_layers == d["num_hidden_layers"]
    assert cfg.num_heads % cfg.num_kv_heads == 0
    assert cfg.q_size == cfg.num_heads * cfg.head_dim
    assert cfg.kv_size == cfg.num_kv_heads * cfg.head_dim
    assert cfg.qkv_size == cfg.q_size + 2 * cfg.kv_size
    assert cfg.max_position_embeddings >= 4096
    assert cfg.tie_word_embeddings == d["tie_word_embeddings"]


def test_random_shapes_values():
    smol = ModelConfig.from_hf(RANDOM_SHAPES["smollm2-135m"])
    assert (smol.hidden_size, smol.intermediate_size, smol.num_layers, smol.num_heads,
            smol.num_kv_heads, smol.vocab_size, smol.rope_theta, smol.rms_norm_eps) == \
        (576, 1536, 30, 9, 3, 49152, 100000.0, 1e-5)
    assert smol.tie_word_embeddings and smol.rope_scaling is None
    l32 = ModelConfig.from_hf(RANDOM_SHAPES["llama-3.2-1b"])
    assert (l32.hidden_size, l32.intermediate_size, l32.num_layers, l32.num_heads,
            l32.num_kv_heads, l32.vocab_size, l32.rope_theta) == (2048, 8192, 16, 32, 8, 128256,
                                                                   500000.0)
    assert l32.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}
    l7 = ModelConfig.from_hf(RANDOM_SHAPES["llama-2-7b"])
    assert (l7.hidden_size, l7.intermediate_size, l7.num_layers, l7.num_kv_heads, l7.vocab_size,
            l7.tie_word_embeddings, l7.head_dim) == (4096, 11008, 32, 32, 32000, False, 128)
    hd = ModelConfig.from_hf(RANDOM_SHAPES["tiny-hd128"])
    assert (hd.head_dim, hd.num_heads // hd.num_kv_heads) == (128, 4)


def test_random_shape_config_is_a_copy():
    d = random_shape_config("tiny")
    d["hidden_size"] = 1
    assert RANDOM_SHAPES["tiny"]["hidden_size"] == 128
    with pytest.raises(KeyError, match="tiny-hd128"):
        random_shape_config("nope")


def test_defaults_follow_hf():
    d = tiny()
    for key in ("num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id"):
        del d[key]
    cfg = ModelConfig.from_hf(d)
    hf = LlamaConfig(**d)
    assert cfg.num_kv_heads == hf.num_key_value_heads == 4
    assert cfg.head_dim == hf.head_dim == 32
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] == 10000.0
    assert cfg.rms_norm_eps == hf.rms_norm_eps
    assert cfg.max_position_embeddings == hf.max_position_embeddings
    assert cfg.tie_word_embeddings is False
    assert cfg.bos_token_id is None and cfg.eos_token_ids == ()


def test_eos_list_and_mistral_without_window():
    cfg = ModelConfig.from_hf(mistral(sliding_window=None, eos_token_id=[2, 7]))
    assert cfg.model_type == "mistral" and cfg.eos_token_ids == (2, 7)


@pytest.mark.parametrize("shape", ["tiny", "tiny-hd128", "llama-3.2-1b"])
def test_transformers5_layout_parses_the_same(shape):
    """A config.json written by transformers 5 keeps theta and scaling in rope_parameters."""
    d = RANDOM_SHAPES[shape]
    v5 = LlamaConfig(**d).to_dict()
    assert "rope_parameters" in v5 and "rope_scaling" not in v5
    assert ModelConfig.from_hf(v5) == ModelConfig.from_hf(d)


def test_legacy_type_key_and_linear():
    cfg = ModelConfig.from_hf(tiny(rope_scaling={"type": "linear", "factor": 2.0}))
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


# ----------------------------------------------------------------------------- refusals

UNSUPPORTED = [
    ("model_type", "gpt2", tiny(model_type="gpt2")),
    ("model_type", "None", without("model_type")),
    ("hidden_act", "gelu", tiny(hidden_act="gelu")),
    ("attention_bias", "True", tiny(attention_bias=True)),
    ("mlp_bias", "True", tiny(mlp_bias=True)),
    ("rope_type", "yarn", tiny(rope_scaling={"rope_type": "yarn", "factor": 4.0})),
    ("rope_type", "dynamic", tiny(rope_scaling={"type": "dynamic", "factor": 2.0})),
    ("rope_scaling.factor", "missing", tiny(rope_scaling={"rope_type": "llama3",
                                                           "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0})),
    ("high_freq_factor", "1.0", tiny(rope_scaling={**LLAMA3, "high_freq_factor": 1.0})),
    ("rope_theta", "-1", tiny(rope_theta=-1.0)),
    ("partial_rotary_factor", "0.5", tiny(partial_rotary_factor=0.5)),
    ("sliding_window", "4096", mistral(sliding_window=4096)),
    ("sliding_window", "4096", without("sliding_window", mistral(sliding_window=None))),
    ("num_key_value_heads", "3", tiny(num_key_value_heads=3)),
    ("head_dim", "33", tiny(head_dim=33)),
    ("hidden_size", "130", tiny(hidden_size=130, head_dim=None)),
    ("vocab_size", "missing", without("vocab_size")),
    ("intermediate_size", "missing", without("intermediate_size")),
    ("num_hidden_layers", "0", tiny(num_hidden_layers=0)),
    ("num_attention_heads", "4.0", tiny(num_attention_heads=4.0)),
    ("quantization_config", "gguf", tiny(quantization_config={"quant_method": "gguf"})),
    ("rms_norm_eps", "0", tiny(rms_norm_eps=0)),
    ("eos_token_id", "x", tiny(eos_token_id=["x"])),
]


@pytest.mark.parametrize("field,value,d", UNSUPPORTED,
                         ids=[f"{f}={v}" for f, v, _ in UNSUPPORTED])
def test_unsupported_names_field_and_value(field, value, d):
    with pytest.raises(UnsupportedConfig) as info:
        ModelConfig.from_hf(d)
    assert field in str(info.value)
    assert value in str(info.value)
    assert isinstance(info.value, ValueError)


def test_from_hf_does_not_mutate_input():
    d = tiny(rope_scaling=dict(LLAMA3))
    before = repr(d)
    ModelConfig.from_hf(d)
    assert repr(d) == before


# ----------------------------------------------------------------------------- RoPE

ROPE_CASES = {
    "default": tiny(),
    "default-theta-500k": tiny(rope_theta=500000.0),
    "llama3": tiny(rope_theta=500000.0, rope_scaling=dict(LLAMA3)),
    "llama3-no-orig": tiny(rope_scaling={k: v for k, v in LLAMA3.items()
                                         if k != "original_max_position_embeddings"}),
    "linear": tiny(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    **{f"shape-{k}": v for k, v in RANDOM_SHAPES.items()},
}


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_inv_freq_matches_hf_rotary_embedding(name):
    d = ROPE_CASES[name]
    cfg = ModelConfig.from_hf(d)
    rotary = LlamaRotaryEmbedding(LlamaConfig(**d))
    ours = inv_freq(cfg)
    assert ours.dtype == torch.float32 and ours.shape == (cfg.head_dim // 2,)
    assert torch.equal(ours, rotary.inv_freq), name
    assert rope_attention_scaling(cfg) == rotary.attention_scaling


def test_inv_freq_matches_hf_llama3_init_function():
    d = RANDOM_SHAPES["llama-3.2-1b"]
    hf_freq, hf_scale = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**d), device=None)
    cfg = ModelConfig.from_hf(d)
    assert torch.equal(inv_freq(cfg), hf_freq)
    assert rope_attention_scaling(cfg) == hf_scale == 1.0
    # The scaling changes something: long wavelengths are slowed down, short ones untouched.
    plain = inv_freq(ModelConfig.from_hf({**d, "rope_scaling": None}))
    assert torch.equal(inv_freq(cfg)[:4], plain[:4])
    assert torch.allclose(inv_freq(cfg)[-4:], plain[-4:] / 32.0)


def test_attn_scale():
    cfg = ModelConfig.from_hf(RANDOM_SHAPES["tiny-hd128"])
    assert cfg.attn_scale == 128 ** -0.5
