"""Request -> what the engine's `generate` takes: prompt ids, token budget, sampling, stops.

Every refusal is a 400 naming the parameter, decided here before anything reaches the engine."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Sequence

from graphserver.api.errors import ApiError, bad_request
from graphserver.api.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest, SamplingRequest
from graphserver.api.text import TemplateError, TextTokenizer

MAX_STOP_STRINGS = 16
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left


@dataclass(frozen=True)
class GenParams:
    prompt_ids: list[int]
    max_tokens: int
    sampling: dict[str, Any]
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_len: int


def sampling(temperature: float | None, top_p: float | None, top_k: int | None, seed: int | None,
             default_temperature: float) -> dict[str, Any]:
    """The engine's sampling map. temperature 0 is greedy; an unseeded sampled request gets a fresh
    random seed (the engine's default seed would make every unseeded request sample the same)."""
    t = default_temperature if temperature is None else temperature
    if not math.isfinite(t) or t < 0:
        raise bad_request(f"temperature must be a number >= 0, got {t}", "temperature")
    if top_p is not None and not (0 < top_p <= 1):
        raise bad_request(f"top_p must be in (0, 1], got {top_p}", "top_p")
    if top_k is not None and top_k < -1:
        raise bad_request(f"top_k must be >= 1, or 0 / -1 for no limit, got {top_k}", "top_k")
    if seed is not None and not (-(2**63) <= seed < 2**63):
        raise bad_request("seed must fit in 64 bits", "seed")
    if t == 0:
        return {"greedy": True}
    return {"greedy": False, "temperature": float(t), "top_p": 1.0 if top_p is None else float(top_p),
            "top_k": 0 if top_k is None or top_k < 0 else int(top_k),
            "seed": secrets.randbits(31) if seed is None else int(seed)}


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise bad_request("stop strings must not be empty", "stop")
    return tuple(stops)


def check_ids(ids: Sequence[int], vocab_size: int, param: str) -> list[int]:
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise bad_request(f"{param}[{i}] = {t} is not a token id (vocabulary of {vocab_size})", param)
    return list(ids)


def token_budget(requested: int | None, prompt_len: int, limits: ModelLimits, default: int | None,
                 prompt_param: str, param: str = "max_tokens") -> int:
    """max_tokens, checked against the context: prompt + max_tokens <= max_len."""
    room = limits.max_len - prompt_len
    if prompt_len == 0:
        raise bad_request("the prompt is empty", prompt_param)
    if room < 1:
        raise bad_request(f"this model's maximum context length is {limits.max_len} tokens; the prompt has "
                          f"{prompt_len}, which leaves no room to generate", prompt_param, "context_length_exceeded")
    if requested is None:
        return room if default is None else min(default, room)
    if requested < 1:
        raise bad_request(f"{param} must be >= 1, got {requested}", param)
    if requested > room:
        raise bad_request(f"this model's maximum context length is {limits.max_len} tokens; you asked for "
                          f"{prompt_len + requested} ({prompt_len} in the prompt, {requested} to generate)",
                          param, "context_length_exceeded")
    return requested


def _refuse_unsupported(req: SamplingRequest) -> None:
    if req.n != 1:
        raise bad_request(f"n must be 1 (one choice per request), got {req.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if v not in (None, 0, 0.0):
            raise bad_request(f"{name} is not supported (only 0)", name)
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", "logit_bias")


def _common(req: SamplingRequest, prompt_ids: list[int], limits: ModelLimits, default_max: int | None,
            prompt_param: str, requested_max: int | None, max_param: str) -> GenParams:
    _refuse_unsupported(req)
    return GenParams(
        prompt_ids=prompt_ids,
        max_tokens=token_budget(requested_max, len(prompt_ids), limits, default_max, prompt_param, max_param),
        sampling=sampling(req.temperature, req.top_p, req.top_k, req.seed, default_temperature=1.0),
        stop=stop_strings(req.stop),
        stop_token_ids=tuple(check_ids(req.stop_token_ids or [], limits.vocab_size, "stop_token_ids")),
        ignore_eos=req.ignore_eos,
    )


def completion_params(req: CompletionRequest, tok: TextTokenizer, limits: ModelLimits) -> GenParams:
    if req.echo:
        raise bad_request("echo is not supported", "echo")
    if req.logprobs is not None:
        raise bad_request("logprobs is not supported", "logprobs")
    if req.best_of not in (None, 1):
        raise bad_request("best_of must be 1", "best_of")
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise bad_request(f"one prompt per request, got {len(p)}", "prompt")
        p = p[0]
    ids = tok.encode_plain(p) if isinstance(p, str) else check_ids(p, limits.vocab_size, "prompt")
    return _common(req, ids, limits, DEFAULT_COMPLETION_MAX_TOKENS, "prompt", req.max_tokens, "max_tokens")


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    if not req.messages:
        raise bad_request("messages must not be empty", "messages")
    out = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            if any(part.type != "text" or part.text is None for part in m.content):
                raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(part.text for part in m.content)
        else:
            content = m.content or ""
        out.append({"role": m.role, "content": content})
    return out


def chat_params(req: ChatCompletionRequest, tok: TextTokenizer, limits: ModelLimits) -> GenParams:
    if req.logprobs:
        raise bad_request("logprobs is not supported", "logprobs")
    if req.tools:
        raise bad_request("tools are not supported", "tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {\"type\": \"text\"} is supported", "response_format")
    try:
        ids = tok.encode_chat(chat_messages(req))
    except TemplateError as e:
        raise bad_request(str(e), "messages") from None
    requested, param = req.max_tokens, "max_tokens"
    if req.max_completion_tokens is not None:
        requested, param = req.max_completion_tokens, "max_completion_tokens"
    return _common(req, ids, limits, None, "messages", requested, param)


def generate_params(req: GenerateRequest, tok: TextTokenizer, limits: ModelLimits) -> GenParams:
    ids = tok.encode_plain(req.prompt) if isinstance(req.prompt, str) else check_ids(
        req.prompt, limits.vocab_size, "prompt")
    return GenParams(
        prompt_ids=ids,
        max_tokens=token_budget(req.max_tokens, len(ids), limits, None, "prompt"),
        sampling=sampling(req.temperature, req.top_p, req.top_k, req.seed, default_temperature=0.0),
        stop=stop_strings(req.stop),
        stop_token_ids=tuple(check_ids(req.stop_token_ids or [], limits.vocab_size, "stop_token_ids")),
        ignore_eos=req.ignore_eos,
    )


__all__ = ["ApiError", "GenParams", "ModelLimits", "chat_params", "completion_params", "generate_params"]
