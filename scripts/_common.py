"""Shared bits of the scripts: argument helpers and output paths. Scripts add the repo root to
sys.path so they run from a checkout without installing."""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from graphserver import argtypes  # noqa: E402  (after the sys.path line above)

HelpFormatter = argtypes.HelpFormatter  # shows defaults, keeps the docstring's line breaks


def parser(description: str | None) -> argparse.ArgumentParser:
    """The scripts' parser: the module docstring as description, every default in --help."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def add_model_args(p: argparse.ArgumentParser, dtype_default: str = "auto") -> None:
    p.add_argument("--model", default=None,
                   help="default: the embedded SmolLM2-135M-Instruct (prepared on first use); "
                        "or an HF Llama-family directory; or random:<shape>")
    p.add_argument("--device", default="auto", type=argtypes.device,
                   help="auto (cuda when usable), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=dtype_default, type=argtypes.dtype,
                   help=f"{argtypes.DTYPE_HELP}; auto is bf16 on cuda, fp32 on cpu; fp32 runs on "
                        "the cpu only")


def output_dir() -> Path:
    """output/ of the checkout, or $GRAPHSERVER_OUTPUT."""
    out = Path(os.environ.get("GRAPHSERVER_OUTPUT", ROOT / "output"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def default_prompt() -> str:
    return "Write a short story about a robot who learns to paint."


def write_run_outputs(prefix: str, record: dict, log_lines: list[str]) -> Path:
    """Write <prefix>.json, <prefix>_tokens.txt, <prefix>_text.txt and <prefix>.log under
    output/; returns the JSON path."""
    import json
    out = output_dir()
    (out / f"{prefix}_tokens.txt").write_text(" ".join(str(t) for t in record["tokens"]) + "\n")
    (out / f"{prefix}_text.txt").write_text(record.get("text", "") + "\n")
    (out / f"{prefix}.log").write_text("\n".join(log_lines) + "\n")
    path = out / f"{prefix}.json"
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return path


def hf_greedy(model_path, prompt_ids: list[int], new_tokens: int, dtype_name: str,
              device: str) -> list[int]:
    """HF transformers' greedy generate on the same checkpoint, for the equality check."""
    import torch
    from transformers import AutoModelForCausalLM
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype_name, torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True)
    hf = hf.to(device).eval()
    ids = torch.tensor([prompt_ids], device=device)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, top_p=None, top_k=None,
                          temperature=None)
    return out[0, len(prompt_ids):].tolist()


def hf_near_tie(model_path, prompt_ids: list[int], hf_tokens: list[int], index: int,
                our_token: int, dtype_name: str, device: str) -> tuple[float, float]:
    """At a divergence: (HF's logit of its token minus HF's logit of ours, the dtype's logit
    step there). A margin within one or two steps is a near-tie that rounding can flip."""
    import torch
    from transformers import AutoModelForCausalLM
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype_name, torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True)
    hf = hf.to(device).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt_ids + hf_tokens[:index]], device=device)).logits[0, -1]
    margin = float(logits[hf_tokens[index]].float() - logits[our_token].float())
    top = float(logits.float().abs().max())
    mant = {torch.bfloat16: 7, torch.float16: 10}.get(dtype, 23)
    step = 2.0 ** (math.floor(math.log2(max(top, 1e-30))) - mant)
    return margin, step


def first_divergence(a: list[int], b: list[int]):
    """Index of the first difference of two token lists (None when equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


class Logger:
    """Prints and keeps lines for the .log file."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        print(msg, flush=True)
        self.lines.append(str(msg))


def git_commit() -> str:
    """HEAD of the checkout (short, "-dirty" when tracked files changed); GRAPHSERVER_COMMIT where
    the tree was copied without git (the GPU machine)."""
    if os.environ.get("GRAPHSERVER_COMMIT"):
        return os.environ["GRAPHSERVER_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               text=True, capture_output=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def copy_bandwidth_gbs(torch, nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy, counting bytes read plus bytes written (GB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    del src, dst
    return 2 * nbytes / (times[len(times) // 2] * 1e-3) / 1e9
