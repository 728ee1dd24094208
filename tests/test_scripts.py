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


# -- command lines: refusals, defaults in --help, dtype spellings --------------------------------

import argparse  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402

import _common  # noqa: E402
import bench_decode  # noqa: E402
import bench_nvtx  # noqa: E402
import bench_report  # noqa: E402
import debug_parity_one_step  # noqa: E402
import debug_parity_seq8  # noqa: E402

SCRIPTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
WITH_MODEL_ARGS = [run_custom_50, direct_custom_decode_500, debug_parity_one_step, debug_parity_seq8]


@pytest.mark.parametrize("script", WITH_MODEL_ARGS)
@pytest.mark.parametrize("argv, needle", [(["--device", "tpu"], "unknown device 'tpu'"),
                                          (["--dtype", "int8"], "unknown dtype 'int8'")])
def test_bad_device_and_dtype_are_one_line_refusals(script, argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and "Traceback" not in err


def test_dtype_spellings_reach_the_scripts_as_one_name():
    p = argparse.ArgumentParser()
    _common.add_model_args(p)
    for spelling, canon in [("bfloat16", "bf16"), ("half", "fp16"), ("float16", "fp16"), ("float", "fp32"),
                            ("FP32", "fp32"), ("auto", "auto")]:
        assert p.parse_args(["--dtype", spelling]).dtype == canon
    assert p.parse_args(["--device", "CUDA:0"]).device == "cuda:0"


@pytest.mark.parametrize("script, needles", [
    (run_custom_50, ["tokens to generate (default: 50)", "(default: 32)", "(default: 600.0)"]),
    (direct_custom_decode_500, ["tokens to generate (default: 500)"]),
    (bench_decode, ["(default: 512)", "(default: 4160)", "(default: bf16)"]),
    (bench_nvtx, ["(default: 200000)"]),
    (bench_report, ["decode.png)"]),
])
def test_help_shows_defaults(script, needles, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    for n in needles:
        assert n in text


def test_bench_decode_refuses_fp32(capsys):
    with pytest.raises(SystemExit) as exc:
        bench_decode.main(["--dtype", "float32"])
    assert exc.value.code == 2 and "bf16 or fp16" in capsys.readouterr().err


def _bash(script, *args, cwd):
    return subprocess.run(["bash", os.path.join(SCRIPTS_DIR, script), *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env={**os.environ, "OUT": str(cwd / "out"), "LOGS": str(cwd / "logs")})


@pytest.mark.parametrize("script", ["gpu_suite.sh", "profile_nsys.sh"])
def test_shell_scripts_help(script, tmp_path):
    p = _bash(script, "--help", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith(f"usage: bash scripts/{script}") and p.stderr == ""
    assert not os.listdir(tmp_path)  # --help ran nothing and wrote nothing


def test_gpu_suite_refuses_no_phase_and_unknown_phases(tmp_path):
    p = _bash("gpu_suite.sh", cwd=tmp_path)
    assert p.returncode == 2 and "usage:" in p.stderr
    p = _bash("gpu_suite.sh", "build", "bogus", cwd=tmp_path)
    assert p.returncode == 2 and "unknown phase 'bogus'" in p.stderr
    assert not os.listdir(tmp_path)  # refused before the first phase ran


def test_run_custom_50_names_a_dead_endpoint_in_one_line(tmp_path, out_dir, capsys):
    rc = run_custom_50.main(["--model", "random:tiny", "--endpoint", f"ipc://{tmp_path}/gone.sock"])
    err = capsys.readouterr().err
    assert rc == 1 and "run_custom_50: error: no server at" in err and "Traceback" not in err
