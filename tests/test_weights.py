"""The weight loader against checkpoints that transformers itself writes."""
import json
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from custom_kernels import weights as weights_mod
from custom_kernels.weights import (ALIGN_BYTES, WeightLoadError, expected_hf_shapes,
                                    load_weights)
from graphserver.config import ModelConfig, random_shape_config


# ----------------------------------------------------------------------------- fixtures

def hf_model(tied: bool, shape: str = "tiny", seed: int = 0) -> LlamaForCausalLM:
    """A tiny HF Llama whose every parameter is distinct random data (HF inits norms to ones)."""
    d = random_shape_config(shape)
    d["tie_word_embeddings"] = tied
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**d)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def save(model, path, **kw):
    model.save_pretrained(str(path), **kw)
    return path


def model_config(model) -> ModelConfig:
    return ModelConfig.from_hf(model.config.to_dict())


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    model = hf_model(tied=False)
    return model, save(model, tmp_path_factory.mktemp("untied"))


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    model = hf_model(tied=True, shape="tiny-hd128")
    return model, save(model, tmp_path_factory.mktemp("tied"))


def expected_views(model):
    """Our view name -> the tensor it must equal, built from HF's parameters (fused by hand)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"embed": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"],
           "lm_head": sd["lm_head.weight"]}
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.ln1"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.wqkv"] = torch.cat([sd[p + f"self_attn.{x}_proj.weight"]
                                             for x in "qkv"])
        out[f"layers.{i}.wo"] = sd[p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.ln2"] = sd[p + "post_attention_layernorm.weight"]
        out[f"layers.{i}.w13"] = torch.cat([sd[p + "mlp.gate_proj.weight"],
                                            sd[p + "mlp.up_proj.weight"]])
        out[f"layers.{i}.w2"] = sd[p + "mlp.down_proj.weight"]
    return out


def assert_matches_hf(w, model, dtype):
    expected = expected_views(model)
    names = dict(w.views())
    names["lm_head"] = w.lm_head
    assert set(names) == set(expected)
    for name, view in names.items():
        assert view.dtype == dtype
        assert view.shape == expected[name].shape, name
        assert torch.equal(view, expected[name].to(dtype)), name


def rewrite_checkpoint(path, edit):
    """Apply edit(dict of tensors) to the single-file checkpoint at path."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def storage_ptr(t):
    return t.untyped_storage().data_ptr()


# ----------------------------------------------------------------------------- loading

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_untied_views_equal_hf_parameters(untied, dtype):
    model, path = untied
    w = load_weights(path, model_config(model), "cpu", dtype)
    assert_matches_hf(w, model, dtype)
    assert not w.tied and storage_ptr(w.lm_head) == storage_ptr(w.embed)  # one arena
    assert w.lm_head.data_ptr() != w.embed.data_ptr()


def test_fused_slices_in_order(untied):
    model, path = untied
    cfg = model_config(model)
    w = load_weights(path, cfg, "cpu", torch.float32)
    layer, hf = w.layers[1], model.model.layers[1]
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    assert torch.equal(layer.wqkv[:q], hf.self_attn.q_proj.weight)
    assert torch.equal(layer.wqkv[q:q + kv], hf.self_attn.k_proj.weight)
    assert torch.equal(layer.wqkv[q + kv:], hf.self_attn.v_proj.weight)
    assert torch.equal(layer.w13[:inter], hf.mlp.gate_proj.weight)
    assert torch.equal(layer.w13[inter:], hf.mlp.up_proj.weight)
    assert layer.wqkv.shape == (cfg.qkv_size, cfg.hidden_size)
    assert layer.wo.shape == (cfg.hidden_size, cfg.q_size)
    assert layer.w2.shape == (cfg.hidden_size, cfg.intermediate_size)


def test_tied_lm_head_is_the_embed_view(tied):
    model, path = tied
    assert not (path / "model.safetensors").exists() or \
        "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    w = load_weights(path, model_config(model), "cpu", torch.float32)
    assert w.tied
    assert w.lm_head is w.embed
    assert w.lm_head.data_ptr() == w.embed.data_ptr()
    assert_matches_hf(w, model, torch.float32)


@pytest.mark.parametrize("fixture", ["untied", "tied"])
def test_one_arena_aligned_and_disjoint(fixture, request):
    model, path = request.getfixturevalue(fixture)
    cfg = model_config(model)
    w = load_weights(path, cfg, "cpu", torch.bfloat16)
    base = w.arena.data_ptr()
    spans = []
    for name, view in w.views():
        assert storage_ptr(view) == storage_ptr(w.arena), name
        assert view.is_contiguous(), name
        start = view.data_ptr() - base
        assert start % ALIGN_BYTES == 0, name
        spans.append((start, start + view.numel() * view.element_size()))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= w.nbytes == w.arena.numel() * w.arena.element_size()
    # Every weight resident exactly once: the padding is all the arena holds beyond the weights.
    n_weights = sum(math_prod(s) for s in expected_hf_shapes(cfg).values())
    padding = w.nbytes - n_weights * w.arena.element_size()
    assert 0 <= padding < ALIGN_BYTES * (len(spans) + 1)


def math_prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.mark.parametrize("keep_index", [True, False])
def test_sharded_checkpoint_loads_the_same(untied, tmp_path, keep_index):
    model, single = untied
    save(model, tmp_path, max_shard_size="200KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    assert len(shards) > 2 and index.is_file()
    if not keep_index:
        index.unlink()
    cfg = model_config(model)
    a = load_weights(tmp_path, cfg, "cpu", torch.float32)
    b = load_weights(single, cfg, "cpu", torch.float32)
    for (name, va), (_, vb) in zip(a.views(), b.views()):
        assert torch.equal(va, vb), name
    assert_matches_hf(a, model, torch.float32)


def test_index_naming_missing_shard(untied, tmp_path):
    model, _ = untied
    save(model, tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / victim).unlink()
    with pytest.raises(WeightLoadError, match=victim):
        load_weights(tmp_path, model_config(model), "cpu", torch.float32)


def test_source_objects(untied):
    model, path = untied
    cfg = model_config(model)
    w = load_weights(SimpleNamespace(kind="hf", path=path), cfg, "cpu", torch.float32)
    assert_matches_hf(w, model, torch.float32)
    r = load_weights(SimpleNamespace(kind="random", path=None), cfg, "cpu", torch.float32)
    assert not torch.equal(r.embed, w.embed)


def test_rotary_buffer_is_ignored(untied, tmp_path):
    model, _ = untied
    save(model, tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.__setitem__(
        "model.layers.0.self_attn.rotary_emb.inv_freq", torch.rand(16)))
    w = load_weights(tmp_path, model_config(model), "cpu", torch.float32)
    assert_matches_hf(w, model, torch.float32)


def test_tied_with_equal_lm_head_is_accepted(tied, tmp_path):
    model, _ = tied
    save(model, tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.__setitem__(
        "lm_head.weight", t["model.embed_tokens.weight"].clone()))
    w = load_weights(tmp_path, model_config(model), "cpu", torch.float32)
    assert w.lm_head is w.embed
    assert_matches_hf(w, model, torch.float32)


def test_tied_with_different_lm_head_is_refused(tied, tmp_path):
    model, _ = tied
    save(model, tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.__setitem__(
        "lm_head.weight", t["model.embed_tokens.weight"] + 1.0))
    with pytest.raises(WeightLoadError, match="lm_head.weight.*tie_word_embeddings"):
        load_weights(tmp_path, model_config(model), "cpu", torch.float32)


# ----------------------------------------------------------------------------- errors

def drop(name):
    return lambda t: t.pop(name)


def add(name, shape):
    return lambda t: t.__setitem__(name, torch.randn(shape))


def reshape(name, shape):
    return lambda t: t.__setitem__(name, torch.randn(shape))


ERRORS = {
    "missing": (drop("model.layers.1.mlp.up_proj.weight"),
                ["missing tensor model.layers.1.mlp.up_proj.weight", "[352, 128]"]),
    "missing-untied-lm-head": (drop("lm_head.weight"), ["missing tensor lm_head.weight",
                                                         "[512, 128]"]),
    "extra": (add("model.layers.2.self_attn.q_proj.weight", (128, 128)),
              ["unexpected tensor model.layers.2.self_attn.q_proj.weight", "[128, 128]"]),
    "extra-bias": (add("model.layers.0.self_attn.q_proj.bias", (128,)),
                   ["unexpected tensor model.layers.0.self_attn.q_proj.bias", "[128]"]),
    "reshaped": (reshape("model.layers.0.self_attn.k_proj.weight", (128, 128)),
                 ["model.layers.0.self_attn.k_proj.weight", "shape [128, 128]",
                  "expected [64, 128]"]),
    "transposed": (reshape("model.layers.0.mlp.down_proj.weight", (352, 128)),
                   ["model.layers.0.mlp.down_proj.weight", "[352, 128]", "expected [128, 352]"]),
    "norm": (reshape("model.norm.weight", (127,)), ["model.norm.weight", "[127]", "[128]"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_checkpoint_names_tensor_and_shapes(untied, tmp_path, monkeypatch, case):
    model, _ = untied
    save(model, tmp_path)
    edit, needles = ERRORS[case]
    rewrite_checkpoint(tmp_path, edit)

    def no_allocation(*args, **kwargs):
        raise AssertionError("the checkpoint must be validated before the arena is allocated")

    monkeypatch.setattr(weights_mod, "_allocate", no_allocation)
    with pytest.raises(WeightLoadError) as info:
        load_weights(tmp_path, model_config(model), "cpu", torch.float32)
    for needle in needles:
        assert needle in str(info.value)


def test_all_problems_reported_at_once(untied, tmp_path):
    model, _ = untied
    save(model, tmp_path)

    def edit(t):
        t.pop("model.norm.weight")
        t["extra.weight"] = torch.randn(3)

    rewrite_checkpoint(tmp_path, edit)
    with pytest.raises(WeightLoadError) as info:
        load_weights(tmp_path, model_config(model), "cpu", torch.float32)
    assert "model.norm.weight" in str(info.value) and "extra.weight" in str(info.value)


def test_config_mismatch_is_a_shape_error(untied):
    model, path = untied
    d = model.config.to_dict()
    d["intermediate_size"] = 256
    with pytest.raises(WeightLoadError, match=r"gate_proj.weight has shape \[352, 128\], "
                                              r"expected \[256, 128\]"):
        load_weights(path, ModelConfig.from_hf(d), "cpu", torch.float32)


def test_empty_dir(tmp_path):
    cfg = ModelConfig.from_hf(random_shape_config("tiny"))
    with pytest.raises(WeightLoadError, match="no \\*.safetensors"):
        load_weights(tmp_path, cfg, "cpu", torch.float32)


def test_bad_dtype():
    cfg = ModelConfig.from_hf(random_shape_config("tiny"))
    with pytest.raises(TypeError):
        load_weights(None, cfg, "cpu", torch.int32)


# ----------------------------------------------------------------------------- random weights

@pytest.mark.parametrize("shape", ["tiny", "tiny-hd128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_weights_deterministic_per_seed(shape, dtype):
    cfg = ModelConfig.from_hf(random_shape_config(shape))
    a = load_weights(None, cfg, "cpu", dtype, seed=1)
    b = load_weights(None, cfg, "cpu", dtype, seed=1)
    c = load_weights(None, cfg, "cpu", dtype, seed=2)
    assert a.tied == cfg.tie_word_embeddings
    for (name, va), (_, vb), (_, vc) in zip(a.views(), b.views(), c.views()):
        assert va.dtype == dtype
        assert torch.isfinite(va).all(), name
        assert torch.equal(va, vb), name
        assert not torch.equal(va, vc), name


def test_random_weight_scales():
    cfg = ModelConfig.from_hf(random_shape_config("tiny-hd128"))
    w = load_weights(None, cfg, "cpu", torch.float32, seed=0)
    for name, view in w.views():
        if view.dim() == 1:
            assert abs(view.mean().item() - 1.0) < 0.01 and 0.005 < view.std().item() < 0.05
        else:
            target = view.shape[1] ** -0.5
            assert abs(view.std().item() / target - 1.0) < 0.05, name
            assert abs(view.mean().item()) < 0.1 * target, name


def hf_from_weights(w, cfg_dict) -> LlamaForCausalLM:
    """An HF model holding our arena's weights (unfused): runs our random weights through HF."""
    cfg = ModelConfig.from_hf(cfg_dict)
    model = LlamaForCausalLM(LlamaConfig(**cfg_dict)).eval()
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    sd = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.norm,
          "lm_head.weight": w.lm_head}
    for i, layer in enumerate(w.layers):
        p = f"model.layers.{i}."
        sd.update({p + "input_layernorm.weight": layer.ln1,
                   p + "self_attn.q_proj.weight": layer.wqkv[:q],
                   p + "self_attn.k_proj.weight": layer.wqkv[q:q + kv],
                   p + "self_attn.v_proj.weight": layer.wqkv[q + kv:],
                   p + "self_attn.o_proj.weight": layer.wo,
                   p + "post_attention_layernorm.weight": layer.ln2,
                   p + "mlp.gate_proj.weight": layer.w13[:inter],
                   p + "mlp.up_proj.weight": layer.w13[inter:],
                   p + "mlp.down_proj.weight": layer.w2})
    model.load_state_dict(sd, strict=True)
    return model


def test_random_model_logits_are_not_degenerate():
    d = random_shape_config("tiny")
    d["num_hidden_layers"] = 32  # as deep as the real llama-2-7b: activations must stay sane
    cfg = ModelConfig.from_hf(d)
    w = load_weights(None, cfg, "cpu", torch.float32, seed=0)
    model = hf_from_weights(w, d)
    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 9, 300, 42, 7]]), output_hidden_states=True)
        assert max(h.abs().max().item() for h in out.hidden_states) < 1e3
        logits = out.logits[0]                                    # [T, V]
        assert torch.isfinite(logits).all()
        assert 0.3 < logits.std(-1).min().item() and logits.std(-1).max().item() < 10
        greedy = model.generate(torch.tensor([[3, 17]]), max_new_tokens=24, do_sample=False)
    assert len(set(greedy[0, 2:].tolist())) > 3  # not one token repeated forever
    assert len(set(logits.argmax(-1).tolist())) > 1
