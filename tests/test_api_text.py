"""The front end's text layer: torch-free import, tokenizer and chat template equal to HF's,
incremental detokenizing that never emits a broken character, stop strings."""

import os
import random
import subprocess
import sys

import pytest

from graphserver.api.text import Detokenizer, TemplateError, TextTokenizer
from graphserver.stops import StopStrings

from rpc_helpers import REPO_ROOT

ALPHABET = ["a", "b", " ", "\n", "é", "ü", "ß", "日", "本", "語", "🙂", "👍🏽", "∑", "—", "Ж", "x", "y", ".", "ab"]


def _rng() -> tuple[random.Random, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    return random.Random(seed), seed


@pytest.fixture(scope="module")
def tok(default_model_dir):
    return TextTokenizer(str(default_model_dir))


@pytest.fixture(scope="module")
def hf_tok(default_model_dir):
    from client.tokenizer import load_tokenizer

    return load_tokenizer(str(default_model_dir))


def test_importing_the_front_end_does_not_import_torch():
    code = ("import sys; import graphserver.api.app, graphserver.api.server, graphserver.cli, client.aio; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_encoding_and_chat_template_equal_hf(tok, hf_tok):
    from client.tokenizer import encode_chat, encode_plain

    for text in ("Hello there", "  leading spaces and 🙂 emoji", "日本語\nnew line"):
        assert tok.encode_plain(text) == encode_plain(hf_tok, text)
        assert tok.encode_chat([{"role": "user", "content": text}]) == encode_chat(hf_tok, text)
        assert (tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}])
                == encode_chat(hf_tok, text, system="Be brief."))
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert tok.render_chat(conv) == hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    rng, seed = _rng()
    ids = [rng.randrange(tok.vocab_size) for _ in range(97)]
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True), seed


def test_no_chat_template_is_a_clear_error(tmp_path, default_model_dir):
    (tmp_path / "tokenizer.json").write_bytes((default_model_dir / "tokenizer.json").read_bytes())
    bare = TextTokenizer(str(tmp_path))
    with pytest.raises(TemplateError, match="no chat template"):
        bare.encode_chat([{"role": "user", "content": "x"}])
    assert bare.encode_plain("x")


def test_detokenizer_streams_whole_characters_only(tok):
    rng, seed = _rng()
    for _ in range(20):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(5, 40)))
        ids = tok.encode_plain(text)
        detok, pieces, i = Detokenizer(tok), [], 0
        while i < len(ids):
            n = rng.randrange(1, 4)  # the engine may send several tokens per reply
            pieces.append(detok.push(ids[i:i + n]))
            i += n
        pieces.append(detok.flush())
        assert all("\ufffd" not in p for p in pieces), (seed, text, pieces)
        assert "".join(pieces) == detok.text == text == tok.decode(ids), (seed, text)


def test_detokenizer_holds_back_an_incomplete_character_until_flush(tok):
    # A character the tokenizer splits over several byte tokens, cut before its last one.
    char = next(c for c in "語本🙂Ж" if len(tok.encode_plain("ok " + c)) > len(tok.encode_plain("ok ")) + 1)
    ids = tok.encode_plain("ok " + char)[:-1]
    partial = tok.decode(ids)
    assert partial.endswith("\ufffd")
    detok = Detokenizer(tok)
    pushed = detok.push(ids)
    # The broken tail is held back (with the space, when a token holds both).
    assert "\ufffd" not in pushed and pushed.strip() == "ok" and partial.startswith(pushed)
    flushed = detok.flush()  # the end shows what a full decode shows
    assert "\ufffd" in flushed and pushed + flushed == detok.text == partial


def _reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Grow the text a character at a time and stop at the first prefix that ends with a stop
    string (the longest, if several end there), as a model that stops on a match would."""
    for end in range(1, len(text) + 1):
        ending = [len(s) for s in stops if text[:end].endswith(s)]
        if ending:
            return text[:end - max(ending)], True
    return text, False


def test_stop_strings_against_a_reference():
    rng, seed = _rng()
    letters = "abcab 🙂é"
    for _ in range(300):
        text = "".join(rng.choice(letters) for _ in range(rng.randrange(0, 30)))
        stops = ["".join(rng.choice(letters) for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 4))]
        s, out, i = StopStrings(stops), [], 0
        while i < len(text):
            n = rng.randrange(1, 5)
            out.append(s.push(text[i:i + n]))
            i += n
            if s.matched is not None:
                break
        out.append(s.flush())
        want, matched = _reference_cut(text, stops)
        assert "".join(out) == want, (seed, text, stops, out)
        assert (s.matched is not None) == matched, (seed, text, stops)


def test_stop_strings_the_earliest_end_wins():
    # "béb" starts before "é" but would end after it: generation stops at "é", however the text
    # is split (CI found the split "bbacbéb" | "abb" cutting at "béb" instead).
    for pieces in (["bbacbéb", "abb"], ["b", "bacbé", "babb"], list("bbacbébabb")):
        s = StopStrings([" bb", "é", "béb"])
        out = "".join(s.push(p) for p in pieces) + s.flush()
        assert out == "bbacb" and s.matched == "é", pieces
    s = StopStrings(["cd", "bcd"])  # both end at the same place: the longer one starts earlier
    assert s.push("abcde") == "a" and s.matched == "bcd"


def test_stop_strings_hold_back_only_possible_prefixes():
    s = StopStrings(["END"])
    assert s.push("abcE") == "abc"  # "E" may start "END"
    assert s.push("x") == "Ex"  # it did not
    assert s.push("EN") == ""
    assert s.push("D and more") == "" and s.matched == "END"
    assert s.push("later") == "" and s.flush() == ""
    plain = StopStrings([])
    assert plain.push("abc") == "abc" and plain.flush() == ""


def test_sse_template_writes_the_bytes_of_the_full_event():
    """The per-token SSE builder (a rendered placeholder filled by joins) against the pydantic path,
    on random texts: quotes, backslashes, control characters, NULs, the placeholder's own letters."""
    from graphserver.api import schemas
    from graphserver.api.app import sse, sse_template

    rng, seed = _rng()
    alphabet = ALPHABET + ['"', "\\", "\x00", "\t", "\u2028", "text", "\\u0000", "}", "{"]

    def completion(text):
        return sse(schemas.CompletionChunk(id="cmpl-1", created=7, model='m"1',
                                           choices=[schemas.CompletionChoice(text=text)]), include_usage=False)

    def chat(text):
        return sse(schemas.ChatCompletionChunk(id="chatcmpl-2", created=9, model="m",
                                               choices=[schemas.ChatChunkChoice(delta=schemas.ChatDelta(content=text))]))

    for full in (completion, chat):
        fast = sse_template(full)
        for _ in range(200):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
            assert fast(text) == full(text), (seed, text)
    with pytest.raises(ValueError):
        sse_template(lambda text: f"data: {text}\n\n")  # the text is not in it as JSON
