"""Tokenizer helpers, the streaming Detokenizer, generate() and the client CLI, with a byte-level
BPE tokenizer trained in-test (no model download) and the FakeEngine behind a real RPCServer."""

import os

import pytest

from client import __main__ as client_main
from client.generate import generate
from client.rpc import RemoteBadRequest, RPCClient
from client.tokenizer import (REPLACEMENT_CHAR, Detokenizer, encode_chat, encode_plain, eos_token_ids,
                              load_tokenizer)

from fake_engine import FakeEngine, next_token
from rpc_helpers import FAKE_ENGINE_ARGS, ServerThread, child_env

CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🦊🚀 and more text",
    "user: hi\nassistant: hello there, how can I help?",
] * 20
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")
TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tok.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


# -- tokenizer helpers -----------------------------------------------------------------------


def test_load_tokenizer_local(tok):
    assert tok.eos_token == "</s>" and eos_token_ids(tok) == [tok.convert_tokens_to_ids("</s>")]
    assert tok.decode(tok.encode("hello world", add_special_tokens=False)) == "hello world"


def test_load_tokenizer_never_goes_online(tmp_path):
    with pytest.raises(OSError):
        load_tokenizer(str(tmp_path / "not-a-model"))


def test_encode_chat_uses_template(tok):
    ids = encode_chat(tok, "hi there", system="be brief")
    rendered = "<s>system: be brief\n<s>user: hi there\n<s>assistant:"
    assert ids == tok.encode(rendered, add_special_tokens=False)
    assert tok.decode(ids) == rendered
    assert ids.count(tok.bos_token_id) == 3  # the template's BOS only: none added on top


def test_encode_chat_without_template_is_plain(tok_dir):
    plain = load_tokenizer(tok_dir)
    plain.chat_template = None
    assert encode_chat(plain, "hello") == encode_plain(plain, "hello") == plain.encode("hello")


# -- Detokenizer -----------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["hello world", "naïve café 🦊🚀 日本語", "emoji🦊🦊 at the end 🚀"])
def test_detokenizer_streams_stable_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    # Multi-byte characters really are split across tokens here, or the test would prove nothing.
    assert any(REPLACEMENT_CHAR in tok.decode(ids[:i]) for i in range(1, len(ids))) or text.isascii()
    d = Detokenizer(tok)
    pieces = [d.push([i]) for i in ids] + [d.flush()]
    assert "".join(pieces) == text == d.text
    assert not any(REPLACEMENT_CHAR in p for p in pieces)


def test_detokenizer_chunks_and_special_tokens(tok):
    ids = [tok.bos_token_id] + tok.encode("héllo 🦊 world", add_special_tokens=False) + [tok.eos_token_id]
    d = Detokenizer(tok)
    pieces = [d.push(ids[i:i + 3]) for i in range(0, len(ids), 3)] + [d.flush()]
    assert "".join(pieces) == "héllo 🦊 world"  # special tokens skipped


def test_detokenizer_flush_emits_an_incomplete_tail(tok):
    ids = tok.encode("ab🦊", add_special_tokens=False)
    cut = next(i for i in range(len(ids)) if tok.decode(ids[:i]).endswith(REPLACEMENT_CHAR))
    d = Detokenizer(tok)
    assert REPLACEMENT_CHAR not in d.push(ids[:cut])
    assert d.flush().endswith(REPLACEMENT_CHAR)  # generation ended mid-character: say so


# -- generate --------------------------------------------------------------------------------


def _expected(prompt_ids, n, vocab, stops=()):
    out, t = [], prompt_ids[-1]
    while len(out) < n:
        t = next_token(t, vocab)
        out.append(t)
        if t in stops:
            break
    return out


@pytest.fixture
def served(tok, tmp_path_factory):
    engine = FakeEngine(vocab_size=len(tok), max_len=256, eos_token_ids=(tok.eos_token_id,))
    st = ServerThread(engine, f"ipc://{tmp_path_factory.mktemp('gen')}/s.sock")
    with RPCClient(st.endpoint, timeout_s=TIMEOUT_S) as c:
        yield st.engine, c
    st.stop()


@pytest.mark.parametrize("use_graphs", [True, False])
def test_generate_greedy(served, tok, use_graphs):
    engine, c = served
    pieces = []
    r = generate(c, tok, "hello", 37, {}, stream=pieces.append, use_graphs=use_graphs, chunk=16,
                 stop_token_ids=[])
    assert r["prompt_ids"] == encode_chat(tok, "hello")
    assert r["tokens"] == _expected(r["prompt_ids"], 37, len(tok))
    assert r["mode"] == ("replay" if use_graphs else "step") and not r["stopped"]
    assert "".join(pieces) == r["text"] == tok.decode(r["tokens"], skip_special_tokens=True)
    calls = [m for m, _ in engine.calls]
    if use_graphs:
        # First token from the prefill logits, then chunks of <= 16 steps: 1 + 16 + 16 + 4.
        assert [p["steps"] for m, p in engine.calls if m == "replay_seq"] == [16, 16, 4]
        assert "step" not in calls
    else:
        assert calls.count("step") == 36 and "replay_seq" not in calls
    assert engine.sessions == {} and calls[-1] == "kv_free"
    assert r["timing"]["ms_per_token"] is not None and r["timing"]["prefill_ms"] >= 0


@pytest.mark.parametrize("use_graphs", [True, False])
def test_generate_stops_at_a_stop_token(served, tok, use_graphs):
    engine, c = served
    full = _expected(encode_chat(tok, "hi"), 40, len(tok))
    stop = full[6]
    assert stop not in full[:6]
    r = generate(c, tok, "hi", 40, {}, use_graphs=use_graphs, chunk=4, stop_token_ids=[stop])
    assert r["tokens"] == full[:7] and r["stopped"]
    assert engine.sessions == {}


def test_generate_default_stops_are_the_tokenizer_eos(served, tok):
    engine, c = served
    prompt = [tok.bos_token_id, 5, 0]  # next_token(0) == 1 == "</s>"
    assert next_token(0, len(tok)) == tok.eos_token_id
    r = generate(c, tok, prompt, 10, {})
    assert r["tokens"] == [tok.eos_token_id] and r["stopped"] and r["text"] == ""


def test_generate_repetition_penalty_uses_step(served, tok):
    engine, c = served
    r = generate(c, tok, "hello", 5, {"repetition_penalty": 1.2}, stop_token_ids=[])
    assert r["mode"] == "step" and len(r["tokens"]) == 5
    assert not any(m == "replay_seq" for m, _ in engine.calls)


def test_generate_sends_sampling_to_the_server(served, tok):
    engine, c = served
    generate(c, tok, "hello", 4, {"temperature": 0.7, "top_k": 5, "seed": 11}, stop_token_ids=[])
    sampling = next(p["sampling"] for m, p in engine.calls if m == "replay_seq")
    assert sampling == {"greedy": False, "temperature": 0.7, "top_k": 5, "top_p": 1.0, "seed": 11}


def test_generate_frees_the_session_on_error(served, tok):
    engine, c = served
    with pytest.raises(RemoteBadRequest, match="max_len"):
        generate(c, tok, "hello", 400, {}, stop_token_ids=[])  # runs past the engine's max_len 256
    assert engine.sessions == {}


def test_generate_from_ids_without_tokenizer(served):
    engine, c = served
    r = generate(c, None, [3, 4], 6, {}, chunk=2)
    assert r["tokens"] == _expected([3, 4], 6, engine.vocab_size) and r["text"] is None


# -- CLI -------------------------------------------------------------------------------------


def test_cli_end_to_end(tok_dir, tok, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    rc = client_main.main(["hello", "--model", tok_dir, "--max-new-tokens", "12", "--timeout", "20",
                           *[f"--server-arg={a}" for a in FAKE_ENGINE_ARGS]])
    out, err = capsys.readouterr()
    assert rc == 0
    tokens = _expected(encode_chat(tok, "hello"), 12, len(tok), stops={tok.eos_token_id})
    assert out == tok.decode(tokens, skip_special_tokens=True) + "\n"
    assert f"[{len(tokens)} tokens" in err and "ms/token" in err and "mode replay" in err


def test_cli_without_tokenizer_says_a_real_model_is_needed(monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    rc = client_main.main(["hello", *[f"--server-arg={a}" for a in FAKE_ENGINE_ARGS]])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert "needs a real model" in err


def test_cli_rejects_model_with_endpoint(capsys):
    with pytest.raises(SystemExit):
        client_main.main(["hi", "--endpoint", "ipc:///nonexistent", "--model", "x"])
    assert "cannot go with --endpoint" in capsys.readouterr().err


def test_cli_reports_dead_endpoint(tmp_path, capsys):
    rc = client_main.main(["hi", "--endpoint", f"ipc://{tmp_path}/none.sock", "--timeout", "0.5"])
    assert rc == 1 and "RPCTimeout" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "none.sock")
