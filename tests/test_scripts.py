"""The scripts' CPU paths, run the way a user runs them."""
import json

import pytest

import direct_custom_decode_500
import run_custom_50


@pytest.fixture()
def out_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHSERVER_OUTPUT", str(tmp_path))
    return tmp_path


@pytest.mark.slow
def test_run_custom_50_over_zeromq_equals_hf_greedy(default_model_dir, out_dir):
    """End to end: server process, ZeroMQ RPCs, real default model; tokens equal HF greedy."""
    rc = run_custom_50.main(["--model", str(default_model_dir), "--device", "cpu"])
    assert rc == 0
    rec = json.loads((out_dir / "run_custom_50.json").read_text())
    assert rec["backend"] == "cpu" and len(rec["tokens"]) == 50
    assert rec["matches_hf_greedy"] is True and rec["tokens"] == rec["hf_greedy_tokens"]
    assert rec["model"] == str(default_model_dir)
    assert rec["text"].strip() and rec["prompt_ids"] and rec["ms_per_token"] > 0
    for suffix in ("_tokens.txt", "_text.txt", ".log"):
        assert (out_dir / f"run_custom_50{suffix}").stat().st_size > 0
    toks = (out_dir / "run_custom_50_tokens.txt").read_text().split()
    assert [int(t) for t in toks] == rec["tokens"]


def test_direct_decode_random_model(out_dir):
    rc = direct_custom_decode_500.main(["--model", "random:tiny", "--device", "cpu",
                                        "--steps", "40"])
    assert rc == 0
    rec = json.loads((out_dir / "direct_custom_decode_500.json").read_text())
    assert len(rec["tokens"]) == 40 and rec["backend"] == "cpu"
    assert rec["eager_steps"] == 39 and rec["graph_stats"] is None


@pytest.mark.parametrize("script", [run_custom_50, direct_custom_decode_500])
def test_help_tells_the_truth(script, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--model" in text and "random:<shape>" in text
