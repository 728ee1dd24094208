"""The command lines: every user mistake ends in one line and exit code 2 (no traceback, not said
twice through `python -m client`), --help tells the true defaults, and the server's parsed options
reach the engine and the RPC server as documented."""

import argparse
import os
import shutil
import socket
import subprocess
import sys

import pytest

from client import __main__ as client_main
from graphserver import __main__ as server_main
from graphserver import argtypes, defaults

from rpc_helpers import child_env

RUN_TIMEOUT_S = 120


def run(*argv, env=None):
    """Run `python *argv` from the repo; -> (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                       env=env or child_env(), stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def error_lines(stderr):
    """stderr without argparse's usage block."""
    lines = stderr.splitlines()
    return [ln for ln in lines if not ln.startswith("usage:") and not ln.startswith(" ")]


def assert_one_line_refusal(rc, out, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err and out == ""
    lines = error_lines(err)
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


# -- argument types -----------------------------------------------------------------------------


@pytest.mark.parametrize("spellings, canon", [(("bf16", "bfloat16", "BF16"), "bf16"),
                                              (("fp16", "float16", "half", "Half"), "fp16"),
                                              (("fp32", "float32", "float"), "fp32"), (("auto",), "auto")])
def test_dtype_spellings(spellings, canon):
    for s in spellings:
        assert argtypes.dtype(s) == canon
    with pytest.raises(argparse.ArgumentTypeError, match="unknown dtype 'int8'"):
        argtypes.dtype("int8")


def test_number_types_refuse_with_a_reason():
    assert argtypes.positive_int("3") == 3
    for bad in ("0", "-5", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            argtypes.positive_int(bad)
    assert argtypes.positive_seconds("0.25") == 0.25
    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            argtypes.positive_seconds(bad)
    assert argtypes.nonneg_seconds("0") == 0.0
    assert argtypes.log_level("warning") == "WARNING"
    assert argtypes.device("CUDA:1") == "cuda:1"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown device 'tpu'"):
        argtypes.device("tpu")


def test_endpoints_for_bind_and_connect(tmp_path):
    assert argtypes.parse_endpoint("tcp://127.0.0.1:0", bind=True).port is None
    assert argtypes.parse_endpoint("tcp://*:*", bind=True).is_loopback is False
    assert argtypes.parse_endpoint("tcp://[::1]:5000", bind=False).is_loopback
    assert argtypes.parse_endpoint("tcp://localhost:5000", bind=False).is_loopback
    assert not argtypes.parse_endpoint("tcp://10.1.2.3:5000", bind=True).is_loopback
    assert not argtypes.parse_endpoint("tcp://example.org:5000", bind=False).is_loopback
    assert argtypes.parse_endpoint(f"ipc://{tmp_path}/s.sock", bind=True).is_loopback
    with pytest.raises(ValueError, match="does not exist"):
        argtypes.parse_endpoint(f"ipc://{tmp_path}/no/dir/s.sock", bind=True)
    with pytest.raises(ValueError, match="longer than the OS limit"):
        argtypes.parse_endpoint("ipc:///tmp/" + "x" * 200, bind=False)
    with pytest.raises(ValueError, match="port must be 1..65535"):
        argtypes.parse_endpoint("tcp://127.0.0.1:0", bind=False)


def test_prog_names():
    assert argtypes.prog_name("python -m client", "/venv/bin/graphclient") == "graphclient"
    assert argtypes.prog_name("python -m client", "/repo/client/__main__.py") == "python -m client"
    assert argtypes.prog_name("python -m graphserver", "/usr/bin/python3") == "python -m graphserver"


# -- the server's options -----------------------------------------------------------------------


def server_help():
    return server_main.build_parser(prog="graphserver").format_help()


def test_server_help_shows_true_defaults():
    text = " ".join(server_help().split())  # unwrap argparse's line breaks
    d = defaults
    assert f"default: {d.DEFAULT_MAX_LEN}, or the model's max_position_embeddings" in text
    assert f"tokens per KV block (default: {d.DEFAULT_BLOCK_SIZE})" in text
    blocks = d.default_kv_blocks(d.DEFAULT_MAX_LEN, d.DEFAULT_BLOCK_SIZE)
    assert blocks == 4 * 8192 // 16 and f"= {blocks} at the defaults" in text
    assert f"(default: {d.DEFAULT_SESSION_TTL_S:g})" in text and "(default: 1, exact-length graphs)" in text
    assert "--allow-remote" in text and "--auth-token" in text
    assert "--engine-factory" not in text  # test-only, hidden


def test_server_args_reach_engine_and_server(tmp_path):
    p = server_main.build_parser()
    args = p.parse_args(["--model", "random:tiny", "--dtype", "bfloat16", "--log-level", "debug",
                         "--max-len", "64", "--endpoint", f"ipc://{tmp_path}/s.sock",
                         "--engine-factory", "m:f"])
    server_main.check_args(p, args, environ={})
    assert args.log_level == "DEBUG" and args.engine_factory == "m:f"  # hidden, but it works
    assert server_main.engine_kwargs(args) == {"model": "random:tiny", "device": "auto", "dtype": "bf16",
                                               "max_len": 64}
    assert server_main.server_kwargs(args) == {"endpoint": f"ipc://{tmp_path}/s.sock",
                                               "max_msg_size": 64 * 1024 * 1024, "allow_remote": False,
                                               "auth_token": None}


def test_remote_binding_needs_the_flag_and_a_token(capsys):
    p = server_main.build_parser(prog="graphserver")
    with pytest.raises(SystemExit) as ei:
        server_main.check_args(p, p.parse_args(["--endpoint", "tcp://0.0.0.0:5555"]), environ={})
    assert ei.value.code == 2 and "add --allow-remote" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        server_main.check_args(p, p.parse_args(["--endpoint", "tcp://*:5555", "--allow-remote"]), environ={})
    assert "needs a shared token" in capsys.readouterr().err
    args = p.parse_args(["--endpoint", "tcp://0.0.0.0:5555", "--allow-remote"])
    server_main.check_args(p, args, environ={defaults.AUTH_TOKEN_ENV: "tok"})
    assert server_main.server_kwargs(args)["auth_token"] == "tok" and args.allow_remote
    args = p.parse_args(["--auth-token", "flag", "--endpoint", "tcp://127.0.0.1:0"])
    server_main.check_args(p, args, environ={defaults.AUTH_TOKEN_ENV: "env"})
    assert args.auth_token == "flag"  # the flag wins over the environment


@pytest.mark.parametrize("argv, needle", [
    (["--max-len", "-5"], "argument --max-len: must be an integer >= 2, got '-5'"),
    (["--max-len", "1"], "argument --max-len: must be an integer >= 2"),
    (["--max-len", "0"], "argument --max-len"),
    (["--block-size", "0"], "argument --block-size"),
    (["--kv-blocks", "-1"], "argument --kv-blocks"),
    (["--endpoint", "tcp://127.0.0.1:99999"], "port must be 1..65535"),
    (["--endpoint", "junk"], "has no scheme"),
    (["--endpoint", "tcp://0.0.0.0:5555"], "--allow-remote"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--dtype", "int4"], "unknown dtype"),
    (["--log-level", "loud"], "unknown log level"),
])
def test_server_refusals_are_one_line(argv, needle):
    assert_one_line_refusal(*run("-m", "graphserver", *argv), needle)


def test_server_refuses_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, out, err = run("-m", "graphserver", "--endpoint", f"tcp://127.0.0.1:{port}",
                           "--engine-factory", "rpc_helpers:ClientFakeEngine")
    assert_one_line_refusal(rc, out, err, "already in use", str(port))


def test_server_refuses_a_model_that_does_not_exist(tmp_path):
    rc, out, err = run("-m", "graphserver", "--model", str(tmp_path / "no-such-model"),
                       "--engine-factory", "rpc_helpers:resolving_fake_engine")
    assert_one_line_refusal(rc, out, err, "does not exist", "no-such-model")


# -- the client's options -----------------------------------------------------------------------


@pytest.mark.parametrize("argv, needle", [
    (["--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["--chunk", "0"], "argument --chunk"),
    (["--timeout", "0"], "argument --timeout: must be a number of seconds > 0"),
    (["--timeout", "-1"], "argument --timeout"),
    (["--endpoint", "tcp://127.0.0.1:0"], "port must be 1..65535"),
    (["--endpoint", "nonsense"], "has no scheme"),
    (["--server-arg=--max-len=-5"], "--server-arg: argument --max-len"),
    (["--server-arg=--block-size=0"], "--server-arg: argument --block-size"),
    (["--top-p", "0"], "top_p"),
    (["--stop", ""], "argument --stop: must not be empty"),
])
def test_client_refusals_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as ei:
        client_main.main(["hi", *argv])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and len(error_lines(err)) == 1 and needle in err, err


def test_client_model_typo_is_said_once(tmp_path):
    typo = str(tmp_path / "SmolLM-typo")
    rc, out, err = run("-m", "client", "hi", "--model", typo,
                       "--server-arg=--engine-factory=rpc_helpers:resolving_fake_engine")
    assert_one_line_refusal(rc, out, err, "does not exist")
    assert err.count("SmolLM-typo") == 1


def test_client_help_names_the_command():
    assert client_main.build_parser(prog="graphclient").format_usage().startswith("usage: graphclient ")
    text = " ".join(client_main.build_parser(prog="graphclient").format_help().split())
    assert "(default: 128)" in text and "(default: 3.0)" in text and "--stop STRING" in text


@pytest.mark.skipif(shutil.which("graphclient") is None, reason="the package's console scripts are not installed")
def test_installed_commands_show_their_own_names():
    for cmd in ("graphclient", "graphserver"):
        p = subprocess.run([cmd, "--help"], capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                           env=child_env())
        assert p.returncode == 0 and p.stdout.startswith(f"usage: {cmd} "), p.stdout[:200]
    assert os.access(shutil.which("prepare-model"), os.X_OK)


def test_server_refuses_an_ipc_path_another_server_serves(tmp_path):
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen()
        rc, out, err = run("-m", "graphserver", "--endpoint", f"ipc://{path}",
                           "--engine-factory", "rpc_helpers:ClientFakeEngine")
    assert_one_line_refusal(rc, out, err, "another server is serving there")


def test_server_maps_refusals_to_one_line_and_keeps_tracebacks_for_bugs(monkeypatch, capsys):
    from graphserver.engine.proc import EndpointError
    from graphserver.errors import ConfigError

    for exc in (EndpointError("cannot bind ipc:///x: busy"), ConfigError("kv_blocks must be a positive int")):
        def refuse(args, exc=exc):
            raise exc

        monkeypatch.setattr(server_main, "serve", refuse)
        assert server_main.main([]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"{server_main.build_parser().prog}: error: {exc}"]

    def bug(args):
        raise KeyError("a real bug")

    monkeypatch.setattr(server_main, "serve", bug)
    with pytest.raises(KeyError):
        server_main.main([])
