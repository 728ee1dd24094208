"""argparse `type=` functions shared by the server, the client and the scripts.

Each turns a command-line string into a checked value or raises argparse.ArgumentTypeError with a
one-line message, so a user mistake ends as `prog: error: argument --x: <why>` with exit code 2.
Torch-free and zmq-free: the client and the scripts import it before anything heavy."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from dataclasses import dataclass

from graphserver.defaults import LOG_LEVELS

IPC_PATH_MAX = 107  # sun_path is 108 bytes on Linux including the NUL; zmq refuses longer paths
PORT_MAX = 65535

# Every spelling a user may type -> the one the engine takes.
DTYPE_ALIASES = {
    "auto": "auto",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}
DTYPE_HELP = "auto, bf16 (bfloat16), fp16 (float16, half) or fp32 (float32, float)"


def _fail(msg: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(msg)


# -- numbers ------------------------------------------------------------------------------------


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except (TypeError, ValueError):
        raise _fail(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise _fail(f"must be an integer >= 1, got {text!r}")
    return value


def int_at_least(low: int):
    """A type function for integers >= low (named for argparse's messages)."""
    def check(text: str) -> int:
        value = _int(text)
        if value < low:
            raise _fail(f"must be an integer >= {low}, got {text!r}")
        return value
    check.__name__ = f"int>={low}"
    return check


def nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise _fail(f"must be an integer >= 0, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _fail(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise _fail(f"must be a finite number, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """A timeout: > 0 (0 would fail every call at once; there is no 'wait for ever')."""
    value = _float(text)
    if not value > 0:
        raise _fail(f"must be a number of seconds > 0, got {text!r}")
    return value


def nonneg_seconds(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise _fail(f"must be a number of seconds >= 0, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise _fail(f"must be a number >= 0, got {text!r}")
    return value


# -- names --------------------------------------------------------------------------------------


def dtype(text: str) -> str:
    """Any accepted spelling (case-insensitive) -> auto | bf16 | fp16 | fp32."""
    canon = DTYPE_ALIASES.get(text.strip().lower())
    if canon is None:
        raise _fail(f"unknown dtype {text!r}; use {DTYPE_HELP}")
    return canon


def device(text: str) -> str:
    """auto | cpu | cuda | cuda:N (case-insensitive)."""
    value = text.strip().lower()
    if value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value):
        return value
    raise _fail(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")


def log_level(text: str) -> str:
    value = text.strip().upper()
    if value not in LOG_LEVELS:
        raise _fail(f"unknown log level {text!r}; use one of {', '.join(LOG_LEVELS)} (any case)")
    return value


def nonempty_str(text: str) -> str:
    if not text:
        raise _fail("must not be empty")
    return text


# -- endpoints ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A parsed ZeroMQ endpoint. ipc: path set; tcp: host and port set (port None = any free)."""

    text: str
    scheme: str  # "ipc" | "tcp"
    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_loopback(self) -> bool:
        """True for ipc:// and for tcp on 127.0.0.0/8, ::1 or localhost. A wildcard or any other
        host (names included: they may resolve anywhere) is not loopback."""
        if self.scheme == "ipc":
            return True
        return is_loopback_host(self.host or "")


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_HOST_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|\*|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?)$")


def parse_endpoint(text: str, *, bind: bool) -> Endpoint:
    """Check an endpoint string before zmq sees it (zmq's own errors name no argument).

    bind=True (a server): tcp port 0 or * means any free port, and host * means every interface.
    bind=False (a client): the port must be 1..65535 and the host a real address or name.
    Raises ValueError with a one-line message."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ValueError(f"endpoint {text!r} has no scheme; use ipc://PATH or tcp://HOST:PORT")
    if scheme == "ipc":
        return _parse_ipc(text, rest, bind)
    if scheme == "tcp":
        return _parse_tcp(text, rest, bind)
    raise ValueError(f"endpoint scheme {scheme + '://'!r} is not supported; use ipc://PATH or tcp://HOST:PORT")


def _parse_ipc(text: str, path: str, bind: bool) -> Endpoint:
    if not path:
        raise ValueError(f"endpoint {text!r} names no socket path (ipc://PATH)")
    if path.startswith("@"):  # Linux abstract namespace: no file, no directory to check
        return Endpoint(text, "ipc", path=path)
    if len(os.fsencode(path)) > IPC_PATH_MAX:
        raise ValueError(f"ipc path is {len(os.fsencode(path))} bytes, longer than the OS limit of "
                         f"{IPC_PATH_MAX}: {path}")
    if bind:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"cannot bind {text}: directory {parent} does not exist")
        if os.path.isdir(path):
            raise ValueError(f"cannot bind {text}: {path} is a directory")
    return Endpoint(text, "ipc", path=path)


def _parse_tcp(text: str, rest: str, bind: bool) -> Endpoint:
    host, sep, port_text = rest.rpartition(":")
    if not sep or not host:
        raise ValueError(f"endpoint {text!r} must look like tcp://HOST:PORT")
    if not _HOST_RE.match(host) or (host.startswith("[") and not _is_ipv6(host[1:-1])):
        raise ValueError(f"endpoint {text!r}: {host!r} is not a valid host")
    if host == "*" and not bind:
        raise ValueError(f"endpoint {text!r}: a client must name a host, not '*'")
    if bind and port_text in ("*", "0"):
        return Endpoint(text, "tcp", host=host, port=None)
    if not port_text.isdigit() or not 1 <= int(port_text) <= PORT_MAX:
        extra = " (or 0 / * for any free port)" if bind else ""
        raise ValueError(f"endpoint {text!r}: port must be 1..{PORT_MAX}{extra}, got {port_text!r}")
    return Endpoint(text, "tcp", host=host, port=int(port_text))


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def client_endpoint(text: str) -> str:
    """argparse type: an endpoint to connect to."""
    try:
        return parse_endpoint(text, bind=False).text
    except ValueError as e:
        raise _fail(str(e)) from None


def bind_endpoint(text: str) -> str:
    """argparse type: an endpoint to bind."""
    try:
        return parse_endpoint(text, bind=True).text
    except ValueError as e:
        raise _fail(str(e)) from None


# -- formatting ---------------------------------------------------------------------------------


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default and keeps the description's line breaks. Defaults of None and
    of flags (False) are left out: their help says in words what happens."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def prog_name(module_prog: str, argv0: str) -> str:
    """`python -m pkg` when run as a module, else the installed command's name (e.g. graphclient)."""
    base = os.path.basename(argv0 or "")
    if not base or base in ("__main__.py", "-c") or base.startswith("python"):
        return module_prog
    return base
