"""The parity scripts, run as a user runs them, on the CPU (fp32): default model and a random GQA
shape with head_dim 128 (GQA ratio 4). Each exits non-zero past its tolerance."""
import pytest

import debug_parity_one_step
import debug_parity_seq8


@pytest.mark.parametrize("script", [debug_parity_one_step, debug_parity_seq8])
def test_parity_random_gqa_hd128(script, capsys):
    assert script.main(["--model", "random:tiny-hd128", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "BAD" not in out and "within tolerance" in out


@pytest.mark.slow
@pytest.mark.parametrize("script", [debug_parity_one_step, debug_parity_seq8])
def test_parity_default_model(script, default_model_dir, capsys):
    assert script.main(["--model", str(default_model_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "BAD" not in out
    assert "layer_out.29" in out or "K.29" in out       # every one of the 30 layers compared


def test_parity_tolerance_catches_a_wrong_weight(monkeypatch, capsys):
    """The check can fail: perturb one weight of ours and the script must exit 1."""
    import graphserver.parity as parity
    real = parity.load_pair

    def broken(*a, **k):
        pair = real(*a, **k)
        pair.runner.w.layers[1].w2.mul_(1.01)
        return pair

    monkeypatch.setattr(parity, "load_pair", broken)
    assert debug_parity_one_step.main(["--model", "random:tiny-hd128", "--device", "cpu"]) == 1
    assert "BAD" in capsys.readouterr().out
