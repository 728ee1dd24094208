"""Tokenizer helpers, the streaming Detokenizer, generate() and the client CLI, with a byte-level
BPE tokenizer trained in-test (no model download) and the FakeEngine behind a real RPCServer."""

import os

import pytest

from client import __main__ as client_main
from client.generate import MAX_AUTO_CHUNK, PromptTooLong, generate
from client.rpc import RemoteBadRequest, RPCClient
from client.tokenizer import (REPLACEMENT_CHAR, Detokenizer, encode_chat, encode_plain, eos_token_ids,
                              load_tokenizer)

from fake_engine import next_token
from rpc_helpers import FAKE_ENGINE_ARGS, ClientFakeEngine, ServerThread, child_env, send_reply, ScriptedRouter

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
    engine = ClientFakeEngine(vocab_size=len(tok), max_len=256, eos_token_ids=(tok.eos_token_id,))
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
@pytest.mark.parametrize("stop_strings", [(), ("never-there",)])
def test_generate_stops_at_a_stop_token(served, tok, use_graphs, stop_strings):
    # With stop strings the text goes token by token; a stop token later in the same chunk must
    # not turn the chunk's earlier tokens into text a second time.
    engine, c = served
    full = _expected(encode_chat(tok, "hi"), 40, len(tok))
    stop = full[6]
    assert stop not in full[:6]
    pieces = []
    r = generate(c, tok, "hi", 40, {}, use_graphs=use_graphs, stream=pieces.append, chunk=4,
                 stop_token_ids=[stop], stop_strings=list(stop_strings))
    assert r["tokens"] == full[:7] and r["stopped"] and r["finish_detail"] == f"stop token {stop}"
    assert r["text"] == tok.decode(full[:6], skip_special_tokens=True) == "".join(pieces)
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


def test_generate_stop_string_cuts_text_and_stream(served, tok):
    engine, c = served
    full = _expected(encode_chat(tok, "hello"), 60, len(tok))
    full_text = tok.decode(full, skip_special_tokens=True)
    # A stop string that spans tokens, first found well inside the text.
    a = next(i for i in range(10, len(full_text) - 4)
             if full_text.find(full_text[i:i + 4]) == i and full_text[i:i + 4].isascii()
             and full_text[i:i + 4].isprintable())
    stop = full_text[a:a + 4]
    pieces = []
    r = generate(c, tok, "hello", 60, {}, stream=pieces.append, chunk=7, stop_token_ids=[],
                 stop_strings=["never-there", stop])
    assert r["text"] == full_text[:a] == "".join(pieces)
    assert r["finish_reason"] == "stop" and r["finish_detail"] == f"stop string {stop!r}" and r["stopped"]
    # The tokens end with the one that completed the stop string.
    k = len(r["tokens"])
    assert r["tokens"] == full[:k]
    assert stop in tok.decode(full[:k], skip_special_tokens=True)
    assert stop not in tok.decode(full[:k - 1], skip_special_tokens=True)
    assert engine.sessions == {}


def test_generate_stop_string_never_streams_a_partial_match(served, tok):
    engine, c = served
    full_text = tok.decode(_expected(encode_chat(tok, "hi"), 30, len(tok)), skip_special_tokens=True)
    # The first 3 characters of the text, then a character that never follows: a partial match
    # held back, then released, and the text must come out whole.
    stop = full_text[:3] + "\x00"
    pieces = []
    r = generate(c, tok, "hi", 30, {}, stream=pieces.append, chunk=1, stop_token_ids=[], stop_strings=[stop])
    assert r["text"] == full_text == "".join(pieces) and r["finish_reason"] == "length"


def test_generate_context_full_is_a_normal_finish(served, tok):
    engine, c = served
    prompt = encode_chat(tok, "hello")
    r = generate(c, tok, "hello", 400, {}, stop_token_ids=[], max_len=engine.max_len, chunk=32)
    assert len(r["tokens"]) == engine.max_len - len(prompt)
    assert r["tokens"] == _expected(prompt, engine.max_len - len(prompt), len(tok))
    assert r["finish_reason"] == "length" and r["finish_detail"] == f"context full (max_len {engine.max_len})"
    short = generate(c, tok, "hello", 5, {}, stop_token_ids=[], max_len=engine.max_len)
    assert short["finish_detail"] == "max_new_tokens 5"
    with pytest.raises(PromptTooLong, match="leaves no room"):
        generate(c, tok, [3] * engine.max_len, 5, {}, max_len=engine.max_len)
    assert engine.sessions == {}


def test_generate_raw_skips_the_template(served, tok):
    engine, c = served
    r = generate(c, tok, "hello there", 3, {}, stop_token_ids=[], raw=True)
    assert r["prompt_ids"] == encode_plain(tok, "hello there") != encode_chat(tok, "hello there")
    with pytest.raises(ValueError, match="chat template"):
        generate(c, tok, "x", 3, {}, raw=True, system="be brief")


def test_generate_adapts_its_chunk_to_the_step_time(served, tok):
    engine, c = served
    pieces = []
    r = generate(c, tok, "hello", 200, {}, stream=pieces.append, stop_token_ids=[])
    assert r["tokens"] == _expected(r["prompt_ids"], 200, len(tok)) and "".join(pieces) == r["text"]
    # Streaming starts with one token per call; the fake's near-instant steps then let it grow.
    # Nobody streaming: the cap from the start.
    assert r["chunks"][0] == 1 and 16 <= max(r["chunks"]) <= MAX_AUTO_CHUNK and sum(r["chunks"]) == 199
    quiet = generate(c, tok, "hello", 200, {}, stop_token_ids=[])
    assert quiet["chunks"][0] == MAX_AUTO_CHUNK and quiet["tokens"] == r["tokens"]


def test_generate_sends_its_timeout_as_deadline(served, tok):
    engine, c = served
    generate(c, tok, "hello", 20, {}, chunk=8, stop_token_ids=[])
    assert engine.deadlines == [("kv_init", TIMEOUT_S)] + [("replay_seq", TIMEOUT_S)] * 3


# -- CLI -------------------------------------------------------------------------------------


def _server_args(factory="rpc_helpers:ClientFakeEngine", *extra):
    return [f"--server-arg={a}" for a in ("--engine-factory", factory, *extra)]


def test_cli_end_to_end(tok_dir, tok, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    rc = client_main.main(["hello", "--model", tok_dir, "--max-new-tokens", "12", "--timeout", "20",
                           *_server_args()])
    out, err = capsys.readouterr()
    assert rc == 0
    tokens = _expected(encode_chat(tok, "hello"), 12, len(tok), stops={tok.eos_token_id})
    assert out == tok.decode(tokens, skip_special_tokens=True) + "\n"
    assert f"[{len(tokens)} tokens" in err and "ms/token" in err and "mode replay" in err
    assert "finish length: max_new_tokens 12" in err


def test_cli_stop_raw_and_context_full(tok_dir, tok, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    prompt = encode_plain(tok, "hello")
    full = _expected(prompt, 40, len(tok))
    full_text = tok.decode(full, skip_special_tokens=True)
    stop = full_text[12:15]
    assert full_text.find(stop) == 12
    rc = client_main.main(["hello", "--raw", "--model", tok_dir, "--stop", stop, "--max-new-tokens", "40",
                           "--chunk", "4", *_server_args()])
    out, err = capsys.readouterr()
    assert rc == 0 and out == full_text[:12] + "\n"
    assert f"finish stop: stop string {stop!r}" in err
    # The server's max_len ends the reply before --max-new-tokens does: a normal finish.
    rc = client_main.main(["hello", "--raw", "--model", tok_dir, "--max-new-tokens", "100", "--chunk", "16",
                           *_server_args("rpc_helpers:ClientFakeEngine", "--max-len", "30")])
    out, err = capsys.readouterr()
    assert rc == 0 and out == tok.decode(full[:30 - len(prompt)], skip_special_tokens=True) + "\n"
    assert "finish length: context full (max_len 30)" in err


def test_cli_tokenizer_option_for_models_without_one(tok_dir, tok, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    args = ["hello", "--model", tok_dir, "--max-new-tokens", "5", *_server_args("rpc_helpers:TokenizerlessFakeEngine")]
    rc = client_main.main(args)
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and "pass --tokenizer DIR" in err
    rc = client_main.main(args + ["--tokenizer", tok_dir])
    out, err = capsys.readouterr()
    tokens = _expected(encode_chat(tok, "hello"), 5, len(tok), stops={tok.eos_token_id})
    assert rc == 0 and out == tok.decode(tokens, skip_special_tokens=True) + "\n"


def test_cli_rejects_model_with_endpoint(capsys):
    with pytest.raises(SystemExit):
        client_main.main(["hi", "--endpoint", "ipc:///nonexistent", "--model", "x"])
    assert "cannot go with --endpoint" in capsys.readouterr().err


def test_cli_reports_dead_endpoint(tmp_path, capsys):
    rc = client_main.main(["hi", "--endpoint", f"ipc://{tmp_path}/none.sock", "--timeout", "0.5"])
    err = capsys.readouterr().err
    assert rc == 1 and "no server at" in err and "does not exist" in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "none.sock")


def test_cli_sends_the_auth_token(tmp_path, tok_dir, monkeypatch, capsys):
    ep = f"ipc://{tmp_path}/auth.sock"

    def refuse_wrong_token(sock, frames, req):
        from graphserver import protocol
        if req.get("auth") != "good":
            return send_reply(sock, frames, protocol.make_error(req["id"], "Unauthorized", "wrong token"))
        send_reply(sock, frames, protocol.make_ok(req["id"], {"model": "m", "tokenizer_path": None}))

    router = ScriptedRouter(ep, refuse_wrong_token)
    try:
        monkeypatch.delenv("GRAPHSERVER_AUTH_TOKEN", raising=False)
        rc = client_main.main(["hi", "--endpoint", ep, "--auth-token", "bad"])
        err = capsys.readouterr().err
        assert rc == 2 and "refused the auth token" in err
        monkeypatch.setenv("GRAPHSERVER_AUTH_TOKEN", "good")
        rc = client_main.main(["hi", "--endpoint", ep])
        assert rc == 2 and "pass --tokenizer DIR" in capsys.readouterr().err  # got past the handshake
        assert [r.get("auth") for _, r in router.seen] == ["bad", "good"]
    finally:
        router.stop()
